"""Internal: a node's connections to its peers.

Every process listens on a Unix stream socket named after its serial in the
node's directory. A sender connects once (outside the node's lock: a peer's
full listen backlog holds up only the thread that connects), proves the node
key (see ``_wire``), and keeps the connection; a connection carries frames both
ways, but a process sends to a peer on one connection only, so that messages
from one process to another stay in order. A parent and its child share a
socketpair made at spawn. An observer's connection (``python -m runtime top``, see ``_wire``)
carries INFO frames only, answered on that connection.

Writes never block: what the kernel does not take at once waits in the
connection's queue of buffers, written as the socket drains (``EPOLLOUT``), in
time linear in its size. A thread that needs its frame to be gone waits through
the poller, which keeps reading meanwhile, so two processes that write to each
other cannot deadlock.
"""

from __future__ import annotations

import logging
import mmap
import socket
from collections import deque
from collections.abc import Callable
from itertools import islice

from . import _wire
from ._poller import EPOLLIN, EPOLLOUT, Poller
from .pid import Pid

log = logging.getLogger("runtime")

READ_SIZE = 65536
_IOV_MAX = 64
_length = _wire.LENGTH.unpack_from


def _read_buffer() -> memoryview:
    """A buffer for reads, anonymous memory: only the pages a read fills count."""
    return memoryview(mmap.mmap(-1, READ_SIZE))


class Conn:
    """One connection to a peer (``peer`` is None until its HELLO is checked)."""

    __slots__ = ("sock", "fd", "peer", "observer", "inbuf", "out", "queued", "sent",
                 "closed")

    def __init__(self, sock: socket.socket, peer: Pid | None) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.observer = False  # the peer is an observer (see _wire), once proven
        self.inbuf = bytearray()  # the start of a frame not yet whole
        self.out: deque[memoryview] = deque()  # what the kernel has not taken yet
        self.queued = 0  # bytes ever put in ``out``
        self.sent = 0  # bytes of those written since
        self.closed = False


class _Listener:
    """The owner of the listening socket in the poller."""

    __slots__ = ("sock",)

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock


OnFrame = Callable[[Pid, int, memoryview], None]


class Connections:
    """See the module docstring. Every method runs with the node's lock held, except
    :meth:`connect`."""

    def __init__(self, poller: Poller, key: bytes, me: Pid, sock_path: Callable[[int], str],
                 listen: socket.socket, on_frame: OnFrame,
                 on_closed: Callable[[Pid], None], serial_in: Callable[[int], int]) -> None:
        self._poller = poller
        self._key = key
        self._me = me
        self._sock_path = sock_path
        self._on_frame = on_frame
        self._on_closed = on_closed
        listen.setblocking(False)
        self.listener = _Listener(listen)
        poller.add(listen.fileno(), self.listener)
        self._out: dict[int, Conn] = {}  # serial -> the connection we send on
        self._of: dict[int, set[Conn]] = {}  # serial -> every connection with it
        self._unproven: set[Conn] = set()
        self._made = 0  # connections we made (numbers their HELLOs)
        # serial -> (its slot, the numbers of its HELLOs we accepted): each is accepted
        # once. Kept while the slot holds that serial (``serial_in(slot)``): a slot
        # is reused only 65,536 processes later, long after its last HELLO was read.
        self._hellos: dict[int, tuple[int, set[int]]] = {}
        self._prune_at = 1024
        self._serial_in = serial_in
        self._rview: memoryview | None = None  # the read buffer, while no read holds it

    # ------------------------------------------------------------ connections

    def accept_all(self) -> list[Conn]:
        """Accept every connection waiting; the new ones."""
        listen = self.listener.sock
        new: list[Conn] = []
        while True:
            try:
                sock, _ = listen.accept()
            except (BlockingIOError, InterruptedError):
                return new
            except OSError:
                return new
            sock.setblocking(False)
            conn = Conn(sock, None)
            self._poller.add(conn.fd, conn)
            self._unproven.add(conn)
            new.append(conn)

    def out_to(self, serial: int) -> Conn | None:
        """The connection we send to ``serial`` on, if there is one."""
        return self._out.get(serial)

    def connect(self, pid: Pid, timeout: float | None = None) -> socket.socket | None:
        """Connect to ``pid``'s socket (lock NOT held: this may block while its listen
        backlog is full, up to ``timeout`` seconds if given). None if it is not there
        (it exited), or its backlog stayed full."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if timeout is not None:
            sock.settimeout(timeout)
        try:
            sock.connect(self._sock_path(pid.serial))
        except OSError:
            sock.close()
            return None
        return sock

    def adopt(self, sock: socket.socket, peer: Pid, *, hello: bool) -> Conn:
        """Send to ``peer`` on ``sock`` (one we connected, with ``hello``, or a socketpair
        made at spawn). If another thread connected meanwhile, its connection stays
        the one used and ``sock`` is closed."""
        conn = self._out.get(peer.serial)
        if conn is not None:
            sock.close()
            return conn
        sock.setblocking(False)
        conn = Conn(sock, peer)
        self._poller.add(conn.fd, conn)
        self._out[peer.serial] = conn
        self._of.setdefault(peer.serial, set()).add(conn)
        if hello:
            self._made += 1
            self.write(conn, [_wire.hello(self._key, self._me, peer.serial, self._made)])
        return conn

    def close(self, conn: Conn) -> None:
        if conn.closed:
            return
        conn.closed = True
        self._unproven.discard(conn)
        self._poller.remove(conn.fd, conn)
        peer = conn.peer
        if peer is not None:
            if self._out.get(peer.serial) is conn:
                del self._out[peer.serial]
            of = self._of.get(peer.serial)
            if of is not None:
                of.discard(conn)
                if not of:
                    del self._of[peer.serial]
        if conn.out:
            conn.out.clear()
            self._poller.notify()  # (a thread may wait for a write to it to end)
        conn.sock.close()

    def close_peer(self, serial: int) -> None:
        """Close every connection with the process ``serial`` (it died)."""
        for conn in list(self._of.get(serial, ())):
            self.close(conn)

    def abandon(self) -> None:
        """Close the sockets, and nothing else: see ``Node.abandon``."""
        self.listener.sock.close()
        for of in self._of.values():
            for conn in of:
                conn.closed = True
                conn.sock.close()

    def all(self) -> list[Conn]:
        return [c for c in self._unproven] + [c for of in self._of.values() for c in of]

    # ---------------------------------------------------------------- reading

    def read(self, conn: Conn, drain: bool = False) -> None:
        """Read what ``conn`` has (all of it with ``drain``) and hand over whole frames."""
        if conn.closed:
            return  # (closed earlier in the same batch: a failed write, say)
        # The read buffer is taken while its frames are handed over: a read made by a
        # frame's handler makes one of its own (and one lost to an exception is made
        # again).
        view = self._rview
        if view is None:
            view = _read_buffer()
        else:
            self._rview = None
        sock = conn.sock
        while True:
            try:
                n = sock.recv_into(view)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                n = 0
            if not n:
                self._closed_by_peer(conn, drain)
                break
            if conn.inbuf:
                self._more(conn, view, n)
            else:
                # Frames straight from the read buffer; only a partial one is copied.
                used = self._frames(conn, view, n)
                if used < n and not conn.closed:
                    conn.inbuf += view[used:n]
            if conn.closed or (n < READ_SIZE and not drain):
                break
        self._rview = view

    def _more(self, conn: Conn, view: memoryview, n: int) -> None:
        """``view[:n]`` continues the partial frame in ``conn.inbuf``: hand over what is
        whole now."""
        inbuf = conn.inbuf
        inbuf += view[:n]
        whole = memoryview(inbuf)
        try:
            used = self._frames(conn, whole, len(inbuf))
        finally:
            whole.release()
        del inbuf[:used]

    def _closed_by_peer(self, conn: Conn, drain: bool) -> None:
        """``conn`` read its end of file: the peer closed it, that is, it is dying."""
        peer = conn.peer
        self.close(conn)
        if not drain and peer is not None and not conn.observer:
            self._on_closed(peer)

    def _frames(self, conn: Conn, view: memoryview, end: int) -> int:
        """Hand over the whole frames at the start of ``view[:end]``; how many bytes
        they took."""
        peer = conn.peer
        if peer is None or conn.observer:
            return self._frames_unproven(conn, view, end)
        on_frame = self._on_frame
        pos = 0
        while end - pos >= 4:
            stop = pos + 4 + _length(view, pos)[0]
            if stop > end:
                break
            on_frame(peer, view[pos + 4], view[pos + 5 : stop])
            pos = stop
            if conn.closed:
                break
        return pos

    def _frames_unproven(self, conn: Conn, view: memoryview, end: int) -> int:
        """``_frames`` for a connection whose peer is not proven yet (its first frame
        is a HELLO), or is an observer; once a HELLO proves a process, the frames after
        it go to ``_frames``."""
        pos = 0
        while end - pos >= 4:
            if conn.peer is not None and not conn.observer:
                rest = view[pos:end]
                return pos + self._frames(conn, rest, end - pos)
            stop = pos + 4 + _length(view, pos)[0]
            if stop > end:
                break
            self._unproven_frame(conn, view[pos + 4 : stop])
            pos = stop
            if conn.closed:
                break
        return pos

    def _unproven_frame(self, conn: Conn, frame: memoryview) -> None:
        """A frame from a connection whose peer is not proven (its HELLO), or is an
        observer (its INFO frames)."""
        if conn.peer is None:
            self._hello(conn, frame)
        elif frame[0] == _wire.INFO:
            self._on_frame(conn.peer, frame[0], frame[1:])
        else:
            # An observer only looks (see _wire): it takes no part in the node.
            log.warning("%r closed an observer's connection: it sent a frame other "
                        "than INFO", self._me)
            self.close(conn)

    def _hello(self, conn: Conn, body: memoryview) -> None:
        peer = _wire.check_hello(self._key, conn.sock, self._me.serial, body)
        if peer is None:
            log.warning("%r rejected a connection that did not prove the node key", self._me)
            self.close(conn)
            return
        serial, slot, os_pid, n = peer
        seen = self._hellos.get(serial)
        if seen is None:
            if len(self._hellos) >= self._prune_at:
                self._prune_hellos()
            seen = self._hellos[serial] = (slot, set())
        if n in seen[1]:
            log.warning("%r rejected a connection that replayed a handshake", self._me)
            self.close(conn)
            return
        seen[1].add(n)
        self._unproven.discard(conn)
        conn.peer = Pid(self._me.node, serial, slot, os_pid)
        conn.observer = _wire.is_observer(serial)
        self._of.setdefault(serial, set()).add(conn)
        self._out.setdefault(serial, conn)

    def _prune_hellos(self) -> None:
        """Forget the HELLOs of processes whose table slot went to another process."""
        serial_in = self._serial_in
        self._hellos = {serial: seen for serial, seen in self._hellos.items()
                        if serial_in(seen[0]) == serial}
        self._prune_at = max(1024, 2 * len(self._hellos))

    def drain_peer(self, serial: int, os_pid: int, accepted: bool = False) -> None:
        """Read everything the process ``serial`` (OS pid ``os_pid``) sent before it
        died, so that it comes before its Down: its connections, and the ones it
        made that are still waiting to be accepted or proven. Another process's new
        connection is read in its turn, after the Down, as it may carry what that
        process sent once it had seen the same death. ``accepted``: the caller knows
        its connections are accepted already."""
        if not accepted:
            self.accept_all()
        for conn in list(self._unproven):
            try:
                if _wire.peer_os_pid(conn.sock) != os_pid:
                    continue
            except OSError:
                pass
            self.read(conn, drain=True)
        for conn in list(self._of.get(serial, ())):
            self.read(conn, drain=True)

    def drain_all(self) -> None:
        """Read whatever every connection has (the exit path)."""
        self.accept_all()
        for conn in self.all():
            self.read(conn, drain=True)

    # ---------------------------------------------------------------- writing

    def write(self, conn: Conn, buffers: list[bytes]) -> int:
        """Queue ``buffers`` (one frame) on ``conn`` and write what the kernel takes now.
        Returns the value ``conn.sent`` reaches once the frame is written; check it
        with :meth:`written`."""
        out = conn.out
        if conn.closed:
            return 0
        if not out and len(buffers) == 1:  # the common case: nothing queued, one buffer
            data = buffers[0]
            try:
                n = conn.sock.send(data)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError:
                self.close(conn)
                return 0
            if n == len(data):
                return conn.queued
            conn.queued += len(data) - n
            out.append(memoryview(data)[n:])
        else:
            was_idle = not out
            for data in buffers:
                conn.queued += len(data)
                out.append(memoryview(data))
            if was_idle:
                self.flush(conn)
                if conn.closed or not out:
                    return conn.queued
        self._poller.modify(conn.fd, EPOLLIN | EPOLLOUT)
        return conn.queued

    def flush(self, conn: Conn) -> None:
        """Write what the kernel takes of ``conn``'s queue (on EPOLLOUT)."""
        out = conn.out
        sock = conn.sock
        while out:
            try:
                if len(out) == 1:
                    n = sock.send(out[0])
                else:
                    n = sock.sendmsg(list(islice(out, _IOV_MAX)))
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.close(conn)
                return
            conn.sent += n
            while n:
                head = out[0]
                if n >= len(head):
                    n -= len(head)
                    out.popleft()
                else:
                    out[0] = head[n:]
                    n = 0
        if not conn.closed:
            self._poller.modify(conn.fd, EPOLLIN)

    @staticmethod
    def written(conn: Conn, mark: int) -> bool:
        """Has the frame whose :meth:`write` returned ``mark`` left ``conn`` (or has the
        connection closed)?"""
        return conn.sent >= mark or conn.closed
