"""Internal: exit signals, and the exit path of a runtime process.

An exit signal to a process that does not trap exits writes its reason in the
table ("doomed") and sends SIG_EXIT: the process runs its own exit path at once,
so it hands the exit on to its own links; the root SIGKILLs it if it has not
exited EXIT_GRACE seconds later (a long C call never runs the handler).
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time
from typing import Any, NoReturn

from . import _table
from ._base import (
    CHILD_EXIT_GRACE,
    SIG_EXIT,
    Conn,
    NodeState,
    _readable,
    log,
)
from ._wire import T_EXIT, T_MSG
from .errors import Crash, ProcessError, is_clean_exit
from .messages import Exit
from .pid import Pid


def _log_exit(pid: Pid, reason: Any) -> None:
    if isinstance(reason, Crash):
        log.error("process %r crashed: %s\n%s", pid, reason, reason.traceback.rstrip())
    else:
        log.error("process %r exited: %r", pid, reason)


class Exits(NodeState):
    """Part of Node (see ``_node``); a mixin, it uses the node's state."""

    def _exit_signal(self, sender: Pid, reason: Any) -> None:
        if self.exiting:
            return
        if self.trap:
            self._queue_exit(Exit(sender, reason))
        elif reason == "kill":
            self.exit_process("killed", log_crash=False)
        elif reason != "normal":
            self.exit_process(reason, log_crash=False)

    def kill(self, pid: Pid, reason: Any) -> bool:
        """Make ``pid`` exit with ``reason`` now, whatever it is doing.

        The reason is written in the table first ("doomed"); then SIG_EXIT makes the
        process run its own exit path at once, so it passes the exit on to its own
        links; the root SIGKILLs it if it has not exited EXIT_GRACE seconds later (a
        long C call never returns to the interpreter to run the handler). Returns
        False if it was already dead or already being killed."""
        if not self.table.doom(pid.serial, pid.slot, reason):
            return False
        w = self.watches.get(pid.serial)
        try:
            if w is not None and w.child is None:
                signal.pidfd_send_signal(w.fd, SIG_EXIT)
            elif w is not None:
                os.kill(pid.os_pid, SIG_EXIT)  # our unreaped child: the pid is safe
            else:
                fd = os.pidfd_open(pid.os_pid)
                try:
                    signal.pidfd_send_signal(fd, SIG_EXIT)
                finally:
                    os.close(fd)
        except (ProcessLookupError, OSError):
            return False
        root = self.info.root
        if root is not None:
            if root == self.me:
                self.mailbox.append(("$escalate", pid))
            else:
                self._send(root, (T_MSG, ("$escalate", pid)))
        return True

    def exit(self, pid: Pid, reason: Any) -> None:
        """OTP's exit/2: send an exit signal with ``reason`` to ``pid``."""
        with self.lock:
            if pid == self.me:
                if reason == "kill" and not self.is_main:
                    self.exit_process("killed", log_crash=False)
                if self.trap:
                    self._queue_exit(Exit(self.me, reason))
                    self._notify()
                    return
                self.exit_process(reason, log_crash=False)
            if pid.node != self.node_id:
                return
            if pid == self.info.main:
                self._send(pid, (T_EXIT, self.me, reason))
                return
            if reason == "kill":
                if not self.kill(pid, "killed"):
                    self._sigkill_exiting(pid)
            elif self.table.is_trapping(pid.serial, pid.slot):
                self._send(pid, (T_EXIT, self.me, reason))
            elif reason != "normal":
                self.kill(pid, reason)

    def _sigkill_exiting(self, pid: Pid) -> None:
        """``exit(pid, "kill")`` of a process already in its exit path (it cannot be
        doomed any more): SIGKILL it if we hold a descriptor that is surely it (a watch
        made while it was alive, or our unreaped child); its recorded reason stands."""
        w = self.watches.get(pid.serial)
        if w is None:
            return
        try:
            if w.child is not None:
                os.kill(pid.os_pid, signal.SIGKILL)
            else:
                signal.pidfd_send_signal(w.fd, signal.SIGKILL)
        except OSError:
            pass

    def is_alive(self, pid: Pid) -> bool:
        if pid == self.me:
            return True
        if pid.node != self.node_id or pid.serial in self.dead:
            return False
        with self.lock:  # another thread could close the watch's descriptor
            w = self.watches.get(pid.serial)
            if w is not None:  # we watch it: its pidfd or sentinel is readable once dead
                return not _readable(w.fd, 0)
        if self.table.state(pid.serial, pid.slot) == _table.EXITED:
            return False
        # The slot says alive: the OS process is ours (not reaped), maybe a zombie, or
        # in its exit (its parent may have delivered its Down already).
        return _table.zombie_status(pid.os_pid, exiting=True) is None

    def exit_process(self, reason: Any, log_crash: bool = True) -> NoReturn:
        """End this runtime process with ``reason``: never returns.

        In order:

        1. read the control frames still queued (a link made just now counts);
        2. log the reason unless it is clean;
        3. pass the exit on to links: a linked process that does not trap exits is
           killed with ``reason`` (if abnormal); a linked *child* that traps exits
           gets the exit signal as a message, so it can run ``terminate``;
        4. stop the other children with reason ``"shutdown"``;
        5. wait for the children to be gone, so each can pass its own exit on before
           the kernel's parent-death SIGKILL;
        6. drop our names, write our reason in the table, and exit.

        Steps 3 to 5 share one deadline, CHILD_EXIT_GRACE seconds from the start: a
        peer that does not read or a child that does not stop cannot hold the exit up
        longer (a frame that cannot be written by then is dropped; the peer still sees
        the death through its watch).
        """
        code = 0 if reason == "normal" else 1
        self.exit_deadline = time.monotonic() + CHILD_EXIT_GRACE
        self.exiting = True
        try:
            if self.is_main:
                raise ProcessError("the embedding process cannot exit through the runtime")
            # From here on no killer can doom us: links and monitors see one reason, the
            # killer's if it came first (then our parent must not reap it as a crash).
            stands = self.table.begin_exit(self.me.serial, self.me.slot, reason)
            if stands is not reason and stands != reason:
                reason, log_crash = stands, False
                code = 0 if reason == "normal" else 1
            if log_crash and not is_clean_exit(reason):
                _log_exit(self.me, reason)
            try:
                self._accept_all()
                for conn in list(self.handlers.values()):
                    if conn.__class__ is Conn:
                        self._read(conn, drain=True)
            except Exception:
                pass
            self._run_deferred()
            table = self.table
            main = self.info.main
            for pid in list(self.links.values()):
                if pid == main:
                    continue
                if table.is_trapping(pid.serial, pid.slot):
                    if pid.serial in self.children:
                        self._send(pid, (T_EXIT, self.me, reason))
                elif reason != "normal":
                    self.kill(pid, reason)
            for serial, w in list(self.children.items()):
                if not (w.linked and table.is_trapping(serial, w.pid.slot)):
                    self.kill(w.pid, "shutdown")
            self._wait_children_gone(self.exit_deadline)
            for w in list(self.children.values()):
                if self.watches.get(w.pid.serial) is w and self._child_exited(w):
                    self._on_death(w)
            self._run_deferred()
            from . import registry

            for name in list(self.names):
                registry.drop_name_of(self, name)
        except BaseException as exc:  # the process must end whatever happens here
            try:
                os.write(2, f"{self.me!r}: error while exiting: {exc!r}\n".encode())
            except BaseException:
                pass
        finally:
            try:
                os.unlink(self.info.sock_path(self.me.serial))
            except BaseException:
                pass
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except BaseException:
                    pass
            os._exit(code)

    def _wait_children_gone(self, deadline: float) -> None:
        poller = select.poll()
        waiting = 0
        for w in self.children.values():
            poller.register(w.fd, select.POLLIN)
            waiting += 1
        while waiting:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            for fd, _ in poller.poll(remaining * 1000):
                poller.unregister(fd)
                waiting -= 1
