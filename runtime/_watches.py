"""Internal: a node's watches, and what happens when a watched process dies.

A watch is one descriptor per watched process that becomes readable when it
dies: the ``multiprocessing`` sentinel for a child, a pidfd for anything else.
Monitors, links and pending calls on the same process share it. On a death the
node drains what the process sent first (its messages come before its Down),
reads the true reason (see ``_table``), and delivers Down, call errors, and
Exit (or death) for a link. A dead child is reaped after its Down is out, once
its parent is idle.
"""

from __future__ import annotations

import _socket
import os
import signal
import time
from typing import Any

from . import _base, _table, _wire
from ._base import (
    _PENDING,
    CLEANUP_DUE,
    EPOLLIN,
    YIELD_PAUSE,
    YIELD_SLOW,
    NodeState,
    Reader,
    Watch,
    _code_and_status,
    _readable,
    log,
)
from .messages import Down, Exit
from .pid import Pid


class Watches(NodeState):
    """Part of Node (see ``_node``); a mixin, it uses the node's state."""

    def _watch(self, pid: Pid) -> Watch | None:
        """The watch on ``pid``, made if needed. None if ``pid`` is already dead."""
        w = self.watches.get(pid.serial)
        if w is not None:
            return w
        if pid.node != self.node_id or pid.serial in self.dead:
            return None
        try:
            fd = os.pidfd_open(pid.os_pid)
        except (ProcessLookupError, OSError):
            return None
        # The table marks a process EXITED before anyone reaps it, so while its slot is
        # not EXITED the OS pid cannot have been recycled: this pidfd is the right process.
        # A readable pidfd is a process that already died (a zombie): it is not there.
        if self.table.state(pid.serial, pid.slot) == _table.EXITED or _readable(fd, 0):
            os.close(fd)
            return None
        w = Watch(pid, fd)
        self.watches[pid.serial] = w
        self.handlers[fd] = w
        self.epoll.register(fd, EPOLLIN)
        return w

    def _maybe_unwatch(self, w: Watch) -> None:
        if w.child is not None or w.monitors or w.calls or w.linked or w.keep:
            return
        self._remove_watch(w)

    def _remove_watch(self, w: Watch) -> None:
        if self.watches.get(w.pid.serial) is w:
            del self.watches[w.pid.serial]
        self.handlers.drop(w.fd, w, self.epoll)
        if w.owns_fd:
            w.owns_fd = False  # closed once: the number may be reused at once
            os.close(w.fd)

    def add_child(self, pid: Pid, popen: Any, conn_sock: _socket.socket, link: bool) -> None:
        """Record a child that has been started: watch its sentinel, adopt its socketpair."""
        w = self.prepare_child(pid, popen.sentinel, conn_sock, link)
        self.child_started(w, popen)

    def prepare_child(self, pid: Pid, sentinel: int, conn_sock: _socket.socket,
                      link: bool) -> Watch:
        """Record a child about to be forked (``pid.os_pid`` is set once it is). Done
        before the fork because after it every page the parent writes is copied."""
        w = Watch(pid, sentinel, child=True)
        self.watches[pid.serial] = w
        self.children[pid.serial] = w
        self.handlers[sentinel] = w
        self.epoll.register(sentinel, EPOLLIN)
        self.adopt_conn(conn_sock, pid)
        if link:
            w.linked = True
            self.links[pid.serial] = pid
        return w

    def child_started(self, w: Watch, popen: Any) -> None:
        w.pid.os_pid = popen.pid
        w.child = popen
        self.child_by_os_pid[popen.pid] = w.pid.serial

    def child_failed(self, w: Watch) -> None:
        """Undo prepare_child: the fork failed."""
        serial = w.pid.serial
        self.watches.pop(serial, None)
        self.children.pop(serial, None)
        self.links.pop(serial, None)
        self.handlers.drop(w.fd, w, self.epoll)
        for conn in list(self.conns_of.get(serial, ())):
            self._close_conn(conn)

    def _drain_peer(self, serial: int, os_pid: int = 0) -> None:
        """Read everything ``serial`` sent before it died, so it is queued before its Down.

        A connection it made before dying was already pending when the wait returned
        its death, so _process has accepted it (it accepts before it handles deaths),
        unless the wake-up held more events than one poll returns: accept again then.
        Connections not past their handshake are read too if they may be its (from
        ``os_pid``, when known): another process's new connection is read in its turn,
        after the Down, as that process may have sent once it saw the death."""
        if not self.batch_whole and _readable(self.listen.fileno(), 0):
            self._accept_all()  # (a poll is cheaper than a failed accept)
        if self.unproven:
            for conn in list(self.unproven):
                if os_pid:
                    try:
                        if _wire.peer_os_pid(conn.sock) != os_pid:
                            continue
                    except OSError:
                        pass
                self._read(conn, drain=True)
        for conn in list(self.conns_of.get(serial, ())):
            self._read(conn, drain=True)

    def _child_exited(self, w: Watch) -> Any:
        """The sentinel of child ``w`` fired: its exit status (a ``waitid`` result or an
        ``(si_code, si_status)`` pair; the child is not reaped), None if it is gone
        already, or False if it is not done yet. Never blocks for long: at most one
        ``sched_yield``.

        The sentinel reaches EOF when the child's descriptors close, a little before
        the kernel makes it waitable (much longer when thousands exit at once). If the
        child wrote its status in the table, or the runtime killed it, that is the
        answer. Else, on one CPU, the wake-up has most likely put this process ahead
        of the child in the middle of its exit: it gets the CPU back (``sched_yield``)
        to finish, after which it is waitable. That costs less than reading /proc,
        unless other tasks are waiting for the CPU too: a yield that took longer than
        YIELD_SLOW pauses yielding for YIELD_PAUSE. Failing that, the status is read
        from /proc (the kernel sets it first thing in the exit); failing that too,
        the child's pidfd is watched instead of its sentinel: it fires once the
        child is waitable."""
        pid = w.pid
        os_pid = pid.os_pid
        flags = os.WEXITED | os.WNOHANG | os.WNOWAIT
        try:
            status = os.waitid(os.P_PID, os_pid, flags)
            if status is not None:
                return status
            if self.table.state(pid.serial, pid.slot) != _table.ALIVE:
                return (os.CLD_KILLED, signal.SIGKILL)  # the table has the reason
            now = time.monotonic()
            if now >= self.yield_from:
                os.sched_yield()
                if time.monotonic() - now > YIELD_SLOW:
                    self.yield_from = now + YIELD_PAUSE
                status = os.waitid(os.P_PID, os_pid, flags)
                if status is not None:
                    return status
            early = _table.zombie_status(os_pid, exiting=True)
            if early is not None:
                return early
        except ChildProcessError:
            return None
        try:
            fd = os.pidfd_open(os_pid)
        except ProcessLookupError:
            return None
        self.handlers.drop(w.fd, w, self.epoll)
        if not w.owns_fd:
            w.child.close()  # the sentinel; poll() and the pid stay usable
            w.child.sentinel = -1
        else:
            os.close(w.fd)
        w.fd = fd
        w.owns_fd = True
        self.handlers[fd] = w
        self.epoll.register(fd, EPOLLIN)
        return False

    def _reap_child(self, pid: Pid, popen: Any, status: Any) -> None:
        """After the Down of our dead child is out: if it could not record its exit in
        the table (a signal), do so and remove its socket file; then reap it (in that
        order, see _table) and close its sentinel. A child not waitable yet is reaped
        when its pidfd fires."""
        table = self.table
        if table.state(pid.serial, pid.slot) != _table.EXITED:
            code, value = (os.CLD_KILLED, signal.SIGKILL) if status is None else \
                _code_and_status(status)
            table.publish(pid.serial, pid.slot, code, value)
        try:  # it removes its own socket file last thing, unless killed before that
            os.unlink(self.info.sock_path(pid.serial))
        except OSError:
            pass
        try:
            popen.poll()  # WNOHANG
        except OSError:
            pass
        popen.close()
        popen.sentinel = -1
        if popen.returncode is not None:
            return
        try:
            fd = os.pidfd_open(popen.pid)
        except ProcessLookupError:
            return

        def reap() -> None:
            self.handlers.pop(fd, None)
            self.epoll.unregister(fd)
            os.close(fd)
            popen.poll()

        self.handlers[fd] = Reader(fd, reap)
        self.epoll.register(fd, EPOLLIN)

    def _run_deferred(self) -> None:
        jobs, self.deferred = self.deferred, []
        for job in jobs:
            job[0](*job[1:])

    def _on_death(self, w: Watch) -> None:
        """``w``'s process died: tell everyone who cares. On one CPU, most of what a
        Down takes beyond the death itself is this method's running time, with the
        caches the dying process just emptied: it is kept short."""
        pid = w.pid
        serial = pid.serial
        popen = w.child
        if popen is not None:
            status = self._child_exited(w)
            if status is False:
                return
        elif self.is_main and not _readable(w.fd, 0):
            # Another thread closed a pidfd and opened this one under its number while
            # the polling thread held the old one's event: not this process's death.
            return
        self._drain_peer(serial, pid.os_pid)
        if self.watches.get(serial) is not w:
            return  # what it sent undid the watch (an unlink): no one left to tell
        self._remove_watch(w)
        if popen is not None:
            state = self.table.state(serial, pid.slot)
            if state == _table.EXITED or state == _table.DOOMED or status is None:
                reason = self.table.reason(serial, pid.slot, pid.os_pid)
            else:
                reason = _table.status_reason(*_code_and_status(status))
            w.child = None
            del self.children[serial]
            self.child_by_os_pid.pop(pid.os_pid, None)
            # Reaping waits until the Down is out, for an idle moment (see _poll_timeout).
            deferred = self.deferred
            if not deferred:
                self.cleanup_due = time.monotonic() + CLEANUP_DUE
            deferred.append((self._reap_child, pid, popen, status))
        else:
            reason = self.table.reason(serial, pid.slot, pid.os_pid)
        dead = self.dead
        dead[serial] = None
        if len(dead) > 4096:
            del dead[next(iter(dead))]
        conns = self.conns_of.get(serial)
        if conns:
            for conn in list(conns):
                self._close_conn(conn)
        if w.calls:
            replies = self.replies
            for call_ref in w.calls:
                if replies.get(call_ref) is _PENDING:
                    replies[call_ref] = (False, reason)
        internal = self.internal
        monitor_refs = self.monitor_refs
        for ref in w.monitors:
            monitor_refs.pop(ref, None)
            if ref in internal:
                internal[ref] = Down(ref, pid, reason)
            else:
                self.mailbox.append(Down(ref, pid, reason))
        if w.linked:
            self.links.pop(serial, None)
            self._linked_exit(pid, reason)

    def _linked_exit(self, pid: Pid, reason: Any) -> None:
        if self.exiting:
            return
        if self.trap:
            if self.is_main and reason == "normal":
                return
            self._queue_exit(Exit(pid, reason))
        elif reason != "normal":
            self.exit_process(reason, log_crash=False)

    def _queue_exit(self, msg: Exit) -> None:
        if self.is_main:
            if self.exits_queued >= _base.MAIN_EXIT_BACKLOG:
                for i, old in enumerate(self.mailbox):
                    if old.__class__ is Exit:
                        del self.mailbox[i]
                        self.removed += 1
                        break
                log.warning("the embedding process has %d unreceived Exit messages; "
                            "dropped the oldest", _base.MAIN_EXIT_BACKLOG)
            else:
                self.exits_queued += 1
            self.mailbox.append(msg)
            self._notify()
            return
        self.mailbox.append(msg)
