"""Internal: the node's root process.

The embedding process starts the root with ``multiprocessing``'s spawn method
(see ``_embed``). The root is a small runtime process that

- is the embedding process's fork server (see ``_forkserver``): it forks the
  processes the embedding process spawns (the embedding process must never
  fork), so it is their parent and reaps them, and keeps ``warm_children`` of
  them started ahead;
- is the child subreaper of the node: a process whose parent died is reparented
  to it, and it records the exit of such orphans before reaping them;
- SIGKILLs a process that was sent an exit signal and has not exited
  ``EXIT_GRACE`` seconds later (a long C call never runs the exit signal's
  handler);
- watches the embedding process: if it dies, even by SIGKILL, the root kills
  every process of the node, removes the node's directory, and exits. So it does
  on SIGTERM, SIGHUP or SIGQUIT (what ``timeout``, a terminal or a service
  manager send to the whole process group);
- on ``shutdown``, stops its children in reverse start order, kills stragglers,
  and removes the directory;
- forks the node's *janitor*, a process in a session of its own (so that a signal
  to the whole process group misses it) that waits to take the node's lock
  exclusively, which it gets once the embedding process and the root are both
  gone, however they died, then removes the node's directory and exits. After a
  SIGKILL of the whole group it is the one left to clean up.
"""

from __future__ import annotations

import fcntl
import heapq
import importlib
import logging
import os
import select
import shutil
import signal
import time
from typing import Any, NamedTuple

from . import _current, _launch, _table
from ._exits import EXIT_GRACE
from ._forkserver import ForkServer
from ._node import Node
from .messages import Down
from .pid import From, Pid

log = logging.getLogger(__name__)

# Signals that end the whole node when the root gets them.
ENDING = (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


class Escalation(NamedTuple):
    """A doomed process to SIGKILL at ``due`` if it has not exited."""

    due: float
    serial: int
    pid: Pid


def hold_node_lock(node_dir: str, create: bool = False) -> int:
    """Open the node's lock file and hold it (shared) as long as the descriptor stays
    open: the node is alive (see ``_embed``). ``create``: make it, locked before it
    appears under its name, so that no cleaner finds it unlocked."""
    path = os.path.join(node_dir, "lock")
    if not create:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        fcntl.flock(fd, fcntl.LOCK_SH)
        return fd
    fd = os.open(f"{path}.new", os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_SH)
    os.rename(f"{path}.new", path)
    return fd


def start_janitor(node_dir: str) -> int:
    """Fork the node's janitor (see the module docstring); its OS pid."""
    lock = os.path.join(node_dir, "lock")
    pid = os.fork()
    if pid:
        return pid
    try:  # the janitor: nothing of the root's but its code
        os.setsid()
        for signo in (signal.SIGCHLD, *ENDING):
            signal.signal(signo, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        os.closerange(3, 1 << 20)  # (the root's copy of the lock among them)
        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
        fcntl.flock(fd, fcntl.LOCK_EX)  # until every holder is gone
        shutil.rmtree(node_dir, ignore_errors=True)
    finally:
        os._exit(0)


def main(preload: tuple[str, ...], warm_children: int, warm_imports: bool = True) -> None:
    """The root's process function (its target). ``preload``: modules the user asked
    the root to import (``runtime.configure``), which the processes it forks then
    inherit instead of importing each; ``warm_children``: how many to keep started
    ahead; ``warm_imports``: whether they import ahead the modules of the targets
    before them (see the module docstring)."""
    # The runtime's own dependency, imported once here rather than in every child the
    # root forks: a target from the embedding process is unpickled with it.
    import cloudpickle  # noqa: F401

    for name in preload:
        importlib.import_module(name)
    threads = len(os.listdir("/proc/self/task"))
    if threads != 1:
        raise RuntimeError(f"preloading {', '.join(preload)} left the node's root with "
                           f"{threads} threads: the processes it forks would inherit "
                           "locks those threads hold; preload only modules that start "
                           "no thread at import")
    Root(warm_children, warm_imports).run()


class Root:
    """The root's loop: spawn requests, escalations, orphans, the end of the node."""

    def __init__(self, warm_children: int, warm_imports: bool = True) -> None:
        node = _current.get()
        assert node is not None
        self.node: Node = node
        _launch.prctl(_launch.PR_SET_CHILD_SUBREAPER, 1)
        node.extra_fds.append(hold_node_lock(node.info.dir))
        self.janitor = start_janitor(node.info.dir)
        self.main_ref = node.monitor(node.info.main)
        # Signals reach the loop through a pipe (the interpreter writes their numbers).
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._signals = r
        for signo in (signal.SIGCHLD, *ENDING):
            signal.signal(signo, _ignore)
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        node.extra_fds.append(w)
        node.add_reader(r, self._on_signals)
        self.timers: list[Escalation] = []
        self.server = ForkServer(node, node.info.main, warm_children, warm_imports,
                                 default_signals=(signal.SIGCHLD, *ENDING))

    def run(self) -> None:
        node = self.node
        while True:
            timeout = None
            if self.timers:
                timeout = max(0.0, self.timers[0].due - time.monotonic())
            msg = self.server.next_message(timeout)
            if self.timers:
                self._escalate_due()
            if msg is None:
                continue
            if msg.__class__ is Down and msg.ref == self.main_ref:
                self._teardown(graceful=False, timeout=0.0)
                node.exit_process("normal")
            if self.server.handle(msg):
                continue
            if msg.__class__ is tuple and msg:
                if msg[0] == "$gen_call":
                    _, caller, request = msg
                    try:
                        result = self._handle_call(request, caller)
                    except Exception as exc:
                        result = ("$error", exc)
                    node.reply(caller, result)
                    if request[0] == "$shutdown":
                        node.exit_process("normal")
                elif msg[0] == "$escalate":
                    pid = msg[1]
                    heapq.heappush(self.timers, Escalation(time.monotonic() + EXIT_GRACE,
                                                           pid.serial, pid))
                elif msg[0] == "$end":
                    self._teardown(graceful=False, timeout=0.0)
                    node.exit_process("normal")

    def _handle_call(self, request: Any, caller: From) -> Any:
        kind = request[0]
        if kind == "$janitor":
            return self.janitor
        if kind == "$ping":
            return "pong"
        if kind == "$shutdown":
            self._teardown(graceful=True, timeout=request[1])
            return "ok"
        return ("$error", ValueError(f"unknown request {request!r}"))

    def _escalate_due(self) -> None:
        """SIGKILL the doomed processes that did not run their exit path in time."""
        now = time.monotonic()
        table = self.node.table
        while self.timers and self.timers[0].due <= now:
            pid = heapq.heappop(self.timers).pid
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

    def _on_signals(self) -> None:
        """The signal pipe is readable (lock held): orphans to reap, or the end."""
        try:
            got = os.read(self._signals, 4096)
        except OSError:
            got = b""
        if any(signo in got for signo in ENDING):
            self.node.mailbox.put(("$end",))
        self._reap_orphans()

    def _reap_orphans(self) -> None:
        """Record and reap dead processes that were reparented to us (lock held)."""
        node = self.node
        node.poller.run_jobs()  # reap our own dead children whose Down is out
        index = None
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if info is None:
                return
            w = node.watches.child_of_os_pid(info.si_pid)
            if w is not None:
                node.handle_death(w)
                node.poller.run_jobs()  # reaps it, or waitid would find it again
                if node.watches.child_of_os_pid(info.si_pid) is None:
                    continue
            table = node.table
            # One pass over the table for the orphans of this wake-up, and another
            # for one it does not know: a process may have been given its OS pid
            # in the table (by its parent, which died then) since the pass.
            found = None if index is None else index.get(info.si_pid)
            if found is None:
                index = {os_pid: (serial, slot)
                         for serial, slot, os_pid in table.live_slots(ahead=True)}
                found = index.get(info.si_pid)
            if found is None:  # it began its exit (EXITED) but was killed before the end
                found = table.exited_slot_of(info.si_pid)
            if found is not None:
                table.publish(found[0], found[1], info.si_code, info.si_status)
                unstarted = table.take_unstarted(found[1])  # (killed while it forked one)
                for serial in (found[0], unstarted):
                    if serial is not None:
                        try:
                            os.unlink(node.info.sock_path(serial))
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
        skip = {node.me.serial, node.info.main.serial}
        self.server.stop_warming()
        if graceful:
            # One at a time, last started first, each gone before the next is asked (as
            # OTP stops applications), each with up to ``timeout`` seconds.
            with node.poller.lock:
                children = [w.pid for w in node.watches.children()]
            children.sort(key=lambda pid: table.start_order(pid.slot))
            for pid in reversed(children):
                self._stop_one(pid, timeout)
        # Kill whatever is left anywhere in the node, and wait until it is gone.
        pidfds = []
        for serial, slot, os_pid in table.live_slots(ahead=True):
            if serial in skip or os_pid == 0:
                continue
            try:
                fd = os.pidfd_open(os_pid)
            except OSError:
                continue
            if table.state(serial, slot) == _table.EXITED:
                os.close(fd)
                continue
            table.doom(serial, slot, "shutdown" if graceful else "killed")
            try:
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            except OSError:
                pass
            pidfds.append(fd)
        waiter = select.poll()
        for fd in pidfds:
            waiter.register(fd, select.POLLIN)
        waiting = len(pidfds)
        end = time.monotonic() + 5.0
        while waiting and time.monotonic() < end:
            for fd, _ in waiter.poll(100):
                waiter.unregister(fd)
                waiting -= 1
        for fd in pidfds:
            os.close(fd)
        with node.poller.lock:
            for w in node.watches.children():
                node.handle_death(w)
            node.poller.run_jobs()
            self._reap_orphans()
        shutil.rmtree(node.info.dir, ignore_errors=True)


def _ignore(signo: int, frame: Any) -> None:
    """A Python-level handler, so that the signal reaches the wakeup pipe."""
