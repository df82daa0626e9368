"""The node's process table: one shared-memory file that every process maps.

Why it exists: a process that watches another through a pidfd learns *that* it
died, not *why*; only the parent can read an exit status, and a process killed
by a signal cannot say anything. The table is where every death is written down
before anyone can observe it:

- a process that exits on its own writes its reason first thing in its exit
  path (after which nobody can doom it), then exits;
- a process that kills another (``exit(pid, reason)``, a link) writes the
  victim's reason ("doomed") before it sends SIGKILL;
- a parent that sees a child die by a signal peeks at the status with
  ``waitid(WNOWAIT)``, writes it, and only then reaps the child.

So a slot that is not EXITED belongs to an OS process that is not reaped yet:
its ``os_pid`` cannot have been recycled, which makes pidfds and signals sent
after a table check safe. A watcher that wakes before the parent has written
the reason reads the zombie's exit status from ``/proc/<pid>/stat``.

Layout: a 64-byte header (next serial, allocation cursor) and fixed 32-byte
slots. Slots are reused round-robin, so a dead process's reason stays readable
until about ``NSLOTS`` later spawns. Reasons other than the common strings are
pickled into small files next to the table and removed when the slot is reused.
Allocation and dooming take an ``fcntl`` lock, which the kernel releases if its
holder dies.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import pickle
import signal
import struct
from typing import Any

NSLOTS = 1 << 16
HEADER = 64
SLOT = 32

FREE, ALIVE, DOOMED, EXITED = 0, 1, 2, 3

# Reason codes stored in a slot.
_NONE, _NORMAL, _SHUTDOWN, _KILLED, _NOPROC, _SIGNAL, _BLOB = range(7)
_SIMPLE = {"normal": _NORMAL, "shutdown": _SHUTDOWN, "killed": _KILLED, "noproc": _NOPROC}
_SIMPLE_BACK = {v: k for k, v in _SIMPLE.items()}

# serial Q, os_pid I, state B, exit code B, exit sig B, doom code B, doom sig B, trap B
_SLOT = struct.Struct("<QIBBBBBB")
_HDR = struct.Struct("<QQI")  # magic, next serial, cursor
_MAGIC = 0x52554E54494D4531  # "RUNTIME1"
_STATE_OFF = 12
_PF_EXITING = 0x4  # in the flags of /proc/<pid>/stat: set first thing in do_exit
_TRAP_OFF = 17


def signal_reason(signo: int) -> str:
    """The exit reason for death by signal ``signo``: "killed" for SIGKILL, else its name."""
    if signo == signal.SIGKILL:
        return "killed"
    try:
        return signal.Signals(signo).name
    except ValueError:
        return f"SIG{signo}"


def status_reason(si_code: int, si_status: int) -> Any:
    """The exit reason for a ``waitid`` result that the process did not write itself."""
    if si_code in (os.CLD_KILLED, os.CLD_DUMPED):
        return signal_reason(si_status)
    if si_status == 0:
        return "normal"
    return ("exit_code", si_status)


def proc_stat(os_pid: int) -> list[bytes] | None:
    """The fields of ``/proc/<os_pid>/stat`` from the state on (field 3 is item 0);
    None if there is no such process."""
    try:  # os-level calls: three system calls, where open() makes seven
        fd = os.open(f"/proc/{os_pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        data = os.read(fd, 4096)  # the kernel makes the whole line in one read
    except OSError:
        return None
    finally:
        os.close(fd)
    return data[data.rindex(b")") + 2 :].split()


def zombie_status(os_pid: int, exiting: bool = False) -> tuple[int, int] | None:
    """(si_code, si_status) of an unreaped dead process, read from /proc; None if gone.

    With ``exiting``, a process that is not a zombie yet counts too if it is in its
    exit (the kernel's PF_EXITING flag) and its exit status is set (non-zero). The
    flag matters: a stopped process keeps its stop signal in the same field, and a
    traced one resumed with a signal holds that signal there until it runs."""
    fields = proc_stat(os_pid)
    if fields is None or len(fields) < 50:
        return None
    wstatus = int(fields[49])
    if fields[0] != b"Z" and not (exiting and wstatus and int(fields[6]) & _PF_EXITING):
        return None
    if os.WIFSIGNALED(wstatus):
        return os.CLD_KILLED, os.WTERMSIG(wstatus)
    return os.CLD_EXITED, os.WEXITSTATUS(wstatus)


class Table:
    """A mapping of the node's table file. One per OS process; not thread-safe for writes
    of the same slot, which never happens (each slot has one writer at a time)."""

    def __init__(self, path: str, create: bool = False) -> None:
        self.path = path
        self.blob_dir = os.path.join(os.path.dirname(path), "reasons")
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT | os.O_EXCL if create else 0)
        self.fd = os.open(path, flags, 0o600)
        if create:
            os.ftruncate(self.fd, HEADER + SLOT * NSLOTS)
            os.mkdir(self.blob_dir, 0o700)
        self.mm = mmap.mmap(self.fd, HEADER + SLOT * NSLOTS)
        if create:
            _HDR.pack_into(self.mm, 0, _MAGIC, 1, 0)

    def close(self) -> None:
        try:
            self.mm.close()
        except (BufferError, ValueError):
            pass
        try:
            os.close(self.fd)
        except OSError:
            pass

    # -- locking ---------------------------------------------------------------

    def _lock(self) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_EX, 1, 0)

    def _unlock(self) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, 0)

    # -- slots -----------------------------------------------------------------

    def allocate(self) -> tuple[int, int]:
        """Reserve a slot for a new process. Returns (serial, slot). The slot is ALIVE
        with os_pid 0 until :meth:`set_os_pid`."""
        mm = self.mm
        self._lock()
        try:
            _, serial, cursor = _HDR.unpack_from(mm, 0)
            for step in range(NSLOTS):
                slot = (cursor + step) % NSLOTS
                off = HEADER + SLOT * slot
                state = mm[off + _STATE_OFF]
                if state == FREE or state == EXITED:
                    break
            else:
                raise RuntimeError("runtime process table is full")
            old_serial, _, _, ecode, _, dcode, _, _ = _SLOT.unpack_from(mm, off)
            if ecode == _BLOB or dcode == _BLOB:
                self._drop_blobs(old_serial)
            _SLOT.pack_into(mm, off, serial, 0, ALIVE, 0, 0, 0, 0, 0)
            _HDR.pack_into(mm, 0, _MAGIC, serial + 1, (slot + 1) % NSLOTS)
            return serial, slot
        finally:
            self._unlock()

    def set_os_pid(self, slot: int, os_pid: int) -> None:
        struct.pack_into("<I", self.mm, HEADER + SLOT * slot + 8, os_pid)

    def free(self, slot: int) -> None:
        """Give back a slot whose process never started."""
        self.mm[HEADER + SLOT * slot + _STATE_OFF] = FREE

    def read(self, slot: int) -> tuple[int, int, int, int, int, int, int, int]:
        return _SLOT.unpack_from(self.mm, HEADER + SLOT * slot)

    def state(self, serial: int, slot: int) -> int:
        """ALIVE, DOOMED or EXITED for this process; EXITED if the slot was reused."""
        off = HEADER + SLOT * slot
        if struct.unpack_from("<Q", self.mm, off)[0] != serial:
            return EXITED
        st = self.mm[off + _STATE_OFF]
        return EXITED if st == FREE else st

    def is_trapping(self, serial: int, slot: int) -> bool:
        off = HEADER + SLOT * slot
        return struct.unpack_from("<Q", self.mm, off)[0] == serial and bool(
            self.mm[off + _TRAP_OFF]
        )

    def set_trap(self, slot: int, flag: bool) -> None:
        self.mm[HEADER + SLOT * slot + _TRAP_OFF] = 1 if flag else 0

    # -- reasons ---------------------------------------------------------------

    def _encode(self, serial: int, reason: Any, suffix: str) -> tuple[int, int]:
        code = _SIMPLE.get(reason) if isinstance(reason, str) else None
        if code is not None:
            return code, 0
        if isinstance(reason, str) and reason.startswith("SIG"):
            try:
                return _SIGNAL, int(signal.Signals[reason])
            except KeyError:
                pass
        try:
            data = pickle.dumps(reason, protocol=5)
        except Exception:
            data = pickle.dumps(repr(reason), protocol=5)
        path = os.path.join(self.blob_dir, f"{serial}.{suffix}")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        return _BLOB, 0

    def _decode(self, serial: int, code: int, sig: int, suffix: str) -> Any:
        if code == _SIGNAL:
            return signal_reason(sig)
        if code == _BLOB:
            if sig == 1:
                suffix = "d"
            try:
                with open(os.path.join(self.blob_dir, f"{serial}.{suffix}"), "rb") as f:
                    return pickle.loads(f.read())
            except Exception:
                return "killed"
        return _SIMPLE_BACK.get(code, "killed")

    def _drop_blobs(self, serial: int) -> None:
        for suffix in ("x", "d"):
            try:
                os.unlink(os.path.join(self.blob_dir, f"{serial}.{suffix}"))
            except OSError:
                pass

    def begin_exit(self, serial: int, slot: int, reason: Any) -> Any:
        """A process starts its own exit: record ``reason`` (under the lock, so no killer
        can doom it from now on) and return the reason that stands, which is the
        killer's if one doomed it first."""
        off = HEADER + SLOT * slot
        self._lock()
        try:
            if struct.unpack_from("<Q", self.mm, off)[0] != serial:
                return reason
            state = self.mm[off + _STATE_OFF]
            if state == DOOMED:
                self._settle_doom(off)
                return self._decode(serial, self.mm[off + 15], self.mm[off + 16], "d")
            if state == EXITED:
                return self._decode(serial, self.mm[off + 13], self.mm[off + 14], "x")
            self._mark(off, EXITED, *self._encode(serial, reason, "x"))
            return reason
        finally:
            self._unlock()

    def doom(self, serial: int, slot: int, reason: Any) -> bool:
        """Record ``reason`` for a process we are about to SIGKILL.

        Returns False if the process already exited or was doomed by someone else
        (then its reason stands and no signal should be sent by us)."""
        off = HEADER + SLOT * slot
        self._lock()
        try:
            if struct.unpack_from("<Q", self.mm, off)[0] != serial:
                return False
            if self.mm[off + _STATE_OFF] != ALIVE:
                return False
            os_pid = struct.unpack_from("<I", self.mm, off + 8)[0]
            if os_pid and zombie_status(os_pid, exiting=True) is not None:
                return False  # already dead: watchers may have seen its true reason
            self._mark(off, DOOMED, *self._encode(serial, reason, "d"))
            return True
        finally:
            self._unlock()

    def _settle_doom(self, off: int) -> None:
        """Make the doomed reason the exit reason (lock held). A blob stays in its ".d"
        file (a watcher may be reading it right now); sig 1 on a blob code says so."""
        code = self.mm[off + 15]
        self._mark(off, EXITED, code, 1 if code == _BLOB else self.mm[off + 16])

    def _mark(self, off: int, state: int, code: int, sig: int) -> None:
        """Write a reason and the state it belongs to (lock held): EXITED keeps its reason
        in bytes 13-14 of the slot, DOOMED in bytes 15-16."""
        mm = self.mm
        at = off + (13 if state == EXITED else 15)
        mm[at] = code
        mm[at + 1] = sig
        mm[off + _STATE_OFF] = state

    def publish(self, serial: int, slot: int, si_code: int, si_status: int) -> None:
        """Called by whoever reaps a dead process, before reaping it: make its state EXITED,
        with the doomed reason if there is one, else the reason its status gives."""
        off = HEADER + SLOT * slot
        self._lock()
        try:
            if struct.unpack_from("<Q", self.mm, off)[0] != serial:
                return
            state = self.mm[off + _STATE_OFF]
            if state == EXITED or state == FREE:
                return
            if state == DOOMED:
                self._settle_doom(off)
                return
            self._mark(off, EXITED,
                       *self._encode(serial, status_reason(si_code, si_status), "x"))
        finally:
            self._unlock()

    def doomed_reason(self, serial: int, slot: int) -> tuple[Any] | None:
        """(reason,) if a killer has doomed this process, else None."""
        s, _, state, _, _, dcode, dsig, _ = self.read(slot)
        if s != serial or state != DOOMED:
            return None
        return (self._decode(serial, dcode, dsig, "d"),)

    def reason(self, serial: int, slot: int, os_pid: int) -> Any:
        """The exit reason of a process known to be dead (its pidfd or sentinel fired)."""
        for attempt in range(2):
            s, _, state, ecode, esig, dcode, dsig, _ = self.read(slot)
            if s != serial:
                return "noproc"
            if state == EXITED:
                return self._decode(serial, ecode, esig, "x")
            if state == DOOMED:
                return self._decode(serial, dcode, dsig, "d")
            if attempt == 0:
                # Not published yet: the zombie still holds its status, unless the
                # reaper published and reaped just now, which the second read sees.
                status = zombie_status(os_pid)
                if status is not None:
                    return status_reason(*status)
        return "killed"

    def exited_slot_of(self, os_pid: int) -> tuple[int, int] | None:
        """(serial, slot) of the EXITED entry with this OS pid, last written, if any (a
        slow scan: for an orphan that was killed while it exited)."""
        found = None
        for slot in range(NSLOTS):
            off = HEADER + SLOT * slot
            if self.mm[off + _STATE_OFF] == EXITED:
                serial, pid = struct.unpack_from("<QI", self.mm, off)
                if pid == os_pid and (found is None or serial > found[0]):
                    found = (serial, slot)
        return found

    def live_slots(self) -> list[tuple[int, int, int]]:
        """(serial, slot, os_pid) of every process not yet known dead."""
        out = []
        mm = self.mm
        for slot in range(NSLOTS):
            off = HEADER + SLOT * slot
            st = mm[off + _STATE_OFF]
            if st == ALIVE or st == DOOMED:
                serial, os_pid = struct.unpack_from("<QI", mm, off)
                out.append((serial, slot, os_pid))
        return out
