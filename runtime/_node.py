"""Internal: the runtime's state in one OS process, and its single event loop.

Each OS process of a node has exactly one :class:`Node`: its own ``Pid``, its
mailbox, its connections to other processes, and its *watches*. A watch is one
file descriptor per watched process that becomes readable when that process
dies: the ``multiprocessing`` sentinel for a child, a pidfd for anything else.
Monitors, links and pending calls on the same process share one watch.

Everything waits in one place, :meth:`Node._wait`: one ``epoll`` holds the
listening socket, every connection and every watch, registered once, so a
wake-up costs O(1) however many processes are watched. Nothing sleeps and polls.

When a watch fires, the node first drains what the dead process sent before it
died (so its messages come before its ``Down``), then reads the reason from the
node's process table (see ``_table``), then delivers ``Down`` for monitors,
errors for pending calls, and ``Exit`` (or death) for a link.

The embedding (main) process may have threads. All state is guarded by one
condition lock; one thread at a time polls ("leader"), the others wait on the
condition and are woken when the leader has queued something. Runtime
processes are single-threaded and take the same, uncontended path.
"""

from __future__ import annotations

import itertools
import logging
import mmap
import os
import pickle
import select
import signal
import socket
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, NoReturn

from . import _table, _wire
from ._wire import T_EXIT, T_LINK, T_MSG, T_REPLY, T_UNLINK
from .errors import (
    CallTimeout,
    Crash,
    ExitError,
    NoProcError,
    ProcessError,
    ReceiveTimeout,
    is_clean_exit,
)
from .messages import Down, Exit
from .pid import Pid, Ref

log = logging.getLogger("runtime")

_NONE = object()
_PENDING = object()
_LISTEN = object()

EPOLLIN = select.EPOLLIN
# The signal that makes a runtime process run its exit path (see Node.kill), and
# how long a process gets to do so before the root SIGKILLs it.
SIG_EXIT = signal.SIGRTMIN + 1
EXIT_GRACE = 0.25
# How long an exiting process waits for its children to finish exiting.
CHILD_EXIT_GRACE = 1.0
READ_SIZE = 65536
# Cleanup jobs (reaping, closing) wait for an idle moment, but never pile up beyond this.
DEFERRED_MAX = 32
# In the embedding process, Exit messages nobody receives are capped at this many;
# the oldest is dropped (with a warning) to make room.
MAIN_EXIT_BACKLOG = 1000


@dataclass(frozen=True)
class NodeInfo:
    """What every process of a node knows about the node (inherited by children)."""

    dir: str
    key: bytes
    node_id: int
    main: Pid
    root: Pid | None
    start_method: str

    def sock_path(self, serial: int) -> str:
        return os.path.join(self.dir, str(serial))


class Conn:
    """One Unix stream connection to a peer process."""

    __slots__ = ("sock", "fd", "peer", "inbuf", "outbuf")

    def __init__(self, sock: socket.socket, peer: Pid | None) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.inbuf = bytearray()
        self.outbuf = b""


class Watch:
    """The death of one watched process, and who cares about it."""

    __slots__ = ("pid", "fd", "child", "monitors", "calls", "linked", "keep", "owns_fd")

    def __init__(self, pid: Pid, fd: int, child: Any = None) -> None:
        self.pid = pid
        self.fd = fd
        self.child = child  # the multiprocessing Popen, if the process is our child
        self.owns_fd = not child  # a pidfd is ours to close; a sentinel is the Popen's
        self.monitors: set[Ref] = set()
        self.calls: set[int] = set()
        self.linked = False
        self.keep = False  # kept while we talk to the peer: calls reuse it


class Reader:
    """A file descriptor with a callback, polled by the node's loop (see ``add_reader``)."""

    __slots__ = ("fd", "callback")

    def __init__(self, fd: int, callback: Callable[[], None]) -> None:
        self.fd = fd
        self.callback = callback


class Node:
    """The runtime state of one OS process. See the module docstring."""

    def __init__(
        self,
        info: NodeInfo,
        me: Pid,
        listen: socket.socket,
        table: _table.Table,
        *,
        is_main: bool,
    ) -> None:
        self.info = info
        self.key = info.key
        self.node_id = info.node_id
        self.me = me
        self.is_main = is_main
        self.table = table
        self.listen = listen
        listen.setblocking(False)
        self.epoll = select.epoll()
        # A plain lock (its ``with`` runs in C) guards everything; the condition over it
        # is only waited on and notified in the embedding process, which has threads.
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.polling = False
        self.mailbox: deque[Any] = deque()
        self.removed = 0  # how many messages were taken out of the middle of the mailbox
        self.exits_queued = 0
        self.replies: dict[int, Any] = {}
        self.handlers: dict[int, Any] = {}
        self.out: dict[int, Conn] = {}
        self.conns_of: dict[int, set[Conn]] = {}
        self.watches: dict[int, Watch] = {}
        self.monitor_refs: dict[Ref, int] = {}
        self.links: dict[int, Pid] = {}
        self.children: dict[int, Watch] = {}
        self.child_by_os_pid: dict[int, int] = {}
        self.trap = is_main
        self.names: set[str] = set()
        # Serials this process has seen die, most recent last: a process whose Down we
        # delivered is dead to us even before its parent has reaped it.
        self.dead: dict[int, None] = {}
        self.refs = itertools.count(1)
        self.closed = False
        self.exiting = False
        self.discard: list[Any] = []  # nodes built for children, freed at the next spawn
        self.deferred: list[tuple[Any, ...]] = []  # work done before the next wait
        self.unproven: set[Conn] = set()  # accepted connections not past their HELLO yet
        self.rbuf: mmap.mmap | None = None
        self.suspects: list[int] = []  # peers whose connection closed: dying
        self.internal: dict[Ref, Down | None] = {}  # the runtime's own monitors
        self.extra_fds: list[int] = []  # owned but not polled: our sentinel's write end
        self.from_ = (me.node, me.serial, me.slot, me.os_pid)
        self.reading = 0
        self.root: Pid | None = None
        self.parent: Pid | None = None
        self.epoll.register(listen.fileno(), EPOLLIN)
        self.handlers[listen.fileno()] = _LISTEN
        table.set_trap(me.slot, self.trap)
        # Threads of the embedding process wake the polling thread through this eventfd
        # when they queue something it may be waiting for.
        self.wakefd = -1
        if is_main:
            self.wakefd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self.handlers[self.wakefd] = Reader(self.wakefd, self._drain_wake)
            self.epoll.register(self.wakefd, EPOLLIN)

    def _drain_wake(self) -> None:
        try:
            os.eventfd_read(self.wakefd)
        except OSError:
            pass

    def _notify(self) -> None:
        """Wake every thread waiting on this node: followers and the polling leader."""
        if not self.is_main:
            return
        self.cond.notify_all()
        if self.polling and self.wakefd >= 0:
            os.eventfd_write(self.wakefd, 1)

    # ------------------------------------------------------------------ waiting

    def _wait(self, check: Callable[[], Any], deadline: float | None) -> Any:
        """Block until ``check()`` (called under the lock) returns something other than
        _NONE, or until ``deadline`` (monotonic seconds; None = forever). Returns _NONE
        on timeout."""
        cond = self.cond
        lock = self.lock
        threaded = self.is_main
        with lock:
            while True:
                r = check()
                if r is not _NONE:
                    return r
                if deadline is None:
                    remaining = -1.0
                else:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return _NONE
                if self.closed:
                    raise ProcessError("the runtime node has been shut down")
                if self.deferred and not self.polling:
                    # Deliver what is ready first; cleanup waits for an idle moment, or
                    # until it piles up (a busy process must still reap its children).
                    events = self.epoll.poll(0) if len(self.deferred) < DEFERRED_MAX else None
                    if events:
                        self._process(events)
                        if threaded:
                            cond.notify_all()
                    else:
                        self._run_deferred()
                    continue
                if self.polling:
                    cond.wait(None if remaining < 0 else remaining)
                    continue
                self.polling = True
                lock.release()
                try:
                    events = self.epoll.poll(remaining)
                except BaseException:
                    lock.acquire()
                    self.polling = False
                    if threaded:
                        cond.notify_all()  # another thread must take over the polling
                    raise
                lock.acquire()
                self.polling = False
                if self.closed:
                    raise ProcessError("the runtime node has been shut down")
                if events:
                    self._process(events)
                if threaded:
                    cond.notify_all()

    def _process(self, events: list[tuple[int, int]]) -> None:
        handlers = self.handlers
        deaths = None
        for fd, _ in events:
            h = handlers.get(fd)
            if h is None:
                continue
            cls = h.__class__
            if cls is Conn:
                self._read(h)
            elif cls is Watch:
                if deaths is None:
                    deaths = [h]
                else:
                    deaths.append(h)
            elif h is _LISTEN:
                self._accept_all()
            else:
                h.callback()
        if self.suspects:
            for serial in self.suspects:
                w = self.watches.get(serial)
                if w is not None and (deaths is None or w not in deaths) and (
                        w.child is not None or _readable(w.fd, 0)):
                    if deaths is None:
                        deaths = [w]
                    else:
                        deaths.append(w)
            self.suspects.clear()
        if deaths:
            for w in deaths:
                if self.watches.get(w.pid.serial) is w:
                    self._on_death(w)

    def fileno(self) -> int:
        """The epoll descriptor this process waits on: readable when the runtime has
        something to process (an event loop can watch it, then call ``pump``)."""
        return self.epoll.fileno()

    def pump(self) -> None:
        """Process whatever is ready now, without blocking (for an outside event loop)."""
        with self.lock:
            if self.polling:
                return  # another thread is waiting: it processes what arrives
            if self.deferred:
                self._run_deferred()
            events = self.epoll.poll(0)
            if events:
                self._process(events)
                self._notify()

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        """Call ``callback()`` (under the node lock) whenever ``fd`` is readable."""
        with self.lock:
            self.handlers[fd] = Reader(fd, callback)
            self.epoll.register(fd, EPOLLIN)

    def remove_reader(self, fd: int) -> None:
        with self.lock:
            if self.handlers.pop(fd, None) is not None:
                self.epoll.unregister(fd)

    # ---------------------------------------------------------- connections

    def _accept_all(self) -> list[Conn]:
        new = []
        while True:
            try:
                sock, _ = self.listen.accept()
            except (BlockingIOError, InterruptedError):
                return new
            except OSError:
                return new
            sock.setblocking(False)
            conn = Conn(sock, None)
            self.handlers[conn.fd] = conn
            self.epoll.register(conn.fd, EPOLLIN)
            self.unproven.add(conn)
            new.append(conn)

    def _read(self, conn: Conn, drain: bool = False) -> None:
        """Read what ``conn`` has (all of it with ``drain``) and dispatch whole frames."""
        sock = conn.sock
        handlers = self.handlers
        header = _wire.HEADER
        rbuf = self.rbuf
        if rbuf is None or self.reading:  # first read, or re-entered from a dispatch
            # Anonymous memory: only the pages a read touches cost anything.
            rbuf = mmap.mmap(-1, READ_SIZE)
            if not self.reading:
                self.rbuf = rbuf
        rview = memoryview(rbuf)
        self.reading += 1
        try:
            while True:
                try:
                    n = sock.recv_into(rbuf)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError:
                    n = 0
                if not n:
                    self._close_conn(conn)
                    if not drain and conn.peer is not None:
                        # A peer closes its end only by dying: check it now rather than
                        # wake again for its sentinel or pidfd (see _process).
                        self.suspects.append(conn.peer.serial)
                    return
                buf = conn.inbuf
                if buf:
                    buf += rview[:n]
                    for payload in _wire.split_frames(buf) or ():
                        self._dispatch(conn, payload)
                        if handlers.get(conn.fd) is not conn:
                            return
                else:
                    # Frames straight from the read buffer; only a partial one is copied.
                    pos = 0
                    while n - pos >= 4:
                        end = pos + 4 + header.unpack_from(rbuf, pos)[0]
                        if end > n:
                            break
                        self._dispatch(conn, rview[pos + 4 : end])
                        if handlers.get(conn.fd) is not conn:
                            return
                        pos = end
                    if pos < n:
                        buf += rview[pos:n]
                if not drain and n < READ_SIZE:
                    return
        finally:
            self.reading -= 1
            try:
                rview.release()
            except BufferError:
                pass

    def _dispatch(self, conn: Conn, payload: memoryview) -> None:
        if conn.peer is None:
            peer = _wire.check_hello(self.key, conn.sock, self.me.serial, payload)
            if peer is None:
                log.warning("%r rejected a connection that did not prove the node key", self.me)
                self._close_conn(conn)
                return
            serial, slot, os_pid = peer
            self.unproven.discard(conn)
            conn.peer = Pid(self.node_id, serial, slot, os_pid)
            self.conns_of.setdefault(serial, set()).add(conn)
            if serial not in self.out:
                self.out[serial] = conn
            return
        try:
            obj = pickle.loads(payload)
        except Exception as exc:
            log.error("%r dropped a message from %r that cannot be unpickled here: %r",
                      self.me, conn.peer, exc)
            return
        tag = obj[0]
        if tag == T_MSG:
            self.mailbox.append(obj[1])
        elif tag == T_REPLY:
            ref = obj[1]
            if self.replies.get(ref) is _PENDING:
                self.replies[ref] = (True, obj[2])
        elif tag == T_LINK:
            self._add_link(obj[1], requested=False)
        elif tag == T_UNLINK:
            self._drop_link(obj[1].serial)
        elif tag == T_EXIT:
            self._exit_signal(obj[1], obj[2])

    def _close_conn(self, conn: Conn) -> None:
        self.unproven.discard(conn)
        if self.handlers.get(conn.fd) is conn:
            del self.handlers[conn.fd]
            try:
                self.epoll.unregister(conn.fd)
            except (OSError, ValueError):
                pass
        if conn.peer is not None:
            serial = conn.peer.serial
            if self.out.get(serial) is conn:
                del self.out[serial]
            peers = self.conns_of.get(serial)
            if peers is not None:
                peers.discard(conn)
                if not peers:
                    del self.conns_of[serial]
        conn.sock.close()

    def _conn_to(self, pid: Pid) -> Conn | None:
        conn = self.out.get(pid.serial)
        if conn is not None:
            return conn
        if pid.node != self.node_id:
            return None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self.info.sock_path(pid.serial))
        except OSError:
            sock.close()
            return None
        sock.setblocking(False)
        conn = Conn(sock, pid)
        self.handlers[conn.fd] = conn
        self.epoll.register(conn.fd, EPOLLIN)
        self.out[pid.serial] = conn
        self.conns_of.setdefault(pid.serial, set()).add(conn)
        self._write(conn, _wire.hello_frame(self.key, self.me.serial, self.me.slot, pid.serial))
        return conn

    def adopt_conn(self, sock: socket.socket, peer: Pid) -> None:
        """Use an already connected socket (a socketpair made at spawn) for ``peer``."""
        sock.setblocking(False)
        conn = Conn(sock, peer)
        self.handlers[conn.fd] = conn
        self.epoll.register(conn.fd, EPOLLIN)
        self.out[peer.serial] = conn
        self.conns_of.setdefault(peer.serial, set()).add(conn)

    def _write(self, conn: Conn, data: bytes) -> bool:
        if conn.outbuf:
            conn.outbuf += data
            return self._flush(conn)
        try:
            n = conn.sock.send(data)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError:
            self._close_conn(conn)
            return False
        if n == len(data):
            return True
        conn.outbuf = data[n:]
        return self._flush(conn)

    def _flush(self, conn: Conn) -> bool:
        """Finish writing ``conn.outbuf``. While the peer's buffer is full, keep reading
        our own connections (if no other thread does), so that two processes that
        write to each other cannot deadlock."""
        while conn.outbuf:
            try:
                n = conn.sock.send(conn.outbuf)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError:
                conn.outbuf = b""
                self._close_conn(conn)
                return False
            conn.outbuf = conn.outbuf[n:]
            if not conn.outbuf:
                return True
            if not self.polling:
                events = self.epoll.poll(0)
                if events:
                    self._process(events)
                    if self.is_main:
                        self.cond.notify_all()
                if self.handlers.get(conn.fd) is not conn:
                    return False
            # Let other threads run while we wait for room. The exit path of a runtime
            # process may get here without holding the lock: then there is none to drop.
            try:
                self.lock.release()
                released = True
            except RuntimeError:
                released = False
            try:
                poller = select.poll()
                poller.register(conn.fd, select.POLLOUT)
                poller.poll(50)
            except (OSError, ValueError):
                pass
            finally:
                if released:
                    self.lock.acquire()
        return True

    def _send(self, pid: Pid, obj: Any) -> bool:
        """Send one frame to ``pid``. False if the process is gone (the frame is dropped)."""
        conn = self.out.get(pid.serial) or self._conn_to(pid)
        if conn is None:
            return False
        return self._write(conn, _wire.encode(obj))

    # ---------------------------------------------------------------- watches

    def _watch(self, pid: Pid) -> Watch | None:
        """The watch on ``pid``, made if needed. None if ``pid`` is already dead."""
        w = self.watches.get(pid.serial)
        if w is not None:
            return w
        if pid.node != self.node_id or pid.serial in self.dead:
            return None
        try:
            fd = os.pidfd_open(pid.os_pid)
        except (ProcessLookupError, OSError):
            return None
        # The table marks a process EXITED before anyone reaps it, so while its slot is
        # not EXITED the OS pid cannot have been recycled: this pidfd is the right process.
        # A readable pidfd is a process that already died (a zombie): it is not there.
        if self.table.state(pid.serial, pid.slot) == _table.EXITED or _readable(fd, 0):
            os.close(fd)
            return None
        w = Watch(pid, fd)
        self.watches[pid.serial] = w
        self.handlers[fd] = w
        self.epoll.register(fd, EPOLLIN)
        return w

    def _maybe_unwatch(self, w: Watch) -> None:
        if w.child is not None or w.monitors or w.calls or w.linked or w.keep:
            return
        self._remove_watch(w)

    def _remove_watch(self, w: Watch) -> None:
        if self.watches.get(w.pid.serial) is w:
            del self.watches[w.pid.serial]
        if self.handlers.get(w.fd) is w:
            del self.handlers[w.fd]
            try:
                self.epoll.unregister(w.fd)
            except (OSError, ValueError):
                pass
        if w.owns_fd:
            os.close(w.fd)

    def add_child(self, pid: Pid, popen: Any, conn_sock: socket.socket, link: bool) -> None:
        """Record a child that has been started: watch its sentinel, adopt its socketpair."""
        w = self.prepare_child(pid, popen.sentinel, conn_sock, link)
        self.child_started(w, popen)

    def prepare_child(self, pid: Pid, sentinel: int, conn_sock: socket.socket,
                      link: bool) -> Watch:
        """Record a child about to be forked (``pid.os_pid`` is set once it is). Done
        before the fork because after it every page the parent writes is copied."""
        w = Watch(pid, sentinel, child=True)
        self.watches[pid.serial] = w
        self.children[pid.serial] = w
        self.handlers[sentinel] = w
        self.epoll.register(sentinel, EPOLLIN)
        self.adopt_conn(conn_sock, pid)
        if link:
            w.linked = True
            self.links[pid.serial] = pid
        return w

    def child_started(self, w: Watch, popen: Any) -> None:
        w.pid.os_pid = popen.pid
        w.child = popen
        self.child_by_os_pid[popen.pid] = w.pid.serial

    def child_failed(self, w: Watch) -> None:
        """Undo prepare_child: the fork failed."""
        serial = w.pid.serial
        self.watches.pop(serial, None)
        self.children.pop(serial, None)
        self.links.pop(serial, None)
        if self.handlers.pop(w.fd, None) is not None:
            self.epoll.unregister(w.fd)
        for conn in list(self.conns_of.get(serial, ())):
            self._close_conn(conn)

    def _drain_peer(self, serial: int) -> None:
        """Read everything ``serial`` sent before it died, so it is queued before its Down.

        A connection it made before dying was already pending when the wait returned
        its death, so _process has usually accepted it (it handles the rest of a
        wake-up's events before deaths), unless the wake-up held more events than one
        poll returns: accept again to be sure."""
        self._accept_all()
        if self.unproven:
            for conn in list(self.unproven):
                self._read(conn, drain=True)
        for conn in list(self.conns_of.get(serial, ())):
            self._read(conn, drain=True)

    def _child_exited(self, w: Watch) -> Any:
        """The sentinel of child ``w`` fired: its exit status (a ``waitid`` result or an
        ``(si_code, si_status)`` pair; the child is not reaped), None if it is gone
        already, or False if it is not done yet. Never blocks.

        The sentinel reaches EOF when the child's descriptors close, a little before
        the kernel makes it waitable (much longer when thousands exit at once). The
        status is known before that: in the table if the child wrote it or was
        killed by the runtime, else in /proc (the kernel sets it first). Only when
        neither has it yet, or the child closed its sentinel and runs on, is its
        pidfd watched instead: it fires once the child is waitable."""
        os_pid = w.pid.os_pid
        flags = os.WEXITED | os.WNOHANG | os.WNOWAIT
        try:
            status = os.waitid(os.P_PID, os_pid, flags)
        except ChildProcessError:
            return None
        if status is not None:
            return status
        pid = w.pid
        if self.table.state(pid.serial, pid.slot) != _table.ALIVE:
            return (os.CLD_KILLED, signal.SIGKILL)  # the table has the reason
        early = _table.zombie_status(os_pid, exiting=True)
        if early is not None:
            return early
        try:
            fd = os.pidfd_open(os_pid)
        except ProcessLookupError:
            return None
        if self.handlers.get(w.fd) is w:
            del self.handlers[w.fd]
            self.epoll.unregister(w.fd)
        if not w.owns_fd:
            w.child.close()  # the sentinel; poll() and the pid stay usable
        else:
            os.close(w.fd)
        w.fd = fd
        w.owns_fd = True
        self.handlers[fd] = w
        self.epoll.register(fd, EPOLLIN)
        return False

    def _child_reason(self, pid: Pid, status: Any) -> Any:
        state = self.table.state(pid.serial, pid.slot)
        if state == _table.EXITED or state == _table.DOOMED or status is None:
            return self.table.reason(pid.serial, pid.slot, pid.os_pid)
        return _table.status_reason(*_code_and_status(status))

    def _reap_child(self, pid: Pid, popen: Any, status: Any) -> None:
        """After the Down of our dead child is out: record its exit in the table if it
        could not, then reap it (in that order, see _table), close its sentinel and
        remove its socket file. A child not waitable yet is reaped when its pidfd
        fires."""
        table = self.table
        if table.state(pid.serial, pid.slot) != _table.EXITED:
            code, value = (os.CLD_KILLED, signal.SIGKILL) if status is None else \
                _code_and_status(status)
            table.publish(pid.serial, pid.slot, code, value)
        try:
            os.unlink(self.info.sock_path(pid.serial))
        except OSError:
            pass
        try:
            popen.poll()  # WNOHANG
        except OSError:
            pass
        if popen.returncode is not None:
            popen.close()
            return
        try:
            fd = os.pidfd_open(popen.pid)
        except ProcessLookupError:
            popen.close()
            return

        def reap() -> None:
            self.handlers.pop(fd, None)
            self.epoll.unregister(fd)
            os.close(fd)
            popen.poll()
            popen.close()

        self.handlers[fd] = Reader(fd, reap)
        self.epoll.register(fd, EPOLLIN)

    def _run_deferred(self) -> None:
        jobs, self.deferred = self.deferred, []
        for job in jobs:
            job[0](*job[1:])

    def _on_death(self, w: Watch) -> None:
        pid = w.pid
        serial = pid.serial
        popen = w.child
        if popen is not None:
            status = self._child_exited(w)
            if status is False:
                return
        self._drain_peer(serial)
        self._remove_watch(w)
        if popen is not None:
            reason = self._child_reason(pid, status)
            w.child = None
            del self.children[serial]
            self.child_by_os_pid.pop(pid.os_pid, None)
            # Reaping waits until the Down is out (the next wait, or our exit).
            self.deferred.append((self._reap_child, pid, popen, status))
        else:
            reason = self.table.reason(serial, pid.slot, pid.os_pid)
        dead = self.dead
        dead[serial] = None
        if len(dead) > 4096:
            del dead[next(iter(dead))]
        for conn in list(self.conns_of.get(serial, ())):
            self._close_conn(conn)
        replies = self.replies
        for ref in w.calls:
            if replies.get(ref) is _PENDING:
                replies[ref] = (False, reason)
        internal = self.internal
        for ref in w.monitors:
            self.monitor_refs.pop(ref, None)
            if ref in internal:
                internal[ref] = Down(ref, pid, reason)
            else:
                self.mailbox.append(Down(ref, pid, reason))
        if w.linked:
            self.links.pop(serial, None)
            self._linked_exit(pid, reason)

    def _linked_exit(self, pid: Pid, reason: Any) -> None:
        if self.exiting:
            return
        if self.trap:
            if self.is_main and reason == "normal":
                return
            self._queue_exit(Exit(pid, reason))
        elif reason != "normal":
            self.exit_process(reason, log_crash=False)

    def _queue_exit(self, msg: Exit) -> None:
        if self.is_main:
            if self.exits_queued >= MAIN_EXIT_BACKLOG:
                for i, old in enumerate(self.mailbox):
                    if old.__class__ is Exit:
                        del self.mailbox[i]
                        self.removed += 1
                        break
                log.warning("the embedding process has %d unreceived Exit messages; "
                            "dropped the oldest", MAIN_EXIT_BACKLOG)
            else:
                self.exits_queued += 1
            self.mailbox.append(msg)
            self._notify()
            return
        self.mailbox.append(msg)

    # ------------------------------------------------------------ messaging API

    def make_ref(self) -> Ref:
        return Ref(self.node_id, self.me.serial, next(self.refs))

    def send(self, pid: Pid, msg: Any) -> None:
        with self.lock:
            if pid == self.me:
                self.mailbox.append(msg)
                self._notify()
                return
            self._send(pid, (T_MSG, msg))

    def send_reply(self, pid: Pid, ref: int, value: Any) -> None:
        with self.lock:
            if pid == self.me:
                if self.replies.get(ref) is _PENDING:
                    self.replies[ref] = (True, value)
                    self._notify()
                return
            self._send(pid, (T_REPLY, ref, value))

    def receive(self, timeout: float | None, match: Callable[[Any], bool] | None) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        mailbox = self.mailbox
        if match is None:
            def check() -> Any:
                if mailbox:
                    self.removed += 1
                    return self._taken(mailbox.popleft())
                return _NONE
        else:
            # Messages already rejected stay rejected: scan only what arrived since.
            scanned = [0, self.removed]

            def check() -> Any:
                if scanned[1] != self.removed:
                    scanned[0] = 0
                    scanned[1] = self.removed
                i = scanned[0]
                n = len(mailbox)
                while i < n:
                    m = mailbox[i]
                    if match(m):
                        del mailbox[i]
                        self.removed += 1
                        scanned[1] = self.removed
                        return self._taken(m)
                    i += 1
                scanned[0] = i
                return _NONE

        r = self._wait(check, deadline)
        if r is _NONE:
            raise ReceiveTimeout(f"no matching message within {timeout}s")
        return r

    def _taken(self, msg: Any) -> Any:
        if self.is_main and msg.__class__ is Exit:
            self.exits_queued -= 1
        return msg

    def call(self, pid: Pid, request: Any, timeout: float | None) -> Any:
        """Send a GenServer call and wait for its reply, the server's death, or the timeout.

        The hot path of the runtime: written out flat on purpose."""
        serial = pid.serial
        replies = self.replies
        with self.lock:
            if serial == self.me.serial and pid.node == self.node_id:
                raise ProcessError(f"{pid!r} called itself: that would deadlock")
            w = self.watches.get(serial) or self._watch(pid)
            if w is None:
                raise NoProcError(pid)
            ref = next(self.refs)
            w.calls.add(ref)
            w.keep = True
            replies[ref] = _PENDING
            conn = self.out.get(serial) or self._conn_to(pid)
            if conn is not None:
                # from_ is a plain tuple (node, serial, slot, os pid, ref): cheap to pickle.
                self._write(conn, _wire.encode((T_MSG, ("$gen_call", self.from_ + (ref,),
                                                        request))))
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            if self.is_main:
                def check() -> Any:
                    r = replies[ref]
                    return _NONE if r is _PENDING else r

                r = self._wait(check, deadline)
            else:
                r = self._wait_reply(ref, deadline)
        finally:
            with self.lock:
                replies.pop(ref, None)
                w.calls.discard(ref)
        if r is _NONE:
            raise CallTimeout(pid, request, timeout if timeout is not None else float("inf"))
        ok, value = r
        if ok:
            return value
        if value == "noproc":
            raise NoProcError(pid)
        raise ExitError(pid, value)

    def _wait_reply(self, ref: int, deadline: float | None) -> Any:
        """_wait for one reply, in a runtime process (one thread: no leader, no
        condition)."""
        replies = self.replies
        lock = self.lock
        epoll = self.epoll
        while True:
            r = replies[ref]
            if r is not _PENDING:
                return r
            if deadline is None:
                remaining = -1.0
            else:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return _NONE
            if self.deferred:
                events = epoll.poll(0) if len(self.deferred) < DEFERRED_MAX else None
                with lock:
                    if events:
                        self._process(events)
                    else:
                        self._run_deferred()
                continue
            events = epoll.poll(remaining)
            if events:
                with lock:
                    self._process(events)

    def next_message(self) -> Any:
        """receive() without a match or timeout, for the GenServer loop of a runtime
        process (one thread: no leader, no condition)."""
        mailbox = self.mailbox
        lock = self.lock
        epoll = self.epoll
        while True:
            if mailbox:
                self.removed += 1
                return mailbox.popleft()
            if self.deferred:
                events = epoll.poll(0) if len(self.deferred) < DEFERRED_MAX else None
                with lock:
                    if events:
                        self._process(events)
                    else:
                        self._run_deferred()
                continue
            events = epoll.poll()
            if events:
                with lock:
                    self._process(events)

    def reply(self, from_: tuple[Any, ...], value: Any) -> None:
        """Answer the call ``from_`` = (node, serial, slot, os pid, ref)."""
        serial = from_[1]
        with self.lock:
            if serial == self.me.serial:
                ref = from_[4]
                if self.replies.get(ref) is _PENDING:
                    self.replies[ref] = (True, value)
                    self._notify()
                return
            conn = self.out.get(serial)
            if conn is None:
                if from_[0] != self.node_id:
                    return
                conn = self._conn_to(Pid(from_[0], serial, from_[2], from_[3]))
                if conn is None:
                    return
            self._write(conn, _wire.encode((T_REPLY, from_[4], value)))

    # ------------------------------------------------------------- monitors

    def monitor(self, pid: Pid, fresh: bool = False, internal: bool = False) -> Ref:
        """Monitor ``pid``. ``fresh``: the caller knows ``pid`` existed (it just spawned
        it), so if it is already dead the Down carries its true reason, not noproc.
        ``internal``: the runtime's own monitor (stop, start, supervisors): its Down is
        kept apart from the mailbox, for ``wait_down``, so that no ``receive`` of
        another thread can take it."""
        ref = self.make_ref()
        if pid == self.me:
            return ref  # fires only when we are dead, that is never for us
        with self.lock:
            if internal:
                self.internal[ref] = None
            w = self._watch(pid)
            if w is None:
                if not self.polling:  # what it sent before dying comes before its Down
                    self._drain_peer(pid.serial)
                reason = "noproc"
                if fresh and pid.node == self.node_id:
                    reason = self.table.reason(pid.serial, pid.slot, pid.os_pid)
                if internal:
                    self.internal[ref] = Down(ref, pid, reason)
                else:
                    self.mailbox.append(Down(ref, pid, reason))
                self._notify()
            else:
                w.monitors.add(ref)
                self.monitor_refs[ref] = pid.serial
        return ref

    def wait_down(self, refs: Any, timeout: float | None) -> Down | None:
        """Wait for the Down of any of the internal monitors ``refs`` (a container);
        take it and forget that monitor. None on timeout."""
        internal = self.internal

        def check() -> Any:
            for ref in refs:
                down = internal.get(ref)
                if down is not None:
                    del internal[ref]
                    return down
            return _NONE

        deadline = None if timeout is None else time.monotonic() + timeout
        result = self._wait(check, deadline)
        return None if result is _NONE else result  # type: ignore[no-any-return]

    def demonitor(self, ref: Ref, flush: bool) -> bool:
        with self.lock:
            self.internal.pop(ref, None)
            serial = self.monitor_refs.pop(ref, None)
            if serial is not None:
                w = self.watches.get(serial)
                if w is not None:
                    w.monitors.discard(ref)
                    self._maybe_unwatch(w)
                return True
            if flush:
                for i, m in enumerate(self.mailbox):
                    if m.__class__ is Down and m.ref == ref:
                        del self.mailbox[i]
                        self.removed += 1
                        break
            return False

    # ---------------------------------------------------------------- links

    def _add_link(self, pid: Pid, requested: bool) -> None:
        """Link to ``pid``: by our own ``link`` call (requested) or by the peer's request."""
        if pid.serial in self.links or pid == self.me:
            return
        if pid == self.info.main:
            self.links[pid.serial] = pid  # main traps exits and watches us itself
            return
        w = self._watch(pid)
        if w is not None:
            w.linked = True
            self.links[pid.serial] = pid
        elif requested:
            if not self.trap:
                raise NoProcError(pid, "link")
            self._linked_exit(pid, "noproc")
        else:
            # The peer linked to us and died before we read its request: OTP orders
            # the link before the exit, so we get its exit with the true reason.
            self._linked_exit(pid, self.table.reason(pid.serial, pid.slot, pid.os_pid))

    def link(self, pid: Pid) -> None:
        with self.lock:
            if pid.serial in self.links or pid == self.me:
                return
            self._add_link(pid, requested=True)
            if pid.serial in self.links:
                self._send(pid, (T_LINK, self.me))
            self._notify()

    def _drop_link(self, serial: int) -> None:
        self.links.pop(serial, None)
        w = self.watches.get(serial)
        if w is not None and w.linked:
            w.linked = False
            self._maybe_unwatch(w)

    def unlink(self, pid: Pid) -> None:
        with self.lock:
            if pid.serial in self.links:
                self._drop_link(pid.serial)
                self._send(pid, (T_UNLINK, self.me))

    def set_trap_exit(self, flag: bool) -> bool:
        with self.lock:
            old = self.trap
            if self.is_main:
                return True
            self.trap = bool(flag)
            self.table.set_trap(self.me.slot, self.trap)
            return old

    # ----------------------------------------------------------------- exits

    def _exit_signal(self, sender: Pid, reason: Any) -> None:
        if self.exiting:
            return
        if self.trap:
            self._queue_exit(Exit(sender, reason))
        elif reason == "kill":
            self.exit_process("killed", log_crash=False)
        elif reason != "normal":
            self.exit_process(reason, log_crash=False)

    def kill(self, pid: Pid, reason: Any) -> bool:
        """Make ``pid`` exit with ``reason`` now, whatever it is doing.

        The reason is written in the table first ("doomed"); then SIG_EXIT makes the
        process run its own exit path at once, so it passes the exit on to its own
        links; the root SIGKILLs it if it has not exited EXIT_GRACE seconds later (a
        long C call never returns to the interpreter to run the handler). Returns
        False if it was already dead or already being killed."""
        if not self.table.doom(pid.serial, pid.slot, reason):
            return False
        w = self.watches.get(pid.serial)
        try:
            if w is not None and w.child is None:
                signal.pidfd_send_signal(w.fd, SIG_EXIT)
            elif w is not None:
                os.kill(pid.os_pid, SIG_EXIT)  # our unreaped child: the pid is safe
            else:
                fd = os.pidfd_open(pid.os_pid)
                try:
                    signal.pidfd_send_signal(fd, SIG_EXIT)
                finally:
                    os.close(fd)
        except (ProcessLookupError, OSError):
            return False
        root = self.info.root
        if root is not None:
            if root == self.me:
                self.mailbox.append(("$escalate", pid))
            else:
                self._send(root, (T_MSG, ("$escalate", pid)))
        return True

    def exit(self, pid: Pid, reason: Any) -> None:
        """OTP's exit/2: send an exit signal with ``reason`` to ``pid``."""
        with self.lock:
            if pid == self.me:
                if reason == "kill" and not self.is_main:
                    self.exit_process("killed", log_crash=False)
                if self.trap:
                    self._queue_exit(Exit(self.me, reason))
                    self._notify()
                    return
                self.exit_process(reason, log_crash=False)
            if pid.node != self.node_id:
                return
            if pid == self.info.main:
                self._send(pid, (T_EXIT, self.me, reason))
                return
            if reason == "kill":
                self.kill(pid, "killed")
            elif self.table.is_trapping(pid.serial, pid.slot):
                self._send(pid, (T_EXIT, self.me, reason))
            elif reason != "normal":
                self.kill(pid, reason)

    def is_alive(self, pid: Pid) -> bool:
        if pid == self.me:
            return True
        if pid.node != self.node_id or pid.serial in self.dead:
            return False
        with self.lock:  # another thread could close the watch's descriptor
            w = self.watches.get(pid.serial)
            if w is not None:  # we watch it: its pidfd or sentinel is readable once dead
                return not _readable(w.fd, 0)
        if self.table.state(pid.serial, pid.slot) == _table.EXITED:
            return False
        # The slot says alive: the OS process is ours (not reaped), maybe a zombie.
        return _table.zombie_status(pid.os_pid) is None

    def exit_process(self, reason: Any, log_crash: bool = True) -> NoReturn:
        """End this runtime process with ``reason``: never returns.

        In order:

        1. read the control frames still queued (a link made just now counts);
        2. log the reason unless it is clean;
        3. pass the exit on to links: a linked process that does not trap exits is
           killed with ``reason`` (if abnormal); a linked *child* that traps exits
           gets the exit signal as a message, so it can run ``terminate``;
        4. stop the other children with reason ``"shutdown"``;
        5. wait (at most CHILD_EXIT_GRACE seconds) for the children to be gone, so
           each can pass its own exit on before the kernel's parent-death SIGKILL;
        6. drop our names, write our reason in the table, and exit.
        """
        code = 0 if reason == "normal" else 1
        self.exiting = True
        try:
            if self.is_main:
                raise ProcessError("the embedding process cannot exit through the runtime")
            # From here on no killer can doom us: links and monitors see one reason, the
            # killer's if it came first (then our parent must not reap it as a crash).
            stands = self.table.begin_exit(self.me.serial, self.me.slot, reason)
            if stands is not reason and stands != reason:
                reason, log_crash = stands, False
                code = 0 if reason == "normal" else 1
            if log_crash and not is_clean_exit(reason):
                _log_exit(self.me, reason)
            try:
                self._accept_all()
                for conn in list(self.handlers.values()):
                    if conn.__class__ is Conn:
                        self._read(conn, drain=True)
            except Exception:
                pass
            self._run_deferred()
            table = self.table
            main = self.info.main
            for pid in list(self.links.values()):
                if pid == main:
                    continue
                if table.is_trapping(pid.serial, pid.slot):
                    if pid.serial in self.children:
                        self._send(pid, (T_EXIT, self.me, reason))
                elif reason != "normal":
                    self.kill(pid, reason)
            for serial, w in list(self.children.items()):
                if not (w.linked and table.is_trapping(serial, w.pid.slot)):
                    self.kill(w.pid, "shutdown")
            self._wait_children_gone(CHILD_EXIT_GRACE)
            for w in list(self.children.values()):
                if self.watches.get(w.pid.serial) is w and self._child_exited(w):
                    self._on_death(w)
            self._run_deferred()
            from . import registry

            for name in list(self.names):
                registry.drop_name_of(self, name)
        except BaseException as exc:  # the process must end whatever happens here
            try:
                os.write(2, f"{self.me!r}: error while exiting: {exc!r}\n".encode())
            except BaseException:
                pass
        finally:
            try:
                os.unlink(self.info.sock_path(self.me.serial))
            except BaseException:
                pass
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except BaseException:
                    pass
            os._exit(code)

    def _wait_children_gone(self, grace: float) -> None:
        poller = select.poll()
        waiting = 0
        for w in self.children.values():
            poller.register(w.fd, select.POLLIN)
            waiting += 1
        deadline = time.monotonic() + grace
        while waiting:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            for fd, _ in poller.poll(remaining * 1000):
                poller.unregister(fd)
                waiting -= 1

    # --------------------------------------------------------------- teardown

    def prelink(self, pid: Pid, pidfd: int) -> None:
        """Link to ``pid`` in a node built for a child before the fork (``pidfd``: a pidfd
        of ``pid`` made for the child, -1 for the embedding process, which needs none)."""
        self.links[pid.serial] = pid
        if pidfd >= 0:
            w = Watch(pid, pidfd)
            w.linked = True
            self.watches[pid.serial] = w
            self.handlers[pidfd] = w
            self.epoll.register(pidfd, EPOLLIN)

    def release_in_parent(self) -> None:
        """Close, in the parent, the descriptors of a node built for a child."""
        for h in self.handlers.values():
            if h.__class__ is Conn:
                h.sock.close()
            elif h.__class__ is Watch and h.owns_fd:
                os.close(h.fd)
        self.listen.close()
        self.epoll.close()

    def fds(self) -> list[int]:
        """Every descriptor this node owns: its epoll, listening socket, connections,
        watches and readers, the sentinels of children not reaped yet, and its own
        sentinel's write end (the parent watches that one)."""
        out = [self.epoll.fileno(), self.listen.fileno()]
        out.extend(self.handlers)
        out.extend(self.extra_fds)
        for job in self.deferred:
            if job[0] == self._reap_child and job[2].sentinel is not None:
                out.append(job[2].sentinel)
        return out

    def abandon(self) -> None:
        """In a forked child: forget this (the parent's) node. Its Python objects are
        kept alive for good, so that no socket object ever closes a descriptor number
        the child has reused (the child closes the real descriptors itself)."""
        _graveyard.append(self)

    def close(self) -> None:
        """Release every descriptor (main process, at shutdown). Threads waiting in
        ``receive`` or ``call`` wake up and raise ProcessError."""
        with self.lock:
            self._run_deferred()
            self.closed = True
            self._notify()
            deadline = time.monotonic() + 2.0
            while self.polling and time.monotonic() < deadline:  # let the poller see it
                self.cond.wait(0.05)
            for fd, h in list(self.handlers.items()):
                cls = h.__class__
                if cls is Conn:
                    h.sock.close()
                elif (cls is Watch and h.owns_fd) or cls is Reader:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
            self.handlers.clear()
            self.watches.clear()
            self.out.clear()
            self.conns_of.clear()
            self.listen.close()
            self.epoll.close()
            self.wakefd = -1
            self.cond.notify_all()


_graveyard: list[Any] = []


def _code_and_status(status: Any) -> tuple[int, int]:
    """(si_code, si_status) from a waitid result or such a pair."""
    if hasattr(status, "si_code"):
        return status.si_code, status.si_status
    return status[0], status[1]


def _readable(fd: int, timeout: float) -> bool:
    """Is ``fd`` readable within ``timeout`` seconds? (poll: no FD_SETSIZE limit)"""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(timeout * 1000))


def on_exit_signal(signo: int, frame: Any) -> None:
    """SIG_EXIT handler of runtime processes: exit with the reason a killer wrote."""
    node = _current
    if node is None or node.exiting or node.is_main:
        return
    reason = node.table.doomed_reason(node.me.serial, node.me.slot)
    if reason is not None:
        node.exit_process(reason[0], log_crash=False)


def _log_exit(pid: Pid, reason: Any) -> None:
    if isinstance(reason, Crash):
        log.error("process %r crashed: %s\n%s", pid, reason, reason.traceback.rstrip())
    else:
        log.error("process %r exited: %r", pid, reason)


# ------------------------------------------------------------------ the current node

_current: Node | None = None
_start_lock = threading.Lock()
_foreign_fork = False


def current() -> Node:
    """This process's node; in the embedding process, start the node on first use."""
    node = _current
    if node is not None:
        return node
    if _foreign_fork:
        raise ProcessError(
            "this process was forked outside the runtime (os.fork or multiprocessing); "
            "start runtime processes with runtime.spawn instead"
        )
    with _start_lock:
        if _current is None:
            from . import _root

            set_current(_root.start_node())
        return _current  # type: ignore[return-value]


def current_or_none() -> Node | None:
    return _current


def set_current(node: Node | None) -> None:
    global _current
    _current = node


_forked_from: Node | None = None


def _after_fork_in_child() -> None:
    # A fork the runtime did not make (os.fork, a multiprocessing fork pool) must not
    # keep the node's descriptors: held open by such a child, the sentinel and the
    # connections of a runtime process would hide its death from its parent. Close
    # them (the node's objects are kept alive for good, so no object ever closes a
    # number reused later) and refuse runtime calls in that child. A runtime fork
    # takes the node (take_forked_from) and builds the child's own.
    global _current, _foreign_fork, _forked_from
    node = _current
    _current = None
    if node is None:
        return
    if forking:
        _forked_from = node
        return
    _foreign_fork = True
    _graveyard.append(node)
    keep = {node.table.fd}
    for fd in node.fds():
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


forking = False  # set by the runtime around its own os.fork() calls


def take_forked_from() -> Node | None:
    global _forked_from
    node, _forked_from = _forked_from, None
    return node


os.register_at_fork(after_in_child=_after_fork_in_child)
