"""Internal: creating runtime processes through ``multiprocessing``.

A runtime process is a ``multiprocessing.process.BaseProcess`` whose ``Popen`` is
one of two small subclasses of the standard ones:

- ``fork`` (default): the parent, a single-threaded runtime process, forks
  (``_fork``: without the interpreter's at-fork machinery when nothing needs it).
  The child inherits the target function, so nothing is pickled. The embedding
  process never forks: it asks the node's root process to fork for it.
- ``spawn``: a fresh interpreter (the macOS default). The target travels
  cloudpickled. The child does *not* re-import the user's ``__main__`` (the
  preparation data leaves it out), so a script without an
  ``if __name__ == "__main__":`` guard neither loops nor breaks.

Before the child runs any user code it: asks the kernel to SIGKILL it when its
parent dies (``PR_SET_PDEATHSIG``; runtime processes are single-threaded, so the
forking thread is the process), ignores SIGINT (Ctrl-C belongs to the embedding
process), closes the runtime descriptors it inherited, and makes its node.

After a fork every page either process writes is copied, so both sides do as
little as possible. The parent makes what must exist before the child runs: the
slot in the process table, the listening socket (so the new pid can be sent to
at once) and a socketpair to the child that needs no handshake; it records the
child before the fork. A forked child's node is its parent's template
(``Node.template``), which the parent built once and never writes to.
"""

from __future__ import annotations

import _signal
import _socket
import ctypes
import gc
import io
import os
import pickle
import signal
import socket
import sys
from dataclasses import dataclass
from multiprocessing import popen_fork, popen_spawn_posix, process, reduction, spawn, util
from multiprocessing.context import set_spawning_popen
from typing import Any

from . import _fork, _node, _table, _wire
from ._base import SIG_EXIT, NodeInfo
from .errors import Crash
from .pid import Pid

_SIGKILL = int(signal.SIGKILL)
_SIGINT = int(signal.SIGINT)
_SIGCHLD = int(signal.SIGCHLD)
_SIG_EXIT = int(SIG_EXIT)
_AF_UNIX = _socket.AF_UNIX
_SOCK_STREAM = _socket.SOCK_STREAM
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
BACKLOG = 4096

_libc = ctypes.CDLL(None, use_errno=True)


_prctl = _libc.prctl


def prctl(option: int, value: int) -> None:
    if _prctl(option, value, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class InheritFd:
    """A descriptor handed to a child: its number under fork, passed along under spawn."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> tuple[Any, ...]:
        from multiprocessing.context import get_spawning_popen

        popen = get_spawning_popen()
        fd = popen.duplicate_for_child(self.fd) if popen is not None else self.fd
        return (InheritFd, (fd,))


@dataclass
class Boot:
    """Everything a child needs to become a runtime process."""

    info: NodeInfo
    serial: int
    slot: int
    parent: Pid
    parent_os_pid: int
    links: list[Pid]
    listen: InheritFd
    conn: InheritFd
    target: Any = None  # (fn, args) under fork
    payload: bytes | None = None  # cloudpickled (fn, args) otherwise
    trap: bool = False
    pdeathsig: bool = True
    sentinel: int | None = None  # under spawn: the write end of our sentinel


class ForkPopen(popen_fork.Popen):
    """multiprocessing's fork Popen with the sentinel pipe made beforehand (so the
    parent registers it before the fork) and without the parent-sentinel pipe and
    finalizer, which the runtime does not need: it closes the sentinel itself."""

    method = "fork"

    def _launch(self, process_obj: RuntimeProcess) -> None:
        parent_r, child_w = process_obj.sentinel_pipe
        pid = _fork.fork()
        if pid == 0:
            try:
                gc.freeze()  # the inherited heap is not ours to collect
                process_obj.fork_child_main(child_w)
            finally:
                os._exit(1)
        self.pid = pid
        os.close(child_w)
        self.sentinel = parent_r
        self.finalizer = None

    def close(self) -> None:
        if self.sentinel >= 0:
            os.close(self.sentinel)
            self.sentinel = -1


class SpawnPopen(popen_spawn_posix.Popen):
    """multiprocessing's spawn Popen, without re-running ``__main__`` in the child and
    without the resource tracker (the child starts one itself if it needs it)."""

    method = "spawn"

    def _launch(self, process_obj: RuntimeProcess) -> None:
        parent_r = child_w = child_r = parent_w = None
        try:
            parent_r, child_w = os.pipe()
            child_r, parent_w = os.pipe()
            # The child keeps the write end of its sentinel: it needs the number.
            if process_obj.boot is not None:
                process_obj.boot.sentinel = child_w
            prep = _preparation_data(process_obj.name)
            buf = io.BytesIO()
            set_spawning_popen(self)
            try:
                reduction.dump(prep, buf)
                reduction.dump(process_obj, buf)
            finally:
                set_spawning_popen(None)
            cmd = spawn.get_command_line(tracker_fd=None, pipe_handle=child_r)
            fds = self._fds  # type: ignore[attr-defined]
            fds.extend([child_r, child_w])
            exe = spawn.get_executable()
            self.pid = util.spawnv_passfds(exe, cmd, fds)  # type: ignore[arg-type]
            self.sentinel = parent_r
            with open(parent_w, "wb", closefd=False) as f:
                f.write(buf.getbuffer())
        finally:
            self.finalizer = util.Finalize(
                self, util.close_fds,  # type: ignore[attr-defined]
                [fd for fd in (parent_r, parent_w) if fd is not None],
            )
            for fd in (child_r, child_w):
                if fd is not None:
                    os.close(fd)


def _preparation_data(name: str) -> dict[str, Any]:
    # Like multiprocessing.spawn.get_preparation_data, but without the main module
    # (see the module docstring) and without fixing the user's default start method.
    sys_path = list(sys.path)
    original_dir = process.ORIGINAL_DIR  # type: ignore[attr-defined]
    if "" in sys_path:
        sys_path[sys_path.index("")] = original_dir
    return {
        "name": name,
        "authkey": bytes(process.current_process().authkey),
        "sys_path": sys_path,
        "sys_argv": sys.argv,
        "orig_dir": original_dir,
        "dir": os.getcwd(),
    }


class RuntimeProcess(process.BaseProcess):
    """A runtime process as ``multiprocessing`` sees it."""

    _start_method = None

    def __init__(self, boot: Boot | None, name: str) -> None:
        if boot is not None:
            super().__init__(name=name)
        else:
            # A fork: the part of BaseProcess.__init__ a child uses, as
            # multiprocessing.current_process(). Left out: the process counter and the
            # _dangling WeakSet (whose callback runs Python code when this object goes),
            # which only multiprocessing's own start() and test suite use.
            current = process._current_process  # type: ignore[attr-defined]
            self._identity = current._identity
            self._config = current._config  # the child's own copy, once forked
            self._parent_pid = os.getpid()
            self._parent_name = current._name
            self._popen: Any = None
            self._closed = False
            self._target = None
            self._args = ()
            self._kwargs: dict[str, Any] = {}
            self._name = name
        self.boot = boot
        # Under fork: (serial, slot, listen, conn, link, link_to, trap) for the child.
        self.plan: tuple[Any, ...] | None = None
        self.target: Any = None
        self.sentinel_pipe: tuple[int, int] = (-1, -1)
        self.parent_os_pid = 0

    def start_with(self, method: str) -> Any:
        """Start the process; unlike ``BaseProcess.start`` this keeps the child out of
        multiprocessing's ``_children``, whose ``_cleanup`` would reap it behind the
        runtime's back (the runtime must record the exit status before reaping)."""
        popen = (SpawnPopen if method == "spawn" else ForkPopen)(self)
        self._popen = popen
        self._sentinel = popen.sentinel
        return popen

    def run(self) -> None:  # under spawn, multiprocessing's bootstrap calls this
        self.child_main()

    def fork_child_main(self, sentinel_w: int) -> None:
        """The forked child. Its node is the parent's template (``Node.template``): the
        child runs as little code as possible before the user's function, for every
        page of the inherited heap it touches costs a copy-on-write fault."""
        _become_orphan_proof(self.parent_os_pid)
        parent = _node.take_forked_from()
        _node._graveyard.append(parent)
        _node._foreign_fork = False
        process._current_process = self  # type: ignore[attr-defined]  # (see ForkPopen)
        plan = self.plan
        self.plan = None
        if parent is None or plan is None or parent.child_template is None:
            os._exit(1)
        serial, slot, listen, theirs, link, link_to, trap = plan
        table = parent.table
        # Close the parent's runtime descriptors. Its objects are kept alive for good
        # (graveyard), so none of them ever closes a number reused here. Descriptors
        # the user's code opened stay open, as after any fork: their objects are
        # inherited too, and closing the numbers under them would make them write
        # into whatever reuses the numbers. The parent's descriptors come as a bitmap:
        # a parent with thousands of children has thousands of them, and walking its
        # objects would copy, page by page, the heap we share with it.
        bits = parent.fd_bits(copy=False)
        size = len(bits)
        for fd in (listen.fileno(), theirs.fileno(), sentinel_w, table.fd):
            if fd < size:
                bits[fd] = 0
        for lo, hi in _node.runs(bits):
            os.closerange(lo, hi)
        pme = parent.me
        node = parent.child_template
        node.bind_child(Pid(pme.node, serial, slot, os.getpid()), listen, pme,
                        self.parent_os_pid, theirs, link, link_to, trap)
        node.extra_fds.append(sentinel_w)
        _node.set_current(node)
        target, self.target = self.target, None
        _run(node, target, None)

    def child_main(self) -> None:
        """The spawned child (a fresh interpreter): build the node from the Boot."""
        boot = self.boot
        if boot is None:
            os._exit(1)
        listen_fd = boot.listen.fd
        conn_fd = boot.conn.fd
        _become_orphan_proof(boot.parent_os_pid if boot.pdeathsig else None)
        # A fresh interpreter: keep only our own descriptors (multiprocessing leaves a
        # few more), open the node's table.
        sentinel_w = boot.sentinel
        keep = [0, 1, 2, listen_fd, conn_fd]
        if sentinel_w is not None:
            keep.append(sentinel_w)
        _close_all_but(keep)
        table = _table.Table(os.path.join(boot.info.dir, "table"))
        me = Pid(boot.info.node_id, boot.serial, boot.slot, os.getpid())
        table.set_os_pid(boot.slot, me.os_pid)
        listen = socket.socket(_AF_UNIX, _SOCK_STREAM, 0, listen_fd)
        node = _node.Node(boot.info, me, listen, table, is_main=False)
        if sentinel_w is not None:
            node.extra_fds.append(sentinel_w)
        node.parent = boot.parent
        node.adopt_conn(socket.socket(_AF_UNIX, _SOCK_STREAM, 0, conn_fd), boot.parent)
        for pid in boot.links:
            node._add_link(pid, requested=False)
        if boot.trap:
            node.set_trap_exit(True)
        _node.set_current(node)
        _run(node, boot.target, boot.payload)
        boot.target = boot.payload = None


def run_payload(payload: bytes) -> Any:
    """Unpickle ``(fn, args)`` and call it: a spawn target the root could not unpickle,
    so that the child fails with the true error."""
    fn, args = pickle.loads(payload)
    return fn(*args)


def _run(node: _node.Node, target: Any, payload: bytes | None) -> None:
    """Run the process's function in its new process, then exit with its reason."""
    # A SIG_EXIT that arrived before the node existed was ignored: look again.
    doomed = node.table.doomed_reason(node.me.serial, node.me.slot)
    if doomed is not None:
        node.exit_process(doomed[0], log_crash=False)
    reason: Any = "normal"
    try:
        fn, args = pickle.loads(payload) if payload is not None else target
        target = payload = None
        fn(*args)
    except SystemExit as exc:
        if exc.code not in (None, 0):
            reason = Crash.from_exception(exc)
    except BaseException as exc:
        reason = Crash.from_exception(exc)
    node.exit_process(reason)


def _become_orphan_proof(parent_os_pid: int | None) -> None:
    """First thing in a new runtime process: die with the parent (unless None: the
    root watches the embedding process instead), ignore Ctrl-C, and take the runtime's
    signal handlers. The C-level _signal module: signal.signal's enum conversions
    touch enough of the inherited heap to cost ~0.2 ms of copy-on-write faults."""
    if parent_os_pid is not None:
        if _prctl(PR_SET_PDEATHSIG, _SIGKILL, 0, 0, 0) != 0 or os.getppid() != parent_os_pid:
            os.kill(os.getpid(), _SIGKILL)  # the parent died first: die as PDEATHSIG would
    _signal.signal(_SIGINT, _signal.SIG_IGN)
    _signal.signal(_SIG_EXIT, _node.on_exit_signal)
    _signal.signal(_SIGCHLD, _signal.SIG_DFL)
    _signal.set_wakeup_fd(-1)
    _fork.restore_sigmask()


def _close_all_but(keep: list[int]) -> None:
    prev = -1
    for fd in sorted(set(keep)):
        if fd > prev + 1:
            os.closerange(prev + 1, fd)
        prev = fd
    os.closerange(prev + 1, 1 << 20)


def start_child(
    node: _node.Node,
    target: Any = None,
    *,
    payload: bytes | None = None,
    link: bool = False,
    link_to: Pid | None = None,
    trap: bool = False,
    name: str = "runtime",
) -> Pid:
    """Start a child of ``node`` (which must be this process's node) running
    ``target = (fn, args)`` or the cloudpickled ``payload``. Returns once the OS
    process exists and can be sent to; does not wait for it to run."""
    if node.info.start_method == "spawn":
        return _start_spawned(node, target, payload, link, link_to, trap, name)
    if target is None:
        target = (run_payload, (payload,))
    table = node.table
    info = node.info
    listen, ours, theirs = _sockets(_socket.socket)
    try:
        sentinel = os.pipe()
    except BaseException:
        for sock in (listen, ours, theirs):
            sock.close()
        raise
    popen = watch = None
    slot = -1
    path = ""
    try:
        serial, slot = table.allocate()
        path = info.sock_path(serial)
        pid = Pid(node.node_id, serial, slot, 0)  # os_pid is set once the fork is done
        listen.bind(path)
        listen.listen(BACKLOG)
        if trap:  # before anyone can send it an exit signal
            table.set_trap(slot, True)
        if node.child_template is None:
            node.child_template = _node.Node.template(info, table)
        # After the fork each page either process writes is copied, so both do as
        # little as possible: the parent records the child before, the child makes the
        # template its node.
        proc = RuntimeProcess(None, name)
        proc.plan = (serial, slot, listen, theirs, link, link_to, trap)
        proc.target = target
        proc.sentinel_pipe = sentinel
        proc.parent_os_pid = os.getpid()
        with node.lock:
            watch = node.prepare_child(pid, sentinel[0], ours, link)
            popen = proc.start_with("fork")
            node.child_started(watch, popen)
        table.set_os_pid(slot, popen.pid)
    finally:
        try:
            listen.close()
            theirs.close()
            if popen is None:
                if watch is not None:
                    with node.lock:
                        node.child_failed(watch)
                else:
                    ours.close()
                for fd in sentinel:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
                _give_back(table, slot, path)
        finally:
            # Signals stay blocked from the fork until the child is recorded: a
            # handler that raises does so here, and no child goes untracked.
            _fork.parent_done()
    return pid


def _sockets(kind: Any) -> tuple[Any, Any, Any]:
    """A new child's listening socket and socketpair (``kind``: the C socket type under
    fork, where the Python subclass costs more objects on both sides; the Python one
    under spawn, whose sockets are pickled). Made before the child's table slot is
    taken: when descriptors run out, nothing is left behind."""
    pair = _socket.socketpair if kind is _socket.socket else socket.socketpair
    listen = kind(_AF_UNIX, _SOCK_STREAM)
    try:
        a, b = pair(_AF_UNIX, _SOCK_STREAM)
    except BaseException:
        listen.close()
        raise
    return listen, a, b


def _give_back(table: _table.Table, slot: int, path: str) -> None:
    """Undo a start that failed: free the slot, remove the socket file."""
    if slot >= 0:
        table.free(slot)
    if path:
        try:
            os.unlink(path)
        except OSError:
            pass


def _start_spawned(node: _node.Node, target: Any, payload: bytes | None, link: bool,
                   link_to: Pid | None, trap: bool, name: str) -> Pid:
    """start_child under the spawn method, or for a target that must be unpickled in the
    child: the child builds its own node from a Boot."""
    info = node.info
    method = info.start_method
    if method == "spawn" and target is not None:
        payload, target = _wire.dumps_code(target), None
    table = node.table
    listen, ours, theirs = _sockets(socket.socket)
    popen = None
    slot = -1
    path = ""
    try:
        serial, slot = table.allocate()
        path = info.sock_path(serial)
        listen.bind(path)
        listen.listen(BACKLOG)
        links = [node.me] if link else []
        if link_to is not None:
            links.append(link_to)
        boot = Boot(
            info, serial, slot, node.me, os.getpid(), links,
            InheritFd(listen.fileno()), InheritFd(theirs.fileno()),
            target, payload, trap,
        )
        proc = RuntimeProcess(boot, f"{name}-{serial}")
        popen = proc.start_with(method)
    finally:
        listen.close()
        theirs.close()
        if popen is None:
            ours.close()
            _give_back(table, slot, path)
    table.set_os_pid(slot, popen.pid)
    pid = Pid(node.node_id, serial, slot, popen.pid)
    with node.lock:
        node.add_child(pid, popen, ours, link)
    return pid
