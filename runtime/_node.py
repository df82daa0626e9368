"""Internal: the runtime's state in one OS process, and its single event loop.

Each OS process of a node has exactly one :class:`Node`: its own ``Pid``, its
mailbox, its connections to other processes (``_transport``), its watches on
other processes' deaths (``_watches``), and its exit path (``_exits``); those
modules are mixins of ``Node``, and ``_base`` holds the records they share.

Everything waits in one place, :meth:`Node._wait`: one ``epoll`` holds the
listening socket, every connection and every watch, registered once, so a
wake-up costs O(1) however many processes are watched. Nothing sleeps and polls.

The embedding (main) process may have threads. All state is guarded by one
lock; one thread at a time polls ("leader"), the others wait on a condition
over the same lock and are woken when the leader has queued something. Runtime
processes are single-threaded and wait in ``_wait_alone`` (no leader, no
condition).
"""

from __future__ import annotations

import _socket
import itertools
import mmap
import os
import pickle
import select
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from . import _table, _wire
from ._base import (
    _LISTEN,
    _NONE,
    _PENDING,
    DEFERRED_MAX,
    EPOLLIN,
    IDLE_CLEANUP,
    POLL_MAX,
    Conn,
    Handlers,
    NodeInfo,
    Reader,
    Watch,
    _readable,
    log,
)
from ._exits import Exits
from ._transport import Transport
from ._watches import Watches
from ._wire import T_EXIT, T_LINK, T_MSG, T_REPLY, T_UNLINK
from .errors import (
    CallTimeout,
    ExitError,
    NoProcError,
    ProcessError,
    ReceiveTimeout,
)
from .messages import Down, Exit
from .pid import Pid, Ref


def _time_left(deadline: float | None) -> float | None:
    """Seconds an epoll wait for ``deadline`` (monotonic; None = forever) may take:
    -1.0 for ever, None once the deadline has passed."""
    if deadline is None:
        return -1.0
    left = deadline - time.monotonic()
    return left if left > 0 else None


# Runtime processes are single-threaded: their nodes never wait on the condition.
_UNUSED_COND = threading.Condition()


class Node(Transport, Watches, Exits):
    """The runtime state of one OS process. See the module docstring."""

    def __init__(
        self,
        info: NodeInfo,
        me: Pid,
        listen: _socket.socket,
        table: _table.Table,
        *,
        is_main: bool,
    ) -> None:
        self._init_state(info, table, is_main)
        self._bind(me, listen)

    @classmethod
    def template(cls, info: NodeInfo, table: _table.Table) -> Node:
        """A node with nothing of its own yet, which a forked child makes its own
        (``bind_child``). A parent builds one and never touches it again: each child
        writes to its own copy, and the parent's pages stay unwritten, where a node
        built for each child would cost the parent copy-on-write faults to build and
        to free again."""
        node = cls.__new__(cls)
        node._init_state(info, table, False)
        return node

    def _init_state(self, info: NodeInfo, table: _table.Table, is_main: bool) -> None:
        self.info = info
        self.key = info.key
        self.node_id = info.node_id
        self.is_main = is_main
        self.table = table
        # A plain lock (its ``with`` runs in C) guards everything; the condition over it
        # is only waited on and notified in the embedding process, which has threads.
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock) if is_main else _UNUSED_COND
        self.polling = False
        self.mailbox: deque[Any] = deque()
        self.removed = 0  # how many messages were taken out of the middle of the mailbox
        self.exits_queued = 0
        self.replies: dict[int, Any] = {}
        self.handlers = Handlers()
        self.out: dict[int, Conn] = {}
        self.conns_of: dict[int, set[Conn]] = {}
        self.watches: dict[int, Watch] = {}
        self.monitor_refs: dict[Ref, int] = {}
        self.links: dict[int, Pid] = {}
        self.children: dict[int, Watch] = {}
        self.child_by_os_pid: dict[int, int] = {}
        self.trap = is_main
        self.names: set[str] = set()
        self.name_cache: dict[str, tuple[str, str, Pid]] = {}  # see registry.whereis
        # Serials this process has seen die, most recent last: a process whose Down we
        # delivered is dead to us even before its parent has reaped it.
        self.dead: dict[int, None] = {}
        self.refs = itertools.count(1)
        self.closed = False
        self.exiting = False
        self.exit_deadline = 0.0
        self.child_template: Node | None = None  # see template
        self.deferred: list[tuple[Any, ...]] = []  # cleanup jobs, see _poll_timeout
        self.cleanup_due = 0.0  # when the oldest of them must run, idle or not
        self.unproven: set[Conn] = set()  # accepted connections not past their HELLO yet
        self.rbuf: mmap.mmap | None = None
        self.suspects: list[int] = []  # peers whose connection closed: dying
        self.internal: dict[Ref, Down | None] = {}  # the runtime's own monitors
        # Downs of processes found dead by monitor() while another thread polls: that
        # thread queues them (see monitor).
        self.late_downs: list[tuple[Down, bool]] = []
        self.extra_fds: list[int] = []  # owned but not polled: our sentinel's write end
        self.reading = 0
        self.batch_whole = False  # see _process
        self.yield_from = 0.0  # see _child_exited
        self.root: Pid | None = None
        self.parent: Pid | None = None
        self.wakefd = -1

    def _bind(self, me: Pid, listen: _socket.socket) -> None:
        """Make the node this process's: its pid, listening socket and epoll."""
        self.me = me
        self.from_ = (me.node, me.serial, me.slot, me.os_pid)
        self.listen = listen
        listen.setblocking(False)
        self.epoll = select.epoll()
        self.epoll.register(listen.fileno(), EPOLLIN)
        self.handlers[listen.fileno()] = _LISTEN
        self.table.set_trap(me.slot, self.trap)
        # Threads of the embedding process wake the polling thread through this eventfd
        # when they queue something it may be waiting for.
        if self.is_main:
            self.wakefd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self.handlers[self.wakefd] = Reader(self.wakefd, self._drain_wake)
            self.epoll.register(self.wakefd, EPOLLIN)

    def bind_child(self, me: Pid, listen: _socket.socket, parent: Pid, parent_os_pid: int,
                   conn: _socket.socket, link: bool, link_to: Pid | None, trap: bool) -> None:
        """In a forked child, make the parent's template (``template``) its node."""
        self.trap = trap
        self.parent = parent
        self._bind(me, listen)
        self.adopt_conn(conn, parent)
        if link:
            self.prelink(parent, os.pidfd_open(parent_os_pid))
        if link_to is not None:
            self.prelink(link_to, -1)

    def _drain_wake(self) -> None:
        """The eventfd woke the polling thread: reset it, and queue the Downs that
        monitor() left to this thread, each after what its process sent."""
        try:
            os.eventfd_read(self.wakefd)
        except OSError:
            pass
        late, self.late_downs = self.late_downs, []
        for down, internal in late:
            if internal and down.ref not in self.internal:
                continue  # demonitored meanwhile
            self._drain_peer(down.pid.serial)
            self._queue_down(down, internal)

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
        if not self.is_main:
            return self._wait_alone(check, deadline)
        cond = self.cond
        lock = self.lock
        threaded = True
        with lock:
            while True:
                r = check()
                if r is not _NONE:
                    return r
                remaining = _time_left(deadline)
                if remaining is None:
                    return _NONE
                if self.closed:
                    raise ProcessError("the runtime node has been shut down")
                if self.polling:
                    cond.wait(None if remaining < 0 else remaining)
                    continue
                timeout = self._poll_timeout(remaining)
                self.polling = True
                lock.release()
                try:
                    events = self.epoll.poll(timeout, POLL_MAX)
                except BaseException:
                    lock.acquire()
                    self.polling = False
                    if threaded:
                        cond.notify_all()  # another thread must take over the polling
                    raise
                lock.acquire()
                self.polling = False
                try:
                    if self.closed:
                        raise ProcessError("the runtime node has been shut down")
                    if events:
                        self._process(events)
                    elif self.deferred:
                        self._clean_up_idle()
                finally:
                    cond.notify_all()  # wake the followers, even if processing raised

    def _process(self, events: list[tuple[int, int]]) -> None:
        handlers = self.handlers
        # Who each descriptor belonged to when the batch was read: handling one event
        # can close a descriptor and open another under the same number (an unlink
        # closes a pidfd, a link opens one), and the old event must not hit the new one.
        batch: list[tuple[int, Any]] = [(fd, handlers.get(fd)) for fd, _ in events]
        # A batch shorter than the most one poll returns holds every event that was
        # ready: a connection a dead peer made is then accepted already (_drain_peer).
        self.batch_whole = len(batch) < POLL_MAX
        try:
            self._handle(batch)
        finally:
            self.batch_whole = False

    def _handle(self, batch: list[tuple[int, Any]]) -> None:
        if len(batch) == 1:
            owner = batch[0][1]
            if owner.__class__ is Watch:  # one death alone: the common case, kept short
                alone = [owner]
                self._deaths(alone)
                if self.suspects:
                    self._check_suspects(alone)
                return
        handlers = self.handlers
        deaths: list[Watch] | None = None
        for _, owner in batch:
            if owner.__class__ is Watch:
                deaths = [w for _, w in batch if w.__class__ is Watch]
                break
        if deaths is not None:
            # Deaths first. What a dead process sent comes before its Down all the same
            # (_drain_peer reads it; connections it made are accepted just before), and
            # a message another process sent once it saw the death comes after the Down:
            # a supervisor asked about a child whose Down the asker has seen answers
            # without it.
            if any(owner is _LISTEN for _, owner in batch):
                self._accept_all()
            self._deaths(deaths)
        for fd, owner in batch:
            h: Any = handlers.get(fd)
            if h is None or h is not owner:
                continue
            cls = h.__class__
            if cls is Conn:
                self._read(h)
            elif cls is Watch:
                pass  # handled above
            elif h is _LISTEN:
                if deaths is None:  # else accepted above
                    self._accept_all()
            else:
                h.callback()
        if self.suspects:
            self._check_suspects(deaths)

    def _check_suspects(self, deaths: list[Watch] | None) -> None:
        """Peers whose connection closed are dying: handle the deaths that are ready."""
        more = []
        for serial in self.suspects:
            w = self.watches.get(serial)
            if w is not None and (deaths is None or w not in deaths) and (
                    w.child is not None or _readable(w.fd, 0)):
                more.append(w)
        self.suspects.clear()
        self._deaths(more)

    def _deaths(self, deaths: list[Watch]) -> None:
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
            events = self.epoll.poll(0, POLL_MAX)
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

        def check() -> Any:
            r = replies[ref]
            return _NONE if r is _PENDING else r

        try:
            r = self._wait(check, deadline)
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

    def _wait_alone(self, check: Callable[[], Any], deadline: float | None) -> Any:
        """_wait in a runtime process: one thread, so no leader and no condition, and
        the lock is held only while events are processed (a thread of the user's may
        still send)."""
        lock = self.lock
        epoll = self.epoll
        while True:
            r = check()
            if r is not _NONE:
                return r
            remaining = _time_left(deadline)
            if remaining is None:
                return _NONE
            timeout = remaining
            if self.deferred:
                with lock:
                    timeout = self._poll_timeout(remaining)
            events = epoll.poll(timeout, POLL_MAX)
            if events:
                with lock:
                    self._process(events)
            elif self.deferred:
                with lock:
                    self._clean_up_idle()

    def _poll_timeout(self, remaining: float) -> float:
        """How long a wait may block (lock held) before it runs the cleanup jobs: they
        wait for an idle moment (IDLE_CLEANUP without events), so that they do not hold
        up what is on its way (on one CPU, the Down of a process that is dying right
        now). A process that is never idle still cleans up: once the oldest job has
        waited CLEANUP_DUE, or DEFERRED_MAX are pending, each wait runs one first."""
        deferred = self.deferred
        if deferred and (len(deferred) >= DEFERRED_MAX or
                         time.monotonic() >= self.cleanup_due):
            self._run_oldest_job()
        if not deferred:
            return remaining
        return IDLE_CLEANUP if remaining < 0 or remaining > IDLE_CLEANUP else remaining

    def _run_oldest_job(self) -> None:
        job = self.deferred.pop(0)
        job[0](*job[1:])

    def _clean_up_idle(self) -> None:
        """Run the cleanup jobs (lock held), one at a time, while nothing arrives."""
        deferred = self.deferred
        while deferred:
            self._run_oldest_job()
            if deferred:
                events = self.epoll.poll(0, POLL_MAX)
                if events:
                    self._process(events)
                    self._notify()
                    return

    def _pop_first(self) -> Any:
        mailbox = self.mailbox
        if mailbox:
            self.removed += 1
            return mailbox.popleft()
        return _NONE

    def next_message(self) -> Any:
        """receive() without a match or timeout, for the GenServer loop."""
        if self.mailbox:
            self.removed += 1
            return self.mailbox.popleft()
        return self._wait(self._pop_first, None)

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
                reason = "noproc"
                if fresh and pid.node == self.node_id:
                    reason = self.table.reason(pid.serial, pid.slot, pid.os_pid)
                down = Down(ref, pid, reason)
                if self.polling and self.wakefd >= 0:
                    # What it sent before dying comes before its Down, and another
                    # thread is in the wait, the one that may read: that thread drains
                    # it, then queues the Down (_drain_wake).
                    self.late_downs.append((down, internal))
                    os.eventfd_write(self.wakefd, 1)
                else:
                    self._drain_peer(pid.serial)
                    self._queue_down(down, internal)
            else:
                w.monitors.add(ref)
                self.monitor_refs[ref] = pid.serial
        return ref

    def _queue_down(self, down: Down, internal: bool) -> None:
        if internal:
            self.internal[down.ref] = down
        else:
            self.mailbox.append(down)
        self._notify()

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
        return None if result is _NONE else result

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
                self.late_downs = [late for late in self.late_downs if late[0].ref != ref]
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

    # --------------------------------------------------------------- teardown

    def prelink(self, pid: Pid, pidfd: int) -> None:
        """Link to ``pid`` in a new child's node, before its function runs (``pidfd``: a
        pidfd of ``pid``, -1 for the embedding process, which needs none)."""
        self.links[pid.serial] = pid
        if pidfd >= 0:
            w = Watch(pid, pidfd)
            w.linked = True
            self.watches[pid.serial] = w
            self.handlers[pidfd] = w
            self.epoll.register(pidfd, EPOLLIN)

    def fds(self) -> list[int]:
        """Every descriptor this node owns: its epoll, listening socket, connections,
        watches and readers, the sentinels of children not reaped yet, and its own
        sentinel's write end (the parent watches that one)."""
        return [fd for lo, hi in runs(self.fd_bits()) for fd in range(lo, hi)]

    def fd_bits(self, copy: bool = True) -> bytearray:
        """``fds()`` as a bitmap (byte ``fd`` is 1 for each), built without walking the
        node's objects (see ``Handlers``). ``copy=False`` reuses the node's own bitmap:
        for a node that is never used again (a forked child's parent node)."""
        bits = bytearray(self.handlers.bits) if copy else self.handlers.bits
        more = [self.epoll.fileno(), self.listen.fileno(), *self.extra_fds]
        for job in self.deferred:
            if job[0] == self._reap_child and (job[2].sentinel or -1) >= 0:
                more.append(job[2].sentinel)
        top = max(more)
        if top >= len(bits):
            bits.extend(bytes(top + 1 - len(bits)))
        for fd in more:
            if fd >= 0:
                bits[fd] = 1
        return bits

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


def on_exit_signal(signo: int, frame: Any) -> None:
    """SIG_EXIT handler of runtime processes: exit with the reason a killer wrote."""
    node = _current
    if node is None or node.exiting or node.is_main:
        return
    reason = node.table.doomed_reason(node.me.serial, node.me.slot)
    if reason is not None:
        node.exit_process(reason[0], log_crash=False)


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


def runs(bits: bytearray) -> Iterator[tuple[int, int]]:
    """The runs of set bytes in ``bits``, as ``(first, past_last)``."""
    lo = bits.find(1)
    while lo >= 0:
        hi = bits.find(0, lo)
        if hi < 0:
            hi = len(bits)
        yield lo, hi
        lo = bits.find(1, hi)


def _after_fork_in_child() -> None:
    # A fork the runtime did not make (os.fork, a multiprocessing fork pool) must not
    # keep the node's descriptors: held open by such a child, the sentinel and the
    # connections of a runtime process would hide its death from its parent. Put
    # /dev/null in their place: the numbers stay taken, so an object of the old node
    # that closes its descriptor late (say at interpreter exit) cannot close a file
    # the child opened since. Runtime calls are refused in that child. A runtime fork
    # takes the node (take_forked_from) and builds the child's own.
    global _current, _foreign_fork
    node = _current
    if node is None:
        return
    if forking:
        forked_by_runtime()
        return
    _current = None
    _foreign_fork = True
    _graveyard.append(node)
    keep = {node.table.fd}
    try:
        null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        null = -1
    for fd in node.fds():
        if fd not in keep and fd != null:
            try:
                if null >= 0:
                    os.dup2(null, fd, inheritable=False)
                else:
                    os.close(fd)
            except OSError:
                pass
    if null >= 0:
        os.close(null)


forking = False  # set by the runtime around its own os.fork() calls


def forked_by_runtime() -> None:
    """In a child the runtime forked: the parent's node is handed to the child's start
    (take_forked_from), which closes its descriptors and builds the child's own."""
    global _current, _forked_from
    _forked_from, _current = _current, None


def take_forked_from() -> Node | None:
    global _forked_from
    node, _forked_from = _forked_from, None
    return node


os.register_at_fork(after_in_child=_after_fork_in_child)
