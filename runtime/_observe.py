"""Internal: looking at a running node from outside it, without joining it.

What ``python -m runtime top`` (``runtime.top``) stands on. An observer is a
program run by the node's owner, in another terminal; it is no process of the
node: it takes no table slot, makes no socket or name, and leaves nothing in the
node's directory (a killed observer leaves nothing either: its connections close
with it).

- **Finding nodes.** A node is a directory ``rt-<OS pid of its embedding
  process>-<random>`` in the node directory base (``/dev/shm`` by default, see
  ``runtime.configure(node_dir=)`` and ``RUNTIME_NODE_DIR``), alive as long as
  its ``lock`` file is ``flock``-held (see ``_embed``).
- **Proving it may look.** The node's key is in its directory, which only its
  owner can read (``_wire``). The observer connects to each process's socket and
  proves the key with an observer identity (``_wire.observer``): the process
  answers its INFO frames, and nothing else.
- **What it sees.** The process table (mapped read-only) says which processes
  live and their OS pids; the ``names`` directory, their registered names; psutil,
  their memory; the INFO reply, what each process's runtime holds (``Node.state``):
  parent, status, message queue, monitors, links. A process busy in its own code
  does not answer in time: it is shown as ``"running"``, the rest unknown, as
  ``runtime.info`` does.
"""

from __future__ import annotations

import fcntl
import io
import itertools
import os
import pickle
import select
import socket
import stat
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from . import _config, _embed, _names, _table, _wire
from .pid import Pid

__all__ = ["NodeNotFound", "Observer", "ObserveError", "Row", "find_node", "live_nodes",
           "node_base"]

_REPLY_HEAD = 1 + _wire.REF_FIELD.size  # tag, ref
# A reply bigger than this is no INFO reply (a process's state is a few Pids).
_MAX_FRAME = 1 << 24
_PEERCRED = struct.Struct("3i")  # pid, uid, gid


class ObserveError(Exception):
    """The node cannot be observed (gone, or not the caller's)."""


class NodeNotFound(ObserveError):
    """No live node matches what was asked, or several do and none was named
    (``candidates`` lists the live ones)."""

    def __init__(self, message: str, candidates: list[str] | None = None) -> None:
        super().__init__(message)
        self.candidates = candidates or []


_numbers = itertools.count(1)  # this process's observer connections


# ------------------------------------------------------------------ finding nodes


def node_base() -> str:
    """Where this user's nodes are made (``runtime.configure(node_dir=)``,
    ``RUNTIME_NODE_DIR``, else ``/dev/shm``)."""
    return _embed.base_dir(_config.current().node_dir)


def is_live(node_dir: str) -> bool:
    """True if the node in ``node_dir`` is alive: its lock file is held."""
    try:
        fd = os.open(os.path.join(node_dir, "lock"), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True  # held (shared) by the node's processes
    finally:
        os.close(fd)  # (releases the lock if we took it: a dead node, left as it is)
    return False


def main_os_pid(node_dir: str) -> int | None:
    """The OS pid of the node's embedding process, from its directory's name."""
    parts = os.path.basename(node_dir.rstrip("/")).split("-")
    if len(parts) >= 3 and parts[0] == "rt" and parts[1].isdigit():
        return int(parts[1])
    return None


def live_nodes(base: str | None = None) -> list[str]:
    """The directories of the caller's live nodes in ``base`` (default
    :func:`node_base`), oldest first."""
    base = node_base() if base is None else base
    found = [(st.st_mtime, path) for path, st in _embed.node_dirs(base)
             if stat.S_ISDIR(st.st_mode) and is_live(path)]
    return [path for _, path in sorted(found)]


def find_node(spec: str | None, base: str | None = None) -> str:
    """The directory of the live node ``spec`` names: its directory (a path or the
    name ``rt-...``) or its embedding process's OS pid; with no ``spec``, the only
    live node.

    Raises:
        NodeNotFound: no live node matches, or several do.
    """
    base = node_base() if base is None else base
    nodes = live_nodes(base)
    if spec is None:
        if len(nodes) == 1:
            return nodes[0]
        if not nodes:
            raise NodeNotFound(f"no live node of yours in {base}")
        raise NodeNotFound(f"{len(nodes)} live nodes in {base}: name one with --node",
                           nodes)
    if os.sep in spec and os.path.isdir(spec):
        path = os.path.abspath(spec)
        if is_live(path):
            return path
        raise NodeNotFound(f"{spec} is not a live node", nodes)
    matches = [n for n in nodes if os.path.basename(n) == spec
               or (spec.isdigit() and main_os_pid(n) == int(spec))]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise NodeNotFound(f"no live node {spec!r} in {base}", nodes)
    raise NodeNotFound(f"{len(matches)} live nodes match {spec!r}: name one by its "
                       "directory", matches)


# --------------------------------------------------------------------- observing


@dataclass
class Row:
    """One process as an observer sees it. What only the process's runtime knows
    (``parent`` aside) is None when it did not answer in time."""

    pid: Pid
    os_pid: int
    names: list[str]
    parent: Pid | None
    status: str  # "waiting", "running", "exiting" (or "refused": the key was wrong)
    message_queue_len: int | None
    monitors: list[Pid] | None
    links: list[Pid] | None
    memory: int | None  # bytes: USS, or RSS where USS cannot be read
    memory_kind: str  # "uss" or "rss"
    children: list[Row] = field(default_factory=list)


class _StateUnpickler(pickle.Unpickler):
    """An INFO reply holds plain values and Pids: nothing else is loaded."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "runtime.pid" and name == "Pid":
            return Pid
        raise pickle.UnpicklingError(f"unexpected {module}.{name} in an INFO reply")


class _Peer:
    """The observer's connection to one process."""

    __slots__ = ("pid", "sock", "greeted", "inbuf", "pending", "state", "refused")

    def __init__(self, pid: Pid, sock: socket.socket) -> None:
        self.pid = pid
        self.sock = sock
        self.greeted = False  # our HELLO is sent
        self.inbuf = bytearray()
        self.pending: int | None = None  # the ref of the INFO not answered yet
        self.state: dict[str, Any] | None = None
        self.refused = False  # closed by the process: the key was not proven


class Observer:
    """Looks at the node in ``node_dir`` (see the module docstring). ``key``: the
    node's key, read from the directory by default.

    Raises:
        ObserveError: the node is gone, or its key cannot be read (not the caller's).
    """

    def __init__(self, node_dir: str, key: bytes | None = None) -> None:
        self.dir = node_dir
        try:
            self._key = _wire.load_key(node_dir) if key is None else key
            self._table = _table.Table(os.path.join(node_dir, "table"), readonly=True)
        except PermissionError as exc:
            raise ObserveError(f"cannot read the node's key or table in {node_dir} ({exc}): "
                               "only the node's owner may observe it") from None
        except OSError as exc:
            raise ObserveError(f"no node in {node_dir} ({exc})") from None
        self._names = _names.Names(node_dir, Pid(0, 0, 0, 0), self._is_alive)
        self._peers: dict[int, _Peer] = {}  # serial -> its connection
        self._refs = itertools.count(1)

    def __enter__(self) -> Observer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for peer in self._peers.values():
            peer.sock.close()
        self._peers.clear()
        self._table.close()

    def is_live(self) -> bool:
        return is_live(self.dir)

    def _is_alive(self, pid: Pid) -> bool:
        if self._table.state(pid.serial, pid.slot) == _table.EXITED:
            return False
        return _table.zombie_status(pid.os_pid, exiting=True) is None

    def processes(self) -> list[Pid]:
        """The node's live processes, in start order."""
        return [pid for pid in (Pid(0, serial, slot, os_pid)
                                for serial, slot, os_pid in sorted(self._table.live_slots())
                                if os_pid)
                if self._is_alive(pid)]

    def snapshot(self, timeout: float) -> list[Row]:
        """Every live process of the node, as a forest: the rows without a live
        parent, each with its ``children`` (in start order). Blocks up to ``timeout``
        seconds for the processes' answers."""
        pids = self.processes()
        states = self.ask(pids, timeout)
        names: dict[int, list[str]] = {}
        for name, holder in self._names.registered():
            names.setdefault(holder.serial, []).append(name)
        doomed = {pid.serial for pid in pids
                  if self._table.state(pid.serial, pid.slot) == _table.DOOMED}
        by_os_pid = {pid.os_pid: pid for pid in pids}
        rows: dict[int, Row] = {}
        for pid in pids:
            state = states.get(pid.serial)
            if state is None and not self._is_alive(pid):
                continue  # it died while we asked
            memory, kind = _memory(pid.os_pid)
            row = Row(pid, pid.os_pid, sorted(names.get(pid.serial, [])), None, "running",
                      None, None, None, memory, kind)
            if isinstance(state, dict):
                row.parent = state.get("parent")  # (None: the embedding process)
                row.status = state.get("status", "running")
                row.message_queue_len = state.get("message_queue_len")
                row.monitors = state.get("monitors")
                row.links = state.get("links")
            else:
                # The OS tree mirrors the node's (see runtime.process).
                row.parent = by_os_pid.get(_os_parent(pid.os_pid) or -1)
                if state == "refused":
                    row.status = "refused"
            if pid.serial in doomed:
                row.status = "exiting"
            rows[pid.serial] = row
        roots = []
        for row in rows.values():
            parent = rows.get(row.parent.serial) if row.parent is not None else None
            if parent is None or parent is row:
                roots.append(row)
            else:
                parent.children.append(row)
        return roots

    def ask(self, pids: list[Pid], timeout: float) -> dict[int, Any]:
        """Send an INFO to each of ``pids`` (one at a time per process: one still
        unanswered is not asked again) and wait up to ``timeout`` seconds for the
        answers. serial -> its state, or ``"refused"``; a process missing did not
        answer in time (or died)."""
        deadline = time.monotonic() + timeout
        wanted = {pid.serial for pid in pids}
        for serial in [s for s in self._peers if s not in wanted]:
            self._drop(serial)
        out: dict[int, Any] = {}
        waiting: dict[int, _Peer] = {}
        for pid in pids:
            peer = self._peers.get(pid.serial)
            if peer is None:
                peer = self._connect(pid, max(0.0, deadline - time.monotonic()))
                if peer is None:
                    continue
            if peer.pending is None:
                peer.pending = next(self._refs)
                peer.state = None
                frame = b"".join(_wire.info(peer.pending))
                if not peer.greeted:  # the HELLO and the first INFO in one write
                    number = next(_numbers)  # (per process: each HELLO is used once)
                    frame = _wire.hello(self._key, _wire.observer(number),
                                        pid.serial, number) + frame
                    peer.greeted = True
                try:
                    peer.sock.sendall(frame)
                except OSError:
                    # Closed by the process: it rejected our HELLO, or it died.
                    if self._is_alive(pid):
                        out[pid.serial] = "refused"
                    self._drop(pid.serial)
                    continue
            waiting[peer.sock.fileno()] = peer
        poller = select.poll()
        for fd in waiting:
            poller.register(fd, select.POLLIN)
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for fd, _ in poller.poll(left * 1000):
                peer = waiting[fd]
                if self._read(peer):
                    continue
                poller.unregister(fd)
                del waiting[fd]
                if peer.refused:
                    out[peer.pid.serial] = "refused"
                    self._drop(peer.pid.serial)
                elif peer.state is not None:
                    out[peer.pid.serial] = peer.state
        return out

    def _connect(self, pid: Pid, timeout: float) -> _Peer | None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(max(timeout, 0.001))  # a full listen backlog: give up in time
        try:
            sock.connect(os.path.join(self.dir, str(pid.serial)))
            # The socket is in our own directory, but check who listens all the same:
            # a reply is unpickled.
            if _peer_uid(sock) != os.getuid():
                raise OSError("the socket belongs to another user")
        except OSError:
            sock.close()
            return None
        sock.settimeout(0.0)  # (non-blocking, sendall included: the frames are small)
        peer = _Peer(pid, sock)
        self._peers[pid.serial] = peer
        return peer

    def _drop(self, serial: int) -> None:
        peer = self._peers.pop(serial, None)
        if peer is not None:
            peer.sock.close()

    def _read(self, peer: _Peer) -> bool:
        """Read what ``peer`` sent; True while its answer is still awaited."""
        try:
            data = peer.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            data = b""
        if not data:
            # The process closed the connection: it rejected our HELLO, or it died.
            peer.refused = peer.pending is not None and self._is_alive(peer.pid)
            peer.pending = None
            if not peer.refused:
                self._drop(peer.pid.serial)
            return False
        buf = peer.inbuf
        buf += data
        while len(buf) >= 4:
            size = _wire.LENGTH.unpack_from(buf)[0]
            if size > _MAX_FRAME:
                self._drop(peer.pid.serial)
                return False
            if len(buf) < 4 + size:
                break
            frame = bytes(buf[4 : 4 + size])
            del buf[: 4 + size]
            if size < _REPLY_HEAD or frame[0] != _wire.REPLY:
                continue
            if _wire.REF_FIELD.unpack_from(frame, 1)[0] != peer.pending:
                continue  # (cannot happen: one INFO at a time)
            peer.pending = None
            try:
                state = _StateUnpickler(io.BytesIO(frame[_REPLY_HEAD:])).load()
            except Exception:
                state = None
            peer.state = state if isinstance(state, dict) else None
            return False
        return True


def _peer_uid(sock: socket.socket) -> int:
    cred = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    uid: int = _PEERCRED.unpack(cred)[1]
    return uid


def _memory(os_pid: int) -> tuple[int | None, str]:
    import psutil  # (a dependency; imported when first needed)

    try:
        proc = psutil.Process(os_pid)
    except psutil.Error:
        return None, "uss"
    try:
        return proc.memory_full_info().uss, "uss"
    except psutil.Error:
        pass
    try:
        return proc.memory_info().rss, "rss"
    except psutil.Error:
        return None, "rss"


def _os_parent(os_pid: int) -> int | None:
    fields = _table.proc_stat(os_pid)
    return int(fields[1]) if fields is not None and len(fields) > 1 else None
