"""Internal: the node as the embedding process sees it: started on first use,
stopped by ``shutdown`` (or at interpreter exit).

Starting a node makes its directory (mode 0700, under /dev/shm when possible),
the process table and a random key; the embedding process joins the node as a
process itself, and starts the node's root (``_root``) with ``multiprocessing``'s
spawn method, the one start method that is safe in a process that may run
threads.

A node's directory holds a ``lock`` file that the embedding process and the root
keep ``flock``-ed (shared) as long as the node lives. Starting a node removes the
directories of dead nodes: those whose lock nobody holds. A pid test would not
do: a node in a container that shares ``/dev/shm`` cannot see the host's pids.

Ctrl-C: while a thread is inside a node section, the runtime's own SIGINT handler
holds the ``KeyboardInterrupt`` back until the section is over (see ``_poller``),
so that Ctrl-C aborts the wait it interrupted and nothing else. It is installed
only where Python's default handler was.
"""

from __future__ import annotations

import atexit
import fcntl
import os
import resource
import shutil
import signal
import socket
import tempfile
import threading
import time
from typing import Any

from . import _config, _current, _launch, _root, _table, _wire
from ._node import Node, NodeInfo
from .errors import ProcessError
from .pid import Pid

# A node directory without a lock file is one being made, or left by a crash while
# it was made: removed once it is this old.
_UNLOCKED_AGE = 60.0

_start_lock = threading.Lock()
_lock_fd = -1
NODE_OPTIONS = ("start_method", "preload", "node_dir", "warm_children", "warm_imports")


def configure(options: dict[str, Any]) -> None:
    """See ``runtime.configure``."""
    checked = _config.check_options(options)
    if _current.get() is not None and any(k in checked for k in NODE_OPTIONS):
        raise ProcessError("configure() must be called before the runtime is first used "
                           "(only call_timeout may change later)")
    _config.set_options(checked)


def current() -> Node:
    """This process's node; in the embedding process, the node is started on first use."""
    node = _current.get()
    if node is not None:
        return node
    with _start_lock:
        node = _current.get()
        if node is None:
            node = _start_node()
            _current.set(node)
        return node


def base_dir(chosen: str | None) -> str:
    if chosen:
        return chosen
    for candidate in ("/dev/shm", tempfile.gettempdir()):
        if os.path.isdir(candidate) and os.access(candidate, os.W_OK | os.X_OK):
            return candidate
    return tempfile.gettempdir()


def node_dirs(base: str) -> list[tuple[str, os.stat_result]]:
    """The directories of this user's nodes in ``base``, live or not, with their
    ``lstat``."""
    try:
        entries = os.listdir(base)
    except OSError:
        return []
    uid = os.getuid()
    found = []
    for entry in entries:
        if not entry.startswith("rt-"):
            continue
        path = os.path.join(base, entry)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if st.st_uid == uid:
            found.append((path, st))
    return found


def _remove_dead_nodes(base: str) -> None:
    """Remove the directories of this user's nodes that nobody holds any more (both
    the embedding process and its root were killed at once)."""
    for path, st in node_dirs(base):
        try:
            fd = os.open(os.path.join(path, "lock"), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            if time.time() - st.st_mtime > _UNLOCKED_AGE:
                shutil.rmtree(path, ignore_errors=True)
            continue
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # held: a live node
        else:
            shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(fd)


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


def _listen_at(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(_launch.BACKLOG)
    return sock


def _start_node() -> Node:
    """Start a node with the calling (embedding) process as its main process."""
    global _lock_fd
    config = _config.current()
    method = config.start_method
    _raise_nofile()
    base = base_dir(config.node_dir)
    _remove_dead_nodes(base)
    directory = tempfile.mkdtemp(prefix=f"rt-{os.getpid()}-", dir=base)
    lock_fd = -1
    try:
        lock_fd = _root.hold_node_lock(directory, create=True)
        os.mkdir(os.path.join(directory, "names"), 0o700)
        table = _table.Table(os.path.join(directory, "table"), create=True)
        node_id = int.from_bytes(os.urandom(4), "big") | 1
        key = os.urandom(32)
        _wire.save_key(directory, key)  # for observers (python -m runtime top): see _wire
        serial, slot = table.allocate()
        table.set_os_pid(slot, os.getpid())
        me = Pid(node_id, serial, slot, os.getpid())
        root_serial, root_slot = table.allocate()
        root = Pid(node_id, root_serial, root_slot, 0)  # its OS pid is known once started
        info = NodeInfo(directory, key, node_id, me, root, method, config.warm_imports)
        node = Node(info, me, _listen_at(info.sock_path(serial)), table, is_main=True)
        node.extra_fds.append(lock_fd)
        _start_root(node, config)
    except BaseException:
        if lock_fd >= 0:
            os.close(lock_fd)
        shutil.rmtree(directory, ignore_errors=True)
        raise
    _lock_fd = lock_fd
    _install_sigint()
    atexit.register(_shutdown_at_exit)
    return node


def _start_root(node: Node, config: _config.Config) -> None:
    info = node.info
    assert info.root is not None
    serial, slot = info.root.serial, info.root.slot
    listen = _listen_at(info.sock_path(serial))
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    plan = _launch.Plan(info, serial, slot, node.me, os.getpid(),
                        _launch.InheritFd(listen.fileno()), _launch.InheritFd(theirs.fileno()),
                        trap=True, target=(_root.main, (config.preload, config.warm_children,
                                                    config.warm_imports)),
                        pdeathsig=False)
    try:
        popen = _launch.SpawnPopen(_launch.RuntimeProcess(plan, "runtime-root"))
    finally:
        listen.close()
        theirs.close()
    node.table.set_os_pid(slot, popen.pid)
    root = Pid(info.node_id, serial, slot, popen.pid)
    with node.poller.lock:
        watch = node.watches.add_child(root, popen.sentinel, link=False)
        node.conns.adopt(ours, root, hello=False)
        node.watches.child_started(watch, popen)
    try:
        node.call(root, ("$ping",), 60.0)
    except ProcessError as exc:
        raise ProcessError(
            f"the runtime's root process failed to start ({exc}); if this program starts "
            "processes at import time, put that code under `if __name__ == \"__main__\":`"
        ) from exc


def janitor(node: Node) -> int | None:
    """The OS pid of the node's janitor (see ``_root``), asked of the root once."""
    if node.janitor is None and node.info.root is not None:
        node.janitor = node.call(node.info.root, ("$janitor",), 10.0)
    return node.janitor


def root_pid(node: Node) -> Pid | None:
    """The root's Pid, with its OS pid (the node's info has it as 0)."""
    root = node.info.root
    if root is None:
        return None
    with node.poller.lock:
        w = node.watches.get(root.serial)
    return w.pid if w is not None else root


# ------------------------------------------------------------------ Ctrl-C


def _on_sigint(signo: int, frame: Any) -> None:
    node = _current.peek()
    if node is not None and node.poller.lock.locked():
        node.poller.defer_signal(signo)
        return
    signal.default_int_handler(signo, frame)


def _install_sigint() -> None:
    if (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
        signal.signal(signal.SIGINT, _on_sigint)


def _uninstall_sigint() -> None:
    if (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is _on_sigint):
        signal.signal(signal.SIGINT, signal.default_int_handler)


# ------------------------------------------------------------------ shutdown


def _wait_gone(popen: Any, timeout: float) -> bool:
    """Wait (at most ``timeout`` s) until the process of ``popen`` is gone, and reap it
    if nobody has; True if it is gone."""
    if popen.returncode is not None:
        return True
    try:
        fd = os.pidfd_open(popen.pid)
    except ProcessLookupError:
        return True
    try:
        if not _wait_readable(fd, timeout):
            return False
    finally:
        os.close(fd)
    try:
        popen.poll(0)
    except OSError:
        pass
    return True


def _wait_readable(fd: int, timeout: float) -> bool:
    """Wait (at most ``timeout`` s) until ``fd`` (a pidfd: its process exited) is
    readable; whether it is."""
    import select

    waiter = select.poll()
    waiter.register(fd, select.POLLIN)
    deadline = time.monotonic() + timeout
    while not waiter.poll(min(timeout, 86400.0) * 1000):  # (poll takes an int)
        timeout = deadline - time.monotonic()
        if timeout <= 0:
            return False
    return True


def _shutdown_at_exit() -> None:
    try:
        shutdown(5.0)
    except Exception:
        pass


def shutdown(timeout: float) -> None:
    """Stop the node (see ``runtime.shutdown``)."""
    global _lock_fd
    node = _current.get()
    if node is None:
        return
    if not node.is_main:
        raise ProcessError("shutdown() stops the whole node: call it from the embedding process")
    with _start_lock:
        if _current.get() is not node:
            return
        root = node.info.root
        with node.poller.lock:
            watch = node.watches.get(root.serial) if root is not None else None
            popen = watch.popen if watch is not None else None
        janitor = -1
        if root is not None and popen is not None:
            try:  # (a pidfd: the janitor is the root's child, and outlives it)
                janitor = os.pidfd_open(node.call(root, ("$janitor",), 5.0))
            except (ProcessError, OSError):
                pass
            try:
                node.call(root, ("$shutdown", timeout), timeout + 10.0)
            except ProcessError:
                pass
            if not _wait_gone(popen, timeout + 5.0):
                popen.kill()
                _wait_gone(popen, 5.0)
        node.close()
        node.table.close()
        shutil.rmtree(node.info.dir, ignore_errors=True)
        if _lock_fd >= 0:
            os.close(_lock_fd)
            _lock_fd = -1
        if janitor >= 0:  # it takes the lock we just let go, finds nothing left, exits
            try:
                _wait_readable(janitor, 2.0)
            finally:
                os.close(janitor)
        _current.set(None)
        _uninstall_sigint()
