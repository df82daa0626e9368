"""Internal: the records a node is made of, and the numbers it runs by.

See ``_node`` for the node itself. ``Conn`` is a connection to a peer, ``Watch``
the death of one watched process and who cares about it, ``Reader`` any other
descriptor the node's loop polls.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
from dataclasses import dataclass
from typing import Any, Callable

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
