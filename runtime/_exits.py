"""Internal: exit signals, and the exit path of a runtime process.

An exit signal to a process that traps exits becomes an ``Exit`` message. One to
a process that does not trap is delivered by the kernel, so that it reaches a
process busy in its own code: the killer writes the reason in the table
("doomed") and sends ``SIG_EXIT``; the victim's handler runs its exit path at
once, which hands the exit on to its own links; the root SIGKILLs it if it has
not exited ``EXIT_GRACE`` seconds later (a long C call never runs the handler).
The handler never acts inside a node section: it defers the signal until the
section is over (``Poller.defer_signal``). An exit decided while handling events
(a linked process died) is likewise run once the section is over
(:meth:`Exits.run_requested`).
"""

from __future__ import annotations

import logging
import os
import pickle
import select
import signal
import sys
import time
from collections.abc import Callable
from typing import Any, NoReturn

from . import _table, _wire
from ._conns import Connections
from ._mailbox import Mailbox, Raw
from ._names import Names
from ._poller import FdSet, Poller
from ._watches import NOT_YET, Watch, Watches
from .errors import Crash, ProcessError, is_clean_exit
from .messages import Exit
from .pid import Pid

log = logging.getLogger("runtime")

SIG_EXIT = signal.SIGRTMIN + 1
# How long a doomed process gets to run its exit path before the root SIGKILLs it.
EXIT_GRACE = 0.25
# How long an exit path may take in all: passing its exit on to peers that do not
# read, and waiting for its children to finish their own exits.
CHILD_EXIT_GRACE = 1.0

SendFrame = Callable[[Pid, list[bytes], "float | None"], bool]


def _log_exit(pid: Pid, names: list[str], reason: Any) -> None:
    who = f"{pid!r} ({', '.join(names)})" if names else repr(pid)
    if isinstance(reason, Crash):
        log.error("process %s crashed: %s\n%s", who, reason, reason.traceback.rstrip())
    else:
        log.error("process %s exited: %r", who, reason)


class Exits:
    """How one process sends, receives and acts on exit signals. Methods marked "lock
    held" run inside a node section; the others take the lock themselves."""

    def __init__(self, *, me: Pid, main: Pid, root: Pid | None, is_main: bool,
                 table: _table.Table, poller: Poller, conns: Connections, watches: Watches,
                 mailbox: Mailbox, names: Names, sock_path: Callable[[int], str],
                 send: SendFrame, trap: bool,
                 runtime_fds: Callable[[], FdSet] | None = None) -> None:
        self._me = me
        self._runtime_fds = runtime_fds
        self._main = main
        self._root = root
        self._is_main = is_main
        self._table = table
        self._poller = poller
        self._conns = conns
        self._watches = watches
        self._mailbox = mailbox
        self._names = names
        self._sock_path = sock_path
        self._send = send
        self.trap = trap or is_main
        self.exiting = False
        self.requested: tuple[Any] | None = None
        table.set_trap(me.slot, self.trap)

    # ------------------------------------------------------- signals received

    def set_trap(self, flag: bool) -> bool:
        """Trap exits or not; the previous setting. The embedding process always traps."""
        if self._is_main:
            return True
        old, self.trap = self.trap, bool(flag)
        self._table.set_trap(self._me.slot, self.trap)
        return old

    def on_exit_signal(self, sender: Pid, data: bytes) -> None:
        """An exit signal ``sender`` sent as a frame (lock held): it was trapping when
        the sender looked."""
        if self.exiting:
            return
        if self.trap:
            self._mailbox.put_exit(Raw(data, sender))
            return
        try:
            reason = pickle.loads(data)
        except Exception:
            reason = "killed"
        if reason == "kill":
            self.request("killed")
        elif reason != "normal":
            self.request(reason)

    def on_linked_exit(self, pid: Pid, reason: Any) -> None:
        """The linked process ``pid`` exited with ``reason`` (lock held)."""
        if self.exiting:
            return
        if self.trap:
            if self._is_main and reason == "normal":
                return
            self._mailbox.put_exit(Exit(pid, reason))
        elif reason != "normal":
            self.request(reason)

    def request(self, reason: Any) -> None:
        """Exit with ``reason`` once the current section is over (lock held)."""
        if self.requested is None:
            self.requested = (reason,)

    def run_requested(self) -> None:
        """Run the exit an event asked for, if any (lock not held)."""
        if self.requested is not None and not self.exiting:
            self.run(self.requested[0], log_crash=False)

    def on_signal(self, signo: int, frame: Any) -> None:
        """The SIG_EXIT handler: exit with the reason the killer wrote. Inside a node
        section, the signal is deferred until the section is over."""
        if os.getpid() != self._me.os_pid or self.exiting or self._is_main:
            return  # (a new child whose own handler is not in place yet looks itself)
        if self._poller.lock.locked():
            self._poller.defer_signal(signo)
            return
        reason = self._table.doomed_reason(self._me.serial, self._me.slot)
        if reason is not None:
            self.run(reason[0], log_crash=False)

    # ---------------------------------------------------------- signals sent

    def exit(self, pid: Pid, reason: Any) -> None:
        """OTP's exit/2: send an exit signal with ``reason`` to ``pid``.

        Raises:
            TypeError: ``reason`` cannot be pickled (whether the target traps exits
                or not: checked before anything is done).
        """
        me = self._me
        if reason.__class__ is not str:
            _wire.dumps(reason)
        if pid == me:
            if reason == "kill" and not self._is_main:
                self.run("killed", log_crash=False)
            if self.trap:
                with self._poller.lock:
                    self._mailbox.put_exit(Exit(me, reason))
                return
            self.run(reason, log_crash=False)
        if pid.node != me.node:
            return
        if pid == self._main:
            self._send(pid, _wire.control(_wire.EXIT, _wire.dumps(reason)), None)
        elif reason == "kill":
            if not self.force_exit(pid, "killed"):
                self._sigkill_exiting(pid)
        elif self._table.is_trapping(pid.serial, pid.slot):
            self._send(pid, _wire.control(_wire.EXIT, _wire.dumps(reason)), None)
        elif reason != "normal":
            self.force_exit(pid, reason)

    def force_exit(self, pid: Pid, reason: Any, deadline: float | None = None) -> bool:
        """Make ``pid`` exit with ``reason`` now, whatever it is doing: doom it in the
        table, send SIG_EXIT, and ask the root to SIGKILL it if it has not exited
        EXIT_GRACE seconds later. False if it was already dead or being killed."""
        if not self._table.doom(pid.serial, pid.slot, reason):
            return False
        try:
            with self._poller.lock:  # the watch's descriptor stays open meanwhile
                w = self._watches.get(pid.serial)
                if w is not None and w.child:
                    os.kill(pid.os_pid, SIG_EXIT)  # our unreaped child: the pid is safe
                elif w is not None:
                    signal.pidfd_send_signal(w.fd, SIG_EXIT)
                else:
                    fd = os.pidfd_open(pid.os_pid)
                    try:
                        signal.pidfd_send_signal(fd, SIG_EXIT)
                    finally:
                        os.close(fd)
        except OSError:
            return False
        root = self._root
        if root is not None:
            if root == self._me:
                with self._poller.lock:
                    self._mailbox.put(("$escalate", pid))
            else:
                self._send(root, _wire.message(_wire.dumps(("$escalate", pid))), deadline)
        return True

    def _sigkill_exiting(self, pid: Pid) -> None:
        """``exit(pid, "kill")`` of a process already in its exit path (it cannot be
        doomed any more): SIGKILL it if we hold a descriptor that is surely it (a
        watch made while it was alive, or our unreaped child); its recorded reason
        stands."""
        with self._poller.lock:
            w = self._watches.get(pid.serial)
            if w is None:
                return
            try:
                if w.child:
                    os.kill(pid.os_pid, signal.SIGKILL)
                else:
                    signal.pidfd_send_signal(w.fd, signal.SIGKILL)
            except OSError:
                pass

    # ------------------------------------------------------------ the exit path

    def run(self, reason: Any, log_crash: bool = True) -> NoReturn:
        """End this runtime process with ``reason``: never returns. Lock not held.

        In order:

        1. record the reason in the table (from then on no killer can doom us: links
           and monitors see one reason, the killer's if it came first);
        2. log it unless it is clean;
        3. read the frames still queued (a link made just now counts), and close
           every descriptor of the process's own code (the runtime's stay): what
           its links and watchers do on its exit, such as binding its port again,
           finds them released, as after a SIGKILL;
        4. pass the exit on to links: a linked process that does not trap exits is
           killed with ``reason`` (if abnormal); a linked *child* that traps exits
           gets the exit signal as a message, so it can run ``terminate``;
        5. stop the other children with reason ``"shutdown"``;
        6. wait for the children to be gone, so each can pass its own exit on before
           the kernel's parent-death SIGKILL, and record their reasons;
        7. drop our names, remove our socket file, and exit.

        Steps 4 to 6 share one deadline, CHILD_EXIT_GRACE seconds from the start: a
        peer that does not read or a child that does not stop cannot hold the exit
        up longer (a frame that cannot be written by then is dropped; the peer still
        sees the death through its watch).
        """
        code = 0 if reason == "normal" else 1
        deadline = time.monotonic() + CHILD_EXIT_GRACE
        self.exiting = True
        try:
            if self._is_main:
                raise ProcessError("the embedding process cannot exit through the runtime")
            me = self._me
            stands = self._table.begin_exit(me.serial, me.slot, reason)
            if stands is not reason and stands != reason:
                reason, log_crash = stands, False
                code = 0 if reason == "normal" else 1
            if log_crash and not is_clean_exit(reason):
                _log_exit(me, self._names.held_by(me), reason)
            with self._poller.lock:
                try:
                    self._conns.drain_all()
                except Exception:
                    pass
                self._poller.run_jobs()
                links = self._watches.links()
                children = {w.pid.serial: w for w in self._watches.children()}
                self._release_descriptors()
            self._pass_on(reason, links, children, deadline)
            self._wait_gone(list(children.values()), deadline)
            self._names.drop_own()
        except BaseException as exc:  # the process must end whatever happens here
            try:
                os.write(2, f"{self._me!r}: error while exiting: {exc!r}\n".encode())
            except BaseException:
                pass
        finally:
            try:
                os.unlink(self._sock_path(self._me.serial))
            except BaseException:
                pass
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except BaseException:
                    pass
            os._exit(code)

    def _pass_on(self, reason: Any, links: list[Pid], children: dict[int, Watch],
                 deadline: float) -> None:
        table = self._table
        for pid in links:
            if pid == self._main:
                continue  # it traps exits and watches us
            if table.is_trapping(pid.serial, pid.slot):
                if pid.serial in children:
                    self._send(pid, _wire.control(_wire.EXIT, _wire.dumps(reason)), deadline)
            elif reason != "normal":
                self.force_exit(pid, reason, deadline)
        for serial, w in children.items():
            if not (w.linked and table.is_trapping(serial, w.pid.slot)):
                self.force_exit(w.pid, "shutdown", deadline)

    def _release_descriptors(self) -> None:
        """Release what every descriptor but the standard streams and the runtime's own
        refers to (lock held, in the exit path). Each is made a copy of /dev/null
        rather than closed: a thread of the process's code may still use its number,
        which must not become one of the runtime's new connections."""
        if self._runtime_fds is None:
            return
        keep = self._runtime_fds()
        for fd in (0, 1, 2, self._table.fd):
            keep.add(fd)
        try:
            null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            return
        keep.add(null)
        try:
            for name in os.listdir("/proc/self/fd"):
                fd = int(name)
                if fd not in keep:
                    try:
                        os.dup2(null, fd, inheritable=False)
                    except OSError:
                        pass  # (the listing's own descriptor, closed by now)
        finally:
            os.close(null)

    def _wait_gone(self, children: list[Watch], deadline: float) -> None:
        """Wait until ``children`` are dead (or the deadline), then record the reasons
        of those that are, so that a watcher finds them after we are gone."""
        waiter = select.poll()
        waiting = 0
        for w in children:
            waiter.register(w.fd, select.POLLIN)
            waiting += 1
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for fd, _ in waiter.poll(min(left, 86400.0) * 1000):  # (poll takes an int)
                waiter.unregister(fd)
                waiting -= 1
        with self._poller.lock:
            for w in children:
                if self._watches.get(w.pid.serial) is w:
                    status = self._watches.child_status(w)
                    if status is not None and status != NOT_YET:
                        self._watches.publish(w.pid, status)
