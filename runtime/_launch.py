"""Internal: creating runtime processes through ``multiprocessing``.

A runtime process is a ``multiprocessing.process.BaseProcess`` started by one of
two ``Popen`` classes built on the standard ones (see ``_compat``):

- ``fork`` (default): the parent, a runtime process, forks with ``os.fork()``.
  A target given as ``(fn, args)`` is inherited, so nothing is pickled. The
  embedding process never forks (it may have threads): it asks the node's
  root to fork for it, and its targets travel cloudpickled and are unpickled in
  the new process, which imports what they need there (as under the spawn and
  forkserver methods): the root runs no user code.
- ``spawn``: a fresh interpreter (the macOS default). The target travels
  cloudpickled. The child does *not* re-import the user's ``__main__``, so a
  script without an ``if __name__ == "__main__":`` guard neither loops nor breaks.

Before the child runs any user code it asks the kernel to SIGKILL it when its
parent dies (``PR_SET_PDEATHSIG``: runtime processes fork from their main
thread, which lives as long as the process), ignores SIGINT (Ctrl-C belongs to
the embedding process), closes the runtime descriptors it inherited, and makes
its node. The parent makes beforehand what must exist before the child runs:
the slot in the process table, the child's listening socket (so the new Pid can
be sent to at once) and a socketpair between them that needs no handshake.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import io
import logging
import os
import pickle
import signal
import socket
import sys
import threading
from dataclasses import dataclass
from multiprocessing import process, reduction
from multiprocessing.context import get_spawning_popen, set_spawning_popen
from typing import Any

from . import _compat, _current, _table, _wire
from ._exits import SIG_EXIT
from ._node import Node, NodeInfo
from .errors import CallTimeout, Crash, ExitError, NoProcError, ProcessError
from .pid import Pid

log = logging.getLogger("runtime")

_SIGINT = int(signal.SIGINT)
_SIGKILL = int(signal.SIGKILL)
_SIG_IGN = int(signal.SIG_IGN)
_SIG_DFL = int(signal.SIG_DFL)
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
BACKLOG = 4096
ROOT_WAIT = 30.0  # seconds a spawn from the embedding process waits for the root

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def prctl(option: int, value: int) -> None:
    if _libc.prctl(option, value, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class InheritFd:
    """A descriptor handed to a child: its number under fork, passed along under spawn."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> tuple[Any, ...]:
        popen = get_spawning_popen()
        fd = popen.duplicate_for_child(self.fd) if popen is not None else self.fd
        return (InheritFd, (fd,))


@dataclass(slots=True)
class Plan:
    """Everything a new child needs to become a runtime process."""

    info: NodeInfo
    serial: int
    slot: int
    parent: Pid
    parent_os_pid: int
    listen: InheritFd
    conn: InheritFd  # its end of the socketpair with its parent
    link: bool = False  # linked to its parent
    link_to: Pid | None = None  # linked to this process too (the embedding process)
    trap: bool = False
    target: Any = None  # (fn, args), inherited under fork
    payload: bytes | None = None  # cloudpickled (fn, args), unpickled in the child
    pdeathsig: bool = True
    default_signals: tuple[int, ...] = ()  # handlers of the parent's to drop
    sentinel: int = -1  # its end of its sentinel pipe, once known
    sigmask: Any = None  # under fork: the signal mask to restore once its handlers are set
    warm: bool = False  # started ahead: waits for its target (see ``_forkserver``)
    offer_to: Pid | None = None  # a warm child's: who hands it its target
    imports: tuple[str, ...] = ()  # a warm child's: modules to import ahead
    close: list[tuple[int, int]] | None = None  # under fork: the parent's descriptors


class RuntimeProcess(process.BaseProcess):
    """A runtime process as ``multiprocessing`` sees it: what
    ``multiprocessing.current_process()`` returns in it."""

    _start_method = None

    def __init__(self, plan: Plan, name: str) -> None:
        super().__init__(name=name)
        self.plan: Plan | None = plan
        self.parent_sentinel = -1  # under fork: the parent's end of the sentinel pipe
        self.node: Node | None = None  # under fork: the child's node, made by its parent

    def run(self) -> None:  # under spawn, multiprocessing's bootstrap calls this
        plan = self.plan
        self.plan = None
        if plan is None:
            os._exit(1)
        _spawned_main(plan)


class ForkPopen(_compat.ForkPopen):
    """Forks with the sentinel pipe made beforehand (the parent polls it from before
    the fork), without multiprocessing's bootstrap in the child."""

    method = "fork"

    def launch(self, process_obj: RuntimeProcess) -> None:
        plan = process_obj.plan
        assert plan is not None
        pid = _current.fork()
        if pid == 0:
            try:
                _forked_main(process_obj, plan)
            finally:
                os._exit(1)
        self.pid = pid
        self.sentinel = process_obj.parent_sentinel
        self.finalizer = None

    def close(self) -> None:
        if self.sentinel >= 0:
            os.close(self.sentinel)
            self.sentinel = -1


class SpawnPopen(_compat.SpawnPopen):
    """Spawns a fresh interpreter that does not re-run ``__main__`` and starts no
    resource tracker (the child starts one itself if it needs one)."""

    method = "spawn"

    def launch(self, process_obj: RuntimeProcess) -> None:
        plan = process_obj.plan
        assert plan is not None
        parent_r = child_w = child_r = parent_w = None
        try:
            parent_r, child_w = os.pipe()
            child_r, parent_w = os.pipe()
            plan.sentinel = child_w  # the child keeps the write end of its sentinel
            buf = io.BytesIO()
            set_spawning_popen(self)
            try:
                reduction.dump(_preparation_data(process_obj.name), buf)
                reduction.dump(process_obj, buf)
            finally:
                set_spawning_popen(None)
            executable, args = _compat.spawn_command(child_r)
            fds = self.inherited_fds
            fds.extend([child_r, child_w])
            self.pid = _compat.spawn_with_fds(executable, args, fds)
            self.sentinel = parent_r
            with open(parent_w, "wb", closefd=False) as f:
                f.write(buf.getbuffer())
        finally:
            for fd in (child_r, child_w, parent_w):
                if fd is not None:
                    os.close(fd)
            self.finalizer = None  # type: ignore[assignment]

    def close(self) -> None:
        if self.sentinel >= 0:
            os.close(self.sentinel)
            self.sentinel = -1


def _preparation_data(name: str) -> dict[str, Any]:
    # Like multiprocessing.spawn.get_preparation_data, but without the main module
    # (see the module docstring) and without fixing the user's default start method.
    sys_path = list(sys.path)
    original_dir = _compat.original_dir()
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


# ------------------------------------------------------------------ in the child


def _forked_main(proc: RuntimeProcess, plan: Plan) -> None:
    """The forked child. Its node was made by its parent before the fork (see
    start_child): the child only closes its parent's runtime descriptors and runs."""
    _become_orphan_proof(plan.parent_os_pid, plan.default_signals)
    gc.freeze()  # the inherited heap is not ours to collect: touching it copies it
    _compat.set_current_process(proc)
    node, proc.node, proc.plan = proc.node, None, None
    parent = _current.take_forked_from()
    if parent is None or node is None or plan.close is None:
        os._exit(1)
    node.me.os_pid = os.getpid()
    # Our OS pid in the table now: our parent writes it only once its fork returns.
    # Killed before that, it leaves us an orphan that the root finds by it; and a warm
    # child may be taken by a spawn before, and is then listed (``processes()``).
    node.table.set_own_os_pid(plan.serial, plan.slot, node.me.os_pid)
    # Close the parent's runtime descriptors; its objects are kept alive for good, so
    # none of them ever closes a number reused here. Descriptors the user's code
    # opened stay open, as after any fork: their objects are inherited too.
    for lo, hi in plan.close:
        os.closerange(lo, hi)
    _current.bury(parent)
    _current.set(node)
    _run(node, plan)


def _spawned_main(plan: Plan) -> None:
    """The spawned child (a fresh interpreter): build the node from the plan."""
    listen_fd, conn_fd = plan.listen.fd, plan.conn.fd
    _become_orphan_proof(plan.parent_os_pid if plan.pdeathsig else None,
                         plan.default_signals)
    _close_all_but([0, 1, 2, listen_fd, conn_fd, plan.sentinel])
    table = _table.Table(os.path.join(plan.info.dir, "table"))
    me = Pid(plan.info.node_id, plan.serial, plan.slot, os.getpid())
    table.set_own_os_pid(plan.serial, plan.slot, me.os_pid)
    node = Node(plan.info, me, socket.socket(fileno=listen_fd), table, is_main=False,
                parent=plan.parent, trap=plan.trap)
    if plan.sentinel >= 0:
        node.extra_fds.append(plan.sentinel)
    node.conns.adopt(socket.socket(fileno=conn_fd), plan.parent, hello=False)
    if plan.link:
        node.linked_by(plan.parent)
    if plan.link_to is not None:
        node.linked_by(plan.link_to)
    _current.set(node)
    _run(node, plan)


def _run(node: Node, plan: Plan) -> None:
    """Run the process's function in its new process, then exit with its reason."""
    _compat.set_handler(SIG_EXIT, node.exits.on_signal)
    if plan.sigmask is not None:  # (signals that came meanwhile are handled now)
        _compat.sigmask(signal.SIG_SETMASK, plan.sigmask)
    # A SIG_EXIT that came before our handler was in place did nothing: look again.
    doomed = node.table.doomed_reason(node.me.serial, node.me.slot)
    if doomed is not None:
        node.exit_process(doomed[0], log_crash=False)
    reason: Any = "normal"
    try:
        if plan.warm:  # (see _forkserver: a warm child)
            assert plan.offer_to is not None
            plan.payload = node.wait_for_target(plan.offer_to, plan.imports)
        fn, args = pickle.loads(plan.payload) if plan.payload is not None else plan.target
        plan.target = plan.payload = None
        if plan.warm:
            node.target_loaded(fn, args)
        fn(*args)
    except SystemExit as exc:
        if exc.code not in (None, 0):
            reason = Crash.from_exception(exc)
    except BaseException as exc:
        reason = Crash.from_exception(exc)
    node.exit_process(reason)


def _become_orphan_proof(parent_os_pid: int | None, default_signals: tuple[int, ...]) -> None:
    """First thing in a new runtime process: die with the parent (unless None: the
    root watches the embedding process instead), ignore Ctrl-C, drop the parent's
    handlers that are not for us."""
    if parent_os_pid is not None:
        if _libc.prctl(PR_SET_PDEATHSIG, _SIGKILL, 0, 0, 0) != 0 \
                or os.getppid() != parent_os_pid:
            os.kill(os.getpid(), _SIGKILL)  # the parent died first: as PDEATHSIG would
    _compat.set_handler(_SIGINT, _SIG_IGN)
    for signo in default_signals:
        _compat.set_handler(signo, _SIG_DFL)
    signal.set_wakeup_fd(-1)


def _close_all_but(keep: list[int]) -> None:
    prev = -1
    for fd in sorted({fd for fd in keep if fd >= 0}):
        if fd > prev + 1:
            os.closerange(prev + 1, fd)
        prev = fd
    os.closerange(prev + 1, 1 << 20)


# ------------------------------------------------------------------ in the parent


def spawn(node: Node, fn: Any, args: tuple[Any, ...], *, link: bool = False,
          trap: bool = False, shown: Any = None) -> Pid:
    """Start ``fn(*args)`` in a new runtime process; see ``runtime.spawn``. ``shown``:
    what a TypeError names if the target must be pickled and cannot be (default
    ``(fn, args)``)."""
    if node.is_main:
        root = node.info.root
        assert root is not None
        payload = _wire.dumps_code((fn, args), shown)
        # A warm child could see an exit signal before its trap; and with the root
        # dead, warm children are dying (they die with it).
        pid = node.hand_over(payload, link) if not trap and node.is_alive(root) else None
        if pid is None:
            try:
                pid = spawn_by(node, root, payload, link, trap, "the node's root")
            except ProcessError:
                if node.is_alive(root):
                    raise
                raise ProcessError(
                    "the node's root process has died, and every process of the node "
                    "with it: call runtime.shutdown(), then the next use starts a new "
                    "node") from None
        if link:
            node.linked_by(pid)
        return pid
    if threading.get_ident() != threading.main_thread().ident:
        raise ProcessError("spawn from a runtime process must run on its main thread "
                           "(a fork from another thread would not be safe)")
    keeper = node.keeper  # (children started ahead: see _warm)
    if keeper is not None:
        pid = keeper.spawn(fn, args, link, trap)
        if pid is not None:
            if link:
                node.linked_by(pid)
            return pid
    return start_child(node, (fn, args), link=link, trap=trap, shown=shown)


class ServerGone(ProcessError):
    """``spawn_by``: the fork server was dead before the spawn asked it anything."""


def spawn_by(node: Node, server: Pid, payload: bytes, link: bool, trap: bool,
             name: str) -> Pid:
    """Have the fork server ``server`` (the root, a zygote: see ``_forkserver``) fork
    a new process for ``payload``. A spawn that does not end with the server's
    answer (none in ROOT_WAIT seconds: the server is stopped; or Ctrl-C) tells the
    server to cancel it: it forks nothing, or kills what it forked, so that no
    process runs a target whose spawn raised. Raises ServerGone if the server was
    dead before it was asked, ProcessError if it died while it was asked, did not
    answer, or could not fork (``name`` names the server in them)."""

    def cancel(ref: int) -> None:
        node.post(server, ("$cancel", ref))  # (the server may be stopped: never wait)

    try:
        pid = node.call(server, ("$spawn", payload, link, trap), ROOT_WAIT, cancel)
    except NoProcError:
        raise ServerGone(f"{name} has died") from None
    except ExitError as exc:
        # It may have forked a process for the target first, which dies with it (the
        # parent-death signal): this spawn raises, it must not run the target again.
        raise ProcessError(f"{name} died during the spawn ({exc.reason!r}); a process "
                           "it may have started for the target died with it") from None
    except CallTimeout:
        raise ProcessError(f"{name} did not answer a spawn within {ROOT_WAIT} s "
                           "(stopped?); the spawn was cancelled") from None
    if pid.__class__ is tuple and pid[0] == "$error":
        raise pid[1]  # the server could not fork (out of descriptors or processes)
    if not isinstance(pid, Pid):
        raise ProcessError(f"{name} answered a spawn with {pid!r}")
    return pid


def start_child(node: Node, target: Any = None, *, payload: bytes | None = None,
                link: bool = False, link_to: Pid | None = None, trap: bool = False,
                default_signals: tuple[int, ...] = (), name: str = "runtime",
                warm: bool = False, offer_to: Pid | None = None,
                imports: tuple[str, ...] = (), fresh: bool = False,
                shown: Any = None) -> Pid:
    """Start a child of ``node`` (this process's node) running ``target = (fn, args)``
    or the cloudpickled ``payload`` (``warm``: neither yet; it waits for a target from
    ``Node.hand_over`` in ``offer_to``, by default us, having imported the modules
    ``imports`` first). ``fresh``: start it with the spawn start method (a new
    interpreter) whatever the node's start method is. Returns once
    the OS process exists and can be sent to; does not wait for it to run. A warm
    child's slot is marked as started ahead (``Table.set_ahead``): it is not listed
    among the node's processes until it is handed a target, and it is found by its
    OS pid like any other (by the root, when its parent was killed and it died an
    orphan)."""
    info = node.info
    spawned = fresh or info.start_method == "spawn"
    if spawned and payload is None:
        payload, target = _wire.dumps_code(target, shown), None
    table = node.table
    listen: socket.socket | None
    theirs: socket.socket | None
    listen, ours, theirs = _sockets()
    sentinel = (-1, -1)
    popen: Any = None
    watch = None
    slot = -1
    path = ""
    try:
        if not spawned:
            sentinel = os.pipe()
        serial, slot = table.allocate(node.me.slot)
        if warm:  # (before it has an OS pid in the table: never listed as a process)
            table.set_ahead(slot, True)
        path = info.sock_path(serial)
        listen.bind(path)
        listen.listen(BACKLOG)
        if trap:  # before anyone can send it an exit signal
            table.set_trap(slot, True)
        pid = Pid(info.node_id, serial, slot, 0)  # its OS pid is known once it starts
        plan = Plan(info, serial, slot, node.me, os.getpid(), InheritFd(listen.fileno()),
                    InheritFd(theirs.fileno()), link=link, link_to=link_to, trap=trap,
                    target=target, payload=payload, default_signals=default_signals,
                    sentinel=sentinel[1], warm=warm, imports=imports,
                    offer_to=(offer_to or node.me) if warm else None)
        proc = RuntimeProcess(plan, f"{name}-{serial}")
        if spawned:
            popen = SpawnPopen(proc)
            with node.poller.lock:
                watch = node.watches.add_child(pid, popen.sentinel, link)
                node.conns.adopt(ours, pid, hello=False)
                node.watches.child_started(watch, popen)
        else:
            # After the fork every page either process writes is copied, so both do
            # as little as they can then: the parent makes the child's node, and
            # records the child, before the fork.
            child = proc.node = _child_node(node, plan, listen, theirs, sentinel[1])
            listen = theirs = None
            # No signal is handled in the child before its own handlers are in place:
            # the parent's would act on the parent's behalf (its wakeup pipe, say).
            plan.sigmask = _compat.sigmask(signal.SIG_BLOCK, _compat.ALL_SIGNALS)
            try:
                with node.poller.lock:
                    watch = node.watches.add_child(pid, sentinel[0], link)
                    node.conns.adopt(ours, pid, hello=False)
                    proc.parent_sentinel = sentinel[0]
                    # What the child closes first thing: our runtime descriptors.
                    plan.close = node.descriptors().runs()
                    popen = ForkPopen(proc)
                    node.watches.child_started(watch, popen)
                    # The child owns its node now: close our copy's descriptors, and
                    # free it at an idle moment (freeing writes to every page of it,
                    # and each is copied now that the child shares it).
                    child.abandon()
                    held = [child]
                    node.poller.defer(held.clear)
            finally:
                _compat.sigmask(signal.SIG_SETMASK, plan.sigmask)
        table.set_os_pid(slot, popen.pid)
        table.started(node.me.slot)
    except BaseException:
        if popen is None:
            if watch is not None:
                with node.poller.lock:
                    node.watches.child_failed(watch)
                    node.conns.close_peer(serial)
            else:
                ours.close()
            for fd in sentinel:
                if fd >= 0:
                    os.close(fd)
            if slot >= 0:
                table.free(slot)
                table.started(node.me.slot)
            if path:
                try:
                    os.unlink(path)
                except OSError:
                    pass
        raise
    finally:
        if listen is not None:
            listen.close()
        if theirs is not None:
            theirs.close()
    return pid


def _child_node(parent: Node, plan: Plan, listen: socket.socket, conn: socket.socket,
                sentinel: int) -> Node:
    """The node of a child about to be forked, made by its parent (its OS pid is set
    in the child)."""
    me = Pid(plan.info.node_id, plan.serial, plan.slot, 0)
    node = Node(plan.info, me, listen, parent.table, is_main=False, parent=parent.me,
                trap=plan.trap)
    node.extra_fds.append(sentinel)
    node.conns.adopt(conn, parent.me, hello=False)
    with node.poller.lock:
        if plan.link:
            node.watches.prelink(parent.me, os.pidfd_open(os.getpid()))
        if plan.link_to is not None:  # (the client of a fork server: see _forkserver)
            # The embedding process traps exits and watches us itself: no watch.
            node.watches.link(plan.link_to, watched=plan.link_to != plan.info.main)
    return node


def _sockets() -> tuple[socket.socket, socket.socket, socket.socket]:
    """A new child's listening socket and socketpair. Made before its table slot is
    taken: when descriptors run out, nothing is left behind."""
    listen = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    except BaseException:
        listen.close()
        raise
    return listen, a, b
