"""Internal: the records a node is made of, and the numbers it runs by.

See ``_node`` for the node itself. ``Conn`` is a connection to a peer, ``Watch``
the death of one watched process and who cares about it, ``Reader`` any other
descriptor the node's loop polls.
"""

from __future__ import annotations

import _socket
import logging
import select
import signal
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

from .messages import Down, Exit
from .pid import Pid, Ref

if TYPE_CHECKING:
    import mmap

    from ._table import Table

log = logging.getLogger("runtime")

_NONE = object()
_PENDING = object()
_LISTEN = object()

EPOLLIN = select.EPOLLIN
POLL_MAX = 1024  # events one epoll.poll returns at most
# The signal that makes a runtime process run its exit path (see Node.kill), and
# how long a process gets to do so before the root SIGKILLs it.
SIG_EXIT = signal.SIGRTMIN + 1
EXIT_GRACE = 0.25
# How long a process's exit path may take in all: passing its exit on to peers that
# do not read, and waiting for its children to finish their own exits.
CHILD_EXIT_GRACE = 1.0
READ_SIZE = 65536
# A parent woken by a child's death yields the CPU once for the child to finish
# its exit (see Watches._child_exited); a yield slower than YIELD_SLOW means other
# tasks wanted the CPU, and pauses yielding for YIELD_PAUSE.
YIELD_SLOW = 0.0005
YIELD_PAUSE = 1.0
# Cleanup jobs (reaping a dead child, removing its socket file) wait for an idle
# moment: this long without events. Once the oldest has waited CLEANUP_DUE, or
# DEFERRED_MAX are pending, each wait runs one whether idle or not.
IDLE_CLEANUP = 0.001
CLEANUP_DUE = 0.01
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
        return f"{self.dir}/{serial}"


class Handlers(dict[int, Any]):
    """The node's descriptors, each with what handles its events; beside the dict, a
    bitmap of the numbers. A forked child closes its parent's descriptors from the
    bitmap alone: walking the dict would touch one object per descriptor, and each
    page touched in the inherited heap costs the child a copy-on-write fault."""

    __slots__ = ("bits",)

    def __init__(self) -> None:
        super().__init__()
        self.bits = bytearray()

    def __setitem__(self, fd: int, handler: Any) -> None:
        bits = self.bits
        if fd >= len(bits):
            bits.extend(bytes(fd + 1 - len(bits) + 256))
        bits[fd] = 1
        dict.__setitem__(self, fd, handler)

    def __delitem__(self, fd: int) -> None:
        dict.__delitem__(self, fd)
        self.bits[fd] = 0

    def pop(self, fd: int, *default: Any) -> Any:
        if dict.__contains__(self, fd):
            self.bits[fd] = 0
        return dict.pop(self, fd, *default)

    def clear(self) -> None:
        dict.clear(self)
        self.bits = bytearray()

    def drop(self, fd: int, owner: Any, epoll: select.epoll) -> None:
        """Stop polling ``fd`` if ``owner`` still handles it (once closed, its number
        may belong to another)."""
        if dict.get(self, fd) is owner:
            dict.__delitem__(self, fd)
            self.bits[fd] = 0
            try:
                epoll.unregister(fd)
            except (OSError, ValueError):
                pass


class Conn:
    """One Unix stream connection to a peer process."""

    __slots__ = ("sock", "fd", "peer", "inbuf", "outbuf")

    def __init__(self, sock: _socket.socket, peer: Pid | None) -> None:
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


class NodeState:
    """What a node's mixins (``_transport``, ``_watches``, ``_exits``) share: the
    node's attributes (set in ``Node.__init__``) and, for type checkers, the methods
    one mixin calls on another. Nothing at run time."""

    info: NodeInfo
    key: bytes
    node_id: int
    me: Pid
    is_main: bool
    table: Table
    listen: _socket.socket
    epoll: select.epoll
    lock: threading.Lock
    cond: threading.Condition
    polling: bool
    mailbox: deque[Any]
    removed: int
    exits_queued: int
    replies: dict[int, Any]
    handlers: Handlers
    out: dict[int, Conn]
    conns_of: dict[int, set[Conn]]
    watches: dict[int, Watch]
    monitor_refs: dict[Ref, int]
    links: dict[int, Pid]
    children: dict[int, Watch]
    child_by_os_pid: dict[int, int]
    trap: bool
    names: set[str]
    dead: dict[int, None]
    exiting: bool
    exit_deadline: float
    deferred: list[tuple[Any, ...]]
    cleanup_due: float
    yield_from: float
    unproven: set[Conn]
    rbuf: mmap.mmap | None
    reading: int
    batch_whole: bool
    suspects: list[int]
    internal: dict[Ref, Down | None]
    late_downs: list[tuple[Down, bool]]
    extra_fds: list[int]

    if TYPE_CHECKING:
        def _notify(self) -> None: ...
        def _process(self, events: list[tuple[int, int]]) -> None: ...
        def _dispatch(self, conn: Conn, payload: memoryview) -> None: ...
        def _accept_all(self) -> list[Conn]: ...
        def _read(self, conn: Conn, drain: bool = False) -> None: ...
        def _close_conn(self, conn: Conn) -> None: ...
        def _conn_to(self, pid: Pid) -> Conn | None: ...
        def adopt_conn(self, sock: _socket.socket, peer: Pid) -> Conn: ...
        def _write(self, conn: Conn, data: bytes) -> bool: ...
        def _send(self, pid: Pid, obj: Any) -> bool: ...
        def _watch(self, pid: Pid) -> Watch | None: ...
        def _remove_watch(self, w: Watch) -> None: ...
        def prepare_child(self, pid: Pid, sentinel: int, conn_sock: _socket.socket,
                          link: bool) -> Watch: ...
        def child_started(self, w: Watch, popen: Any) -> None: ...
        def _drain_peer(self, serial: int, os_pid: int = 0) -> None: ...
        def _child_exited(self, w: Watch) -> Any: ...
        def _on_death(self, w: Watch) -> None: ...
        def _run_deferred(self) -> None: ...
        def _queue_exit(self, msg: Exit) -> None: ...
        def kill(self, pid: Pid, reason: Any) -> bool: ...
        def exit_process(self, reason: Any, log_crash: bool = True) -> NoReturn: ...
        def _wait_children_gone(self, grace: float) -> None: ...
