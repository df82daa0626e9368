"""Internal: the processes a node watches, and what their deaths leave behind.

A watch is one descriptor per watched process that becomes readable when it
dies: the ``multiprocessing`` sentinel for a child, a pidfd for any other
process. Monitors, links and pending calls on the same process share it. When
it fires, :meth:`Watches.died` works out the true reason (see ``_table``) and
returns who must hear of it: the node (``_node``) then delivers the Downs, the
failed calls and the linked exit, after what the process sent.

A dead child is reaped after its Down is out, at an idle moment of its parent
(``Poller.defer``): first its reason is written in the table if it could not
write it itself, then it is reaped, in that order (see ``_table``).
"""

from __future__ import annotations

import os
import select
import signal
from dataclasses import dataclass, field
from functools import partial
from typing import Any, NamedTuple

from . import _table
from ._poller import Poller, Reader
from .pid import Pid, Ref

# child_status(): the child is not waitable yet; its pidfd is watched instead.
NOT_YET = (-1, -1)
# child_status(): the runtime recorded the reason (a kill); the status adds nothing.
IN_TABLE = (os.CLD_KILLED, int(signal.SIGKILL))
# How many recent deaths a node remembers: a process whose Down it delivered is dead
# to it even before its parent has reaped it.
DEAD_KEPT = 4096


@dataclass(slots=True, eq=False)
class Watch:
    """The death of one watched process, and who cares about it."""

    pid: Pid
    fd: int
    child: bool = False  # our child: ``fd`` is its sentinel until it dies
    popen: Any = None  # the child's multiprocessing Popen, once it is started
    owns_fd: bool = True  # a pidfd is ours to close; a child's sentinel is its Popen's
    monitors: set[Ref] = field(default_factory=set)
    calls: set[int] = field(default_factory=set)
    linked: bool = False
    kept: bool = False  # kept while we talk to the process: later calls reuse it


class Death(NamedTuple):
    """A watched process died: its reason, and who must hear of it."""

    pid: Pid
    reason: Any
    monitors: set[Ref]
    calls: set[int]
    linked: bool


def readable(fd: int) -> bool:
    """Is ``fd`` readable now? (poll: no FD_SETSIZE limit)"""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


class Watches:
    """See the module docstring. Every method runs with the node's lock held."""

    def __init__(self, poller: Poller, table: _table.Table, me: Pid,
                 sock_path: Any) -> None:
        self._poller = poller
        self._table = table
        self._me = me
        self._sock_path = sock_path
        self._watches: dict[int, Watch] = {}
        self._monitors: dict[Ref, int] = {}
        self._links: dict[int, Pid] = {}
        self._children: dict[int, Watch] = {}
        self._child_by_os_pid: dict[int, int] = {}
        self._unreaped: dict[int, Any] = {}  # serial -> Popen of a dead child not reaped
        self._dead: dict[int, None] = {}

    # ---------------------------------------------------------------- watches

    def get(self, serial: int) -> Watch | None:
        return self._watches.get(serial)

    def watch(self, pid: Pid) -> Watch | None:
        """The watch on ``pid``, made if needed. None if ``pid`` is already dead."""
        w = self._watches.get(pid.serial)
        if w is not None:
            return w
        if pid.node != self._me.node or pid.serial in self._dead:
            return None
        try:
            fd = os.pidfd_open(pid.os_pid)
        except OSError:
            return None
        # The table marks a process EXITED before anyone reaps it, so while its slot
        # is not EXITED its OS pid cannot have been recycled: this pidfd is the right
        # process. A readable pidfd is a process that already died (a zombie).
        if self._table.state(pid.serial, pid.slot) == _table.EXITED or readable(fd):
            os.close(fd)
            return None
        w = Watch(pid, fd)
        self._watches[pid.serial] = w
        self._poller.add(fd, w)
        return w

    def release(self, w: Watch) -> None:
        """Stop watching ``w`` if nothing needs it any more."""
        if not w.child and not (w.monitors or w.calls or w.linked or w.kept):
            self._remove(w)

    def _remove(self, w: Watch) -> None:
        if self._watches.get(w.pid.serial) is w:
            del self._watches[w.pid.serial]
        self._poller.remove(w.fd, w)
        if w.owns_fd:
            w.owns_fd = False  # closed once: the number may be reused at once
            os.close(w.fd)

    def is_dead(self, serial: int) -> bool:
        """Has this node seen the process ``serial`` die?"""
        return serial in self._dead

    def is_alive(self, pid: Pid) -> bool | None:
        """From the watch on ``pid``: alive or not; None if it is not watched."""
        w = self._watches.get(pid.serial)
        return None if w is None else not readable(w.fd)

    # --------------------------------------------------------------- monitors

    def add_monitor(self, ref: Ref, pid: Pid) -> bool:
        """Monitor ``pid`` under ``ref``; False if it is already dead."""
        w = self.watch(pid)
        if w is None:
            return False
        w.monitors.add(ref)
        self._monitors[ref] = pid.serial
        return True

    def remove_monitor(self, ref: Ref) -> bool:
        """End the monitor ``ref``; False if it was not active."""
        serial = self._monitors.pop(ref, None)
        if serial is None:
            return False
        w = self._watches.get(serial)
        if w is not None:
            w.monitors.discard(ref)
            self.release(w)
        return True

    # ------------------------------------------------------------------ calls

    def add_call(self, pid: Pid, ref: int) -> bool:
        """A call ``ref`` to ``pid`` begins: its death ends it. False if it is dead."""
        w = self._watches.get(pid.serial) or self.watch(pid)
        if w is None:
            return False
        w.calls.add(ref)
        w.kept = True
        return True

    def end_call(self, pid: Pid, ref: int) -> None:
        w = self._watches.get(pid.serial)
        if w is not None:
            w.calls.discard(ref)

    # ------------------------------------------------------------------ links

    def link(self, pid: Pid, watched: bool = True) -> bool:
        """Link to ``pid``; False if it is dead. ``watched=False``: the embedding
        process, which traps exits and watches us itself, needs no watch."""
        if pid.serial in self._links:
            return True
        if watched:
            w = self.watch(pid)
            if w is None:
                return False
            w.linked = True
        self._links[pid.serial] = pid
        return True

    def prelink(self, pid: Pid, pidfd: int) -> None:
        """Link to ``pid`` in a new child, before its function runs, with a pidfd the
        child opened while ``pid`` was surely alive (its parent)."""
        w = Watch(pid, pidfd, linked=True)
        self._watches[pid.serial] = w
        self._links[pid.serial] = pid
        self._poller.add(pidfd, w)

    def unlink(self, serial: int) -> bool:
        """Remove the link with ``serial``; False if there was none."""
        if self._links.pop(serial, None) is None:
            return False
        w = self._watches.get(serial)
        if w is not None and w.linked:
            w.linked = False
            self.release(w)
        return True

    def monitored(self) -> list[Pid]:
        """The processes this one monitors (one entry per monitored process)."""
        return [w.pid for w in self._watches.values() if w.monitors]

    def is_linked(self, serial: int) -> bool:
        return serial in self._links

    def links(self) -> list[Pid]:
        return list(self._links.values())

    # --------------------------------------------------------------- children

    def add_child(self, pid: Pid, sentinel: int, link: bool) -> Watch:
        """Record a child about to be started (``pid.os_pid`` is set once it is)."""
        w = Watch(pid, sentinel, child=True, owns_fd=False, linked=link)
        self._watches[pid.serial] = w
        self._children[pid.serial] = w
        self._poller.add(sentinel, w)
        if link:
            self._links[pid.serial] = pid
        return w

    def child_started(self, w: Watch, popen: Any) -> None:
        w.pid.os_pid = popen.pid
        w.popen = popen
        self._child_by_os_pid[popen.pid] = w.pid.serial

    def child_failed(self, w: Watch) -> None:
        """Undo add_child: the child could not be started."""
        serial = w.pid.serial
        self._watches.pop(serial, None)
        self._children.pop(serial, None)
        self._links.pop(serial, None)
        self._poller.remove(w.fd, w)

    def children(self) -> list[Watch]:
        return list(self._children.values())

    def child_of_os_pid(self, os_pid: int) -> Watch | None:
        serial = self._child_by_os_pid.get(os_pid)
        return None if serial is None else self._watches.get(serial)

    def child_status(self, w: Watch) -> tuple[int, int] | None:
        """The sentinel of child ``w`` fired: its ``(si_code, si_status)``, without
        reaping it; None if something reaped it already; NOT_YET if it is not done
        yet: its pidfd is then watched, which fires once it is. Never blocks.

        The sentinel reads EOF when the child's descriptors close, a little before
        the kernel makes it waitable. If the runtime recorded its reason, that is
        the answer (the child let its own files go before it recorded it). Else
        its death is not told before the kernel makes it waitable: the kernel lets a
        dying process's files go from the highest descriptor down, so the sentinel
        (a high one, made in the parent) can read EOF while a port the child
        listened on is still bound, and a supervisor restarting that child on its
        exit would find the port taken."""
        pid = w.pid
        try:
            status = os.waitid(os.P_PID, pid.os_pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            if status is not None:
                return status.si_code, status.si_status
            if self._table.state(pid.serial, pid.slot) != _table.ALIVE:
                return IN_TABLE
        except ChildProcessError:
            return None
        if w.owns_fd:
            return NOT_YET  # its pidfd is watched already (asked again: its connection closed)
        try:
            fd = os.pidfd_open(pid.os_pid)
        except ProcessLookupError:
            return None
        self._poller.remove(w.fd, w)
        w.popen.close()  # the sentinel; poll() and the pid stay usable
        w.fd = fd
        w.owns_fd = True
        self._poller.add(fd, w)
        return NOT_YET

    # ----------------------------------------------------------------- deaths

    def died(self, w: Watch, status: tuple[int, int] | None) -> Death:
        """``w``'s process died (``status``: from child_status, for a child): stop
        watching it, work out its reason, and say who must hear of it."""
        pid = w.pid
        serial = pid.serial
        self._remove(w)
        table = self._table
        popen = w.popen
        if w.child:
            state = table.state(serial, pid.slot)
            if state == _table.EXITED or state == _table.DOOMED or status is None:
                reason = table.reason(serial, pid.slot, pid.os_pid)
            else:
                reason = _table.status_reason(*status)
            w.child = False
            w.popen = None
            del self._children[serial]
            self._child_by_os_pid.pop(pid.os_pid, None)
            self._unreaped[serial] = popen
            # Reaping waits until the Down is out, for an idle moment.
            self._poller.defer(partial(self._reap, pid, popen, status))
        else:
            reason = table.reason(serial, pid.slot, pid.os_pid)
        dead = self._dead
        dead[serial] = None
        if len(dead) > DEAD_KEPT:
            del dead[next(iter(dead))]
        for ref in w.monitors:
            self._monitors.pop(ref, None)
        if w.linked:
            self._links.pop(serial, None)
        return Death(pid, reason, w.monitors, w.calls, w.linked)

    def _reap(self, pid: Pid, popen: Any, status: tuple[int, int] | None) -> None:
        """After the Down of our dead child is out: if it could not record its exit in
        the table (a signal), do so, and remove its socket file; then reap it, in that
        order (see _table). A child not waitable yet is reaped when its pidfd fires."""
        self._unreaped.pop(pid.serial, None)
        self.publish(pid, status)
        try:
            popen.poll()  # WNOHANG
        except OSError:
            pass
        popen.close()
        if popen.returncode is not None:
            return
        try:
            fd = os.pidfd_open(popen.pid)
        except ProcessLookupError:
            return

        def reap() -> None:
            self._poller.remove(fd, reader)
            os.close(fd)
            popen.poll()

        reader = Reader(fd, reap)
        self._poller.add(fd, reader)

    def publish(self, pid: Pid, status: tuple[int, int] | None) -> None:
        """Record the exit of our dead child ``pid`` in the table if it could not (a
        signal killed it), and remove its socket file (it removes it itself last
        thing, unless killed before that)."""
        if self._table.state(pid.serial, pid.slot) != _table.EXITED:
            code, value = IN_TABLE if status is None else status
            self._table.publish(pid.serial, pid.slot, code, value)
        unstarted = self._table.take_unstarted(pid.slot)  # (killed while it forked one)
        for serial in (pid.serial, unstarted):
            if serial is not None:
                try:
                    os.unlink(self._sock_path(serial))
                except OSError:
                    pass

    def unreaped_fds(self) -> list[int]:
        """The sentinels of dead children not reaped yet (still open)."""
        return [p.sentinel for p in self._unreaped.values() if (p.sentinel or -1) >= 0]

    def abandon(self) -> None:
        """Close the pidfds, and nothing else: see ``Node.abandon``."""
        for w in self._watches.values():
            if w.owns_fd:
                w.owns_fd = False
                os.close(w.fd)
