"""Internal: starting and stopping a node, and its root process.

The embedding process starts the node on first use: it makes the node's
directory (mode 0700, under /dev/shm when possible), the process table and a
random key, joins the node as a process itself, and starts the *root* with
``multiprocessing``'s spawn method, the one start method that is safe in a
process that may run threads.

The root is a small GenServer that

- forks the processes the embedding process spawns (the embedding process must
  never fork), so it is their parent and reaps them;
- is the child subreaper of the node: a process whose parent died is reparented
  to it, and it records the exit of such orphans before reaping them;
- watches the embedding process with a pidfd: if it dies, even by SIGKILL, the
  root kills every process of the node, removes the node's directory, and exits;
- on ``shutdown``, stops its children in reverse start order, kills stragglers,
  and removes the directory.
"""

from __future__ import annotations

import atexit
import heapq
import os
import pickle
import select
import shutil
import signal
import socket
import tempfile
import time
from typing import Any

from . import _fork, _launch, _node, _table
from ._base import EXIT_GRACE, NodeInfo
from .errors import ProcessError
from .messages import Down
from .pid import Pid


def _base_dir() -> str:
    for candidate in ("/dev/shm", tempfile.gettempdir()):
        if os.path.isdir(candidate) and os.access(candidate, os.W_OK | os.X_OK):
            return candidate
    return tempfile.gettempdir()


def _remove_stale_nodes(base: str) -> None:
    """Remove the directories of nodes whose embedding process is gone (both it and
    its root were killed at once, so nobody could clean up)."""
    try:
        entries = os.listdir(base)
    except OSError:
        return
    uid = os.getuid()
    for entry in entries:
        if not entry.startswith("rt-"):
            continue
        parts = entry.split("-")
        if len(parts) < 3 or not parts[1].isdigit():
            continue
        path = os.path.join(base, entry)
        try:
            if os.lstat(path).st_uid != uid:
                continue
            os.kill(int(parts[1]), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except OSError:
            continue


def _raise_nofile() -> None:
    import resource

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


def start_node() -> _node.Node:
    """Start a node with the calling (embedding) process as its main process."""
    from .process import _config

    method = _config["start_method"] or os.environ.get("RUNTIME_START_METHOD") or "fork"
    if method not in ("fork", "spawn"):
        raise ValueError(f"RUNTIME_START_METHOD must be fork or spawn, got {method!r}")
    _raise_nofile()
    base = _base_dir()
    _remove_stale_nodes(base)
    directory = tempfile.mkdtemp(prefix=f"rt-{os.getpid()}-", dir=base)
    try:
        os.mkdir(os.path.join(directory, "names"), 0o700)
        table = _table.Table(os.path.join(directory, "table"), create=True)
        node_id = int.from_bytes(os.urandom(4), "big") | 1
        serial, slot = table.allocate()
        table.set_os_pid(slot, os.getpid())
        me = Pid(node_id, serial, slot, os.getpid())
        root_serial, root_slot = table.allocate()
        root = Pid(node_id, root_serial, root_slot, 0)  # os_pid known once started
        info = NodeInfo(directory, os.urandom(32), node_id, me, root, method)
        node = _node.Node(info, me, _listen_at(info.sock_path(serial)), table, is_main=True)
        _start_root(node)
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    atexit.register(_shutdown_at_exit)
    return node


def _start_root(node: _node.Node) -> None:
    table = node.table
    assert node.info.root is not None
    serial, slot = node.info.root.serial, node.info.root.slot
    listen = _listen_at(node.info.sock_path(serial))
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    boot = _launch.Boot(
        node.info, serial, slot, node.me, os.getpid(), [],
        _launch.InheritFd(listen.fileno()), _launch.InheritFd(theirs.fileno()),
        target=(_root_main, ()), trap=True, pdeathsig=False,
    )
    try:
        popen = _launch.RuntimeProcess(boot, "runtime-root").start_with("spawn")
    finally:
        listen.close()
        theirs.close()
    table.set_os_pid(slot, popen.pid)
    root = Pid(node.node_id, serial, slot, popen.pid)
    with node.lock:
        node.add_child(root, popen, ours, link=False)
    node.root = root
    try:
        node.call(root, ("$ping",), 60.0)
    except ProcessError as exc:
        raise ProcessError(
            f"the runtime's root process failed to start ({exc}); if this program starts "
            "processes at import time, put that code under `if __name__ == \"__main__\":`"
        ) from exc


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
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        if not poller.poll(timeout * 1000):
            return False
    finally:
        os.close(fd)
    try:
        popen.poll(0)
    except OSError:
        pass
    return True


def _shutdown_at_exit() -> None:
    try:
        shutdown_node(5.0)
    except Exception:
        pass


def shutdown_node(timeout: float) -> None:
    node = _node.current_or_none()
    if node is None:
        return
    if not node.is_main:
        raise ProcessError("shutdown() stops the whole node: call it from the embedding process")
    with _node._start_lock:
        if _node.current_or_none() is not node:
            return
        root = node.root
        watch = node.children.get(root.serial) if root is not None else None
        if root is not None and watch is not None:
            child = watch.child  # keep it: the call below may see the root exit and reap it
            try:
                node.call(root, ("$shutdown", timeout), timeout + 10.0)
            except ProcessError:
                pass
            if not _wait_gone(child, timeout + 5.0):
                child.kill()
                _wait_gone(child, 5.0)
        node.close()
        node.table.close()
        shutil.rmtree(node.info.dir, ignore_errors=True)
        _node.set_current(None)


# ----------------------------------------------------------------- the root process


def _root_main() -> None:
    _fork.prepare()
    _Root().run()


class _Root:
    """The root's loop: spawn requests, kill escalations, orphans, the main's death."""

    def __init__(self) -> None:
        node = self.node = _node.current()
        _launch.prctl(_launch.PR_SET_CHILD_SUBREAPER, 1)
        self.main_ref = node.monitor(node.info.main)
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.sigchld_r = r
        signal.signal(signal.SIGCHLD, lambda signo, frame: None)
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        node.extra_fds.append(w)
        node.add_reader(r, self._reap_orphans)
        self.timers: list[tuple[float, int, Pid]] = []

    def run(self) -> None:
        node = self.node
        while True:
            timeout = None
            if self.timers:
                timeout = max(0.0, self.timers[0][0] - time.monotonic())
            try:
                msg = node.receive(timeout, None)
            except TimeoutError:
                msg = None
            if self.timers:
                self._escalate_due()
            if msg.__class__ is tuple and msg:
                if msg[0] == "$gen_call":
                    request = msg[2]
                    try:
                        result = self._handle_call(request)
                    except Exception as exc:  # a failed fork must not take the node down
                        result = ("$error", exc)
                    node.reply(msg[1], result)
                    if request[0] == "$shutdown":
                        node.exit_process("normal")
                elif msg[0] == "$escalate":
                    heapq.heappush(
                        self.timers, (time.monotonic() + EXIT_GRACE, msg[1].serial, msg[1])
                    )
            elif msg.__class__ is Down and msg.ref == self.main_ref:
                self._teardown(graceful=False, timeout=0.0)
                node.exit_process("normal")

    def _escalate_due(self) -> None:
        """SIGKILL the doomed processes that did not run their exit path in time."""
        now = time.monotonic()
        table = self.node.table
        while self.timers and self.timers[0][0] <= now:
            _, _, pid = heapq.heappop(self.timers)
            if table.state(pid.serial, pid.slot) != _table.DOOMED:
                continue
            try:
                fd = os.pidfd_open(pid.os_pid)
            except OSError:
                continue
            try:
                if table.state(pid.serial, pid.slot) == _table.DOOMED:
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
            except OSError:
                pass
            finally:
                os.close(fd)

    def _handle_call(self, request: Any) -> Any:
        node = self.node
        kind = request[0]
        if kind == "$spawn":
            _, payload, link, trap = request
            # Unpickle here rather than in each child: the modules the target needs are
            # then imported once in the root and inherited by every later fork. If that
            # fails, the child unpickles it and crashes with the true error.
            target = None
            if node.info.start_method == "fork":
                try:
                    target = pickle.loads(payload)
                    payload = None
                except Exception:
                    target = (_launch.run_payload, (payload,))
                    payload = None
            return _launch.start_child(
                node, target, payload=payload,
                link_to=node.info.main if link else None, trap=trap,
            )
        if kind == "$ping":
            return "pong"
        if kind == "$shutdown":
            self._teardown(graceful=True, timeout=request[1])
            return "ok"
        return ("error", f"unknown request {request!r}")

    def _reap_orphans(self) -> None:
        """SIGCHLD: record and reap dead processes that were reparented to us."""
        node = self.node
        try:
            while os.read(self.sigchld_r, 4096):
                pass
        except OSError:
            pass
        node._run_deferred()
        index = None
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if info is None:
                return
            serial = node.child_by_os_pid.get(info.si_pid)
            if serial is not None:
                w = node.watches.get(serial)
                if w is not None:
                    node._on_death(w)
                    node._run_deferred()  # reaps it, or waitid would find it again
                    continue
            if index is None:  # one pass over the table for all orphans of this wake-up
                index = {os_pid: (serial, slot) for serial, slot, os_pid in node.table.live_slots()}
            found = index.get(info.si_pid)
            if found is None:  # it began its exit (EXITED) but was killed before the end
                found = node.table.exited_slot_of(info.si_pid)
            if found is not None:
                node.table.publish(found[0], found[1], info.si_code, info.si_status)
                try:
                    os.unlink(node.info.sock_path(found[0]))
                except OSError:
                    pass
            try:
                os.waitpid(info.si_pid, 0)
            except ChildProcessError:
                pass

    def _stop_one(self, pid: Pid, timeout: float) -> None:
        """exit(pid, "shutdown"), then wait for it: a process that does not trap exits
        and is stuck in a C call is SIGKILLed after EXIT_GRACE (the escalation the main
        loop would do), anything else after ``timeout``."""
        node = self.node
        ref = node.monitor(pid, internal=True)
        node.exit(pid, "shutdown")
        grace = min(timeout, EXIT_GRACE)
        if node.wait_down((ref,), grace) is not None:
            return
        if node.table.state(pid.serial, pid.slot) == _table.DOOMED:
            timeout = grace
        if node.wait_down((ref,), max(0.0, timeout - grace)) is not None:
            return
        try:
            os.kill(pid.os_pid, signal.SIGKILL)  # our child, not reaped: the pid is safe
        except OSError:
            pass
        if node.wait_down((ref,), 5.0) is None:
            node.demonitor(ref, True)

    def _teardown(self, graceful: bool, timeout: float) -> None:
        node = self.node
        table = node.table
        main = node.info.main
        if graceful:
            # One at a time, last started first, each gone before the next is asked (as
            # OTP stops applications), each with up to ``timeout`` seconds.
            for pid in reversed([w.pid for w in node.children.values()]):
                self._stop_one(pid, timeout)
        # Kill whatever is left anywhere in the node, and wait until it is gone.
        pidfds = []
        for serial, slot, os_pid in table.live_slots():
            if serial in (node.me.serial, main.serial) or os_pid == 0:
                continue
            try:
                fd = os.pidfd_open(os_pid)
            except OSError:
                continue
            if table.state(serial, slot) == _table.EXITED:
                os.close(fd)
                continue
            table.doom(serial, slot, "killed" if not graceful else "shutdown")
            try:
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            except OSError:
                pass
            pidfds.append(fd)
        poller = select.poll()
        for fd in pidfds:
            poller.register(fd, select.POLLIN)
        waiting = len(pidfds)
        end = time.monotonic() + 5.0
        while waiting and time.monotonic() < end:
            for fd, _ in poller.poll(100):
                poller.unregister(fd)
                waiting -= 1
        for fd in pidfds:
            os.close(fd)
        for w in list(node.children.values()):
            node._on_death(w)
        node._run_deferred()
        self._reap_orphans()
        shutil.rmtree(node.info.dir, ignore_errors=True)
