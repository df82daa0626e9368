"""Internal: the node's process table, one shared-memory file every process maps.

Why it exists: a process that watches another through a pidfd learns *that* it
died, not *why*; only the parent can read an exit status, and a process killed
by a signal cannot say anything. The table is where every death is written down
before anyone can observe it:

- a process that exits on its own writes its reason first thing in its exit
  path (after which nobody can doom it), then exits;
- a process that kills another (``exit(pid, reason)``, a link) writes the
  victim's reason ("doomed") before it signals it;
- a parent that sees a child die by a signal peeks at the status with
  ``waitid(WNOWAIT)``, writes it, and only then reaps the child.

So a slot that is not EXITED belongs to an OS process that is not reaped yet:
its ``os_pid`` cannot have been recycled, which makes pidfds and signals sent
after a table check safe. A watcher that wakes before the parent has written
the reason reads the zombie's exit status from ``/proc/<pid>/stat``.

Layout: a 64-byte header, fixed 32-byte slots reused round-robin, then the
reason ring. A reason that is not one of the common ones (a crash, a value given
to ``exit``) is pickled into the ring, ``RING`` bytes written round and round, so
neither the node's directory nor its memory grows with the number of dead
processes. A reason overwritten before a watcher read it (after some
``RING`` bytes of later reasons) reads as ``"reason_lost"``; one larger than a
quarter of the ring is cut down first (see ``_fitting``). The file is sparse:
only the pages written cost memory. Allocation and every change of state take
an ``fcntl`` lock, which the kernel releases if its holder dies.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import pickle
import signal
import struct
from typing import Any, NamedTuple

NSLOTS = 1 << 16
RING = 32 << 20

FREE, ALIVE, DOOMED, EXITED = 0, 1, 2, 3

# Reason codes stored in a slot, each with a 32-bit argument.
_NONE, _NORMAL, _SHUTDOWN, _KILLED, _NOPROC, _SIGNAL, _EXIT_CODE, _STORED = range(8)
_SIMPLE = {"normal": _NORMAL, "shutdown": _SHUTDOWN, "killed": _KILLED, "noproc": _NOPROC}
_SIMPLE_BACK = {v: k for k, v in _SIMPLE.items()}
LOST = "reason_lost"

# magic, next serial, slot cursor, ring bytes reserved so far (a position in the ring,
# counted from its start without wrapping)
_HDR = struct.Struct("<QQIQ")
_RESERVED_OFF = 24
_RESERVED = struct.Struct("<Q")
_MAGIC = 0x52554E54494D4533  # "RUNTIME3"
_SLOTS = 64
_SLOT_SIZE = 32
_RING_OFF = _SLOTS + _SLOT_SIZE * NSLOTS
# serial, OS pid, state, flags, exit code, doom code, exit argument, doom argument
_SLOT = struct.Struct("<QIBBBBII")
_SERIAL = struct.Struct("<Q")
_OS_PID_OFF = 8
_STATE_OFF = 12
_FLAGS_OFF = 13
_TRAP = 1  # it traps exits
_AHEAD = 2  # started ahead, waiting for a target: not one of the node's processes yet
# In the 8 bytes after a slot's fields: the slot (+1) of the child the process is
# starting, until that child has its OS pid (see allocate and take_unstarted); then
# when the process started, a number from the serials' counter (see started_now).
_UNSTARTED_OFF = _SLOT.size
_UNSTARTED = struct.Struct("<I")
_START_ORDER_OFF = _SLOT.size + 4
_START_ORDER = struct.Struct("<I")
_ENTRY = struct.Struct("<QI4x")  # an entry's position and length, before its pickle
_PF_EXITING = 0x4  # in the flags of /proc/<pid>/stat: set first thing in do_exit


class Slot(NamedTuple):
    """One process's entry, as read."""

    serial: int
    os_pid: int
    state: int
    trap: int
    exit_code: int
    doom_code: int
    exit_arg: int
    doom_arg: int


def _fitting(reason: Any) -> bytes:
    """``reason`` pickled, at most a quarter of the ring: a longer Crash keeps the start
    and the end of its message and traceback; anything else, the start of its repr."""
    try:
        data = pickle.dumps(reason, protocol=5)
    except Exception:
        data = pickle.dumps(repr(reason), protocol=5)
    limit = RING // 4
    if len(data) <= limit:
        return data
    from .errors import Crash

    if isinstance(reason, Crash):
        keep = limit // 3

        def cut(text: str) -> str:
            if len(text) <= keep:
                return text
            half = keep // 2
            return f"{text[:half]}\n[... {len(text) - 2 * half} characters cut ...]\n" \
                   f"{text[-half:]}"

        data = pickle.dumps(Crash(reason.exc_type, cut(reason.message),
                                  cut(reason.traceback)), protocol=5)
        if len(data) <= limit:
            return data
    return pickle.dumps(repr(reason)[: limit // 8], protocol=5)


def signal_reason(signo: int) -> str:
    """The exit reason for death by signal ``signo``: "killed" for SIGKILL, else its name."""
    if signo == signal.SIGKILL:
        return "killed"
    try:
        return signal.Signals(signo).name
    except ValueError:
        return f"SIG{signo}"


def status_reason(si_code: int, si_status: int) -> Any:
    """The exit reason for a ``waitid`` status that the process did not write itself."""
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
    """(si_code, si_status) of an unreaped dead process, read from /proc; None if it is
    not dead (or gone).

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
    """A mapping of the node's table file. One per OS process. Each slot has one
    writer at a time; every change of state is made under the file lock."""

    def __init__(self, path: str, create: bool = False, readonly: bool = False) -> None:
        """``readonly``: a view for an observer (``_observe``), which reads slots only."""
        self.path = path
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT | os.O_EXCL if create else 0)
        if readonly:
            flags = os.O_RDONLY | os.O_CLOEXEC
        self.fd = os.open(path, flags, 0o600)
        size = _RING_OFF + RING
        if create:
            os.ftruncate(self.fd, size)
        self.mm = mmap.mmap(self.fd, size, access=mmap.ACCESS_READ if readonly else
                            mmap.ACCESS_DEFAULT)
        if create:
            _HDR.pack_into(self.mm, 0, _MAGIC, 1, 0, 0)

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

    def allocate(self, owner: int | None = None) -> tuple[int, int]:
        """Reserve a slot for a new process. Returns (serial, slot). The slot is ALIVE
        with os_pid 0 until :meth:`set_os_pid`.

        ``owner``, the slot of the process starting it, records the new slot as that
        process's unstarted child until :meth:`started`: if the owner is killed
        before, whoever handles its death frees the slot (:meth:`take_unstarted`)."""
        mm = self.mm
        self._lock()
        try:
            magic, serial, cursor, reserved = _HDR.unpack_from(mm, 0)
            for step in range(NSLOTS):
                slot = (cursor + step) % NSLOTS
                state = mm[_SLOTS + _SLOT_SIZE * slot + _STATE_OFF]
                if state == FREE or state == EXITED:
                    break
            else:
                raise RuntimeError("the node's process table is full")
            # The owner's record first: killed between the two writes, it names a slot
            # that is not ALIVE, which take_unstarted leaves alone.
            if owner is not None:
                _UNSTARTED.pack_into(mm, _SLOTS + _SLOT_SIZE * owner + _UNSTARTED_OFF, slot + 1)
            _SLOT.pack_into(mm, _SLOTS + _SLOT_SIZE * slot, serial, 0, ALIVE, 0, 0, 0, 0, 0)
            _UNSTARTED.pack_into(mm, _SLOTS + _SLOT_SIZE * slot + _UNSTARTED_OFF, 0)
            self._set_start_order(slot, serial)
            _HDR.pack_into(mm, 0, magic, serial + 1, (slot + 1) % NSLOTS, reserved)
            return serial, slot
        finally:
            self._unlock()

    def started(self, owner: int) -> None:
        """The child that ``owner`` was starting has its OS pid (or was given back)."""
        _UNSTARTED.pack_into(self.mm, _SLOTS + _SLOT_SIZE * owner + _UNSTARTED_OFF, 0)

    def take_unstarted(self, owner: int) -> int | None:
        """Called for a dead process (slot ``owner``): if it died while starting a child
        that has no OS pid yet, free that child's slot and return its serial (its socket
        file is for the caller to remove). Such a child never ran, or dies now of its
        parent's death before it runs anything; nobody was given its Pid."""
        mm = self.mm
        self._lock()
        try:
            off = _SLOTS + _SLOT_SIZE * owner + _UNSTARTED_OFF
            child = _UNSTARTED.unpack_from(mm, off)[0] - 1
            if child < 0:
                return None
            _UNSTARTED.pack_into(mm, off, 0)
            serial, os_pid = struct.unpack_from("<QI", mm, _SLOTS + _SLOT_SIZE * child)
            if os_pid != 0 or mm[_SLOTS + _SLOT_SIZE * child + _STATE_OFF] != ALIVE:
                return None
            mm[_SLOTS + _SLOT_SIZE * child + _STATE_OFF] = FREE
            return int(serial)
        finally:
            self._unlock()

    def set_os_pid(self, slot: int, os_pid: int) -> None:
        struct.pack_into("<I", self.mm, _SLOTS + _SLOT_SIZE * slot + _OS_PID_OFF, os_pid)

    def set_own_os_pid(self, serial: int, slot: int, os_pid: int) -> None:
        """A new process writes its own OS pid (its parent may not live to): only while
        its slot is its own and ALIVE. (Its parent's death may have freed it, see
        take_unstarted; a slot is taken again only after every other one.)"""
        off = _SLOTS + _SLOT_SIZE * slot
        if _SERIAL.unpack_from(self.mm, off)[0] == serial and self.mm[off + _STATE_OFF] == ALIVE:
            struct.pack_into("<I", self.mm, off + _OS_PID_OFF, os_pid)

    def started_now(self, slot: int) -> None:
        """The process in ``slot`` starts now, not when its slot was taken (a warm child
        handed its target): give it a start number after every process's so far. A
        process's start number is its serial otherwise; ``processes()`` lists in their
        order, and the root stops its children in the reverse order."""
        mm = self.mm
        self._lock()
        try:
            magic, serial, cursor, reserved = _HDR.unpack_from(mm, 0)
            _HDR.pack_into(mm, 0, magic, serial + 1, cursor, reserved)
        finally:
            self._unlock()
        self._set_start_order(slot, serial)

    def _set_start_order(self, slot: int, n: int) -> None:
        _START_ORDER.pack_into(self.mm, _SLOTS + _SLOT_SIZE * slot + _START_ORDER_OFF,
                               n & 0xFFFFFFFF)

    def start_order(self, slot: int) -> int:
        return int(_START_ORDER.unpack_from(self.mm, _SLOTS + _SLOT_SIZE * slot
                                            + _START_ORDER_OFF)[0])

    def os_pid(self, slot: int) -> int:
        """The OS pid in ``slot`` (0 until :meth:`set_os_pid`)."""
        return int(struct.unpack_from("<I", self.mm, _SLOTS + _SLOT_SIZE * slot + _OS_PID_OFF)[0])

    def free(self, slot: int) -> None:
        """Give back a slot whose process never started."""
        self.mm[_SLOTS + _SLOT_SIZE * slot + _STATE_OFF] = FREE

    def serial_in(self, slot: int) -> int:
        """The serial of the process that holds (or last held) ``slot``; -1 for no
        such slot."""
        if not 0 <= slot < NSLOTS:
            return -1
        return int(_SERIAL.unpack_from(self.mm, _SLOTS + _SLOT_SIZE * slot)[0])

    def read(self, slot: int) -> Slot:
        return Slot._make(_SLOT.unpack_from(self.mm, _SLOTS + _SLOT_SIZE * slot))

    def state(self, serial: int, slot: int) -> int:
        """ALIVE, DOOMED or EXITED for this process; EXITED if the slot was reused."""
        off = _SLOTS + _SLOT_SIZE * slot
        if _SERIAL.unpack_from(self.mm, off)[0] != serial:
            return EXITED
        st = self.mm[off + _STATE_OFF]
        return EXITED if st == FREE else st

    def is_trapping(self, serial: int, slot: int) -> bool:
        off = _SLOTS + _SLOT_SIZE * slot
        return (_SERIAL.unpack_from(self.mm, off)[0] == serial
                and bool(self.mm[off + _FLAGS_OFF] & _TRAP))

    def set_trap(self, slot: int, flag: bool) -> None:
        self._set_flag(slot, _TRAP, flag)

    def is_ahead(self, slot: int) -> bool:
        """Is the process in ``slot`` started ahead, waiting for a target (a warm
        child: not one of the node's processes yet, see ``live_slots``)?"""
        return bool(self.mm[_SLOTS + _SLOT_SIZE * slot + _FLAGS_OFF] & _AHEAD)

    def set_ahead(self, slot: int, flag: bool) -> None:
        self._set_flag(slot, _AHEAD, flag)

    def claim_ahead(self, serial: int, slot: int) -> bool:
        """Take the warm child ``serial`` for a target: clear its started-ahead flag,
        if it is still alive and started ahead. False if it was doomed first (see
        ``doom(only_ahead=True)``): the two exclude each other."""
        self._lock()
        try:
            s = self.read(slot)
            if s.serial != serial or s.state != ALIVE or not self.is_ahead(slot):
                return False
            self._set_flag(slot, _AHEAD, False)
            return True
        finally:
            self._unlock()

    def _set_flag(self, slot: int, bit: int, flag: bool) -> None:
        # (each slot has one writer of its flags at a time: its parent until it runs,
        # then itself for its trap, the process handing it a target for the other)
        off = _SLOTS + _SLOT_SIZE * slot + _FLAGS_OFF
        self.mm[off] = self.mm[off] | bit if flag else self.mm[off] & ~bit

    # -- reasons ---------------------------------------------------------------

    def _encode(self, reason: Any) -> tuple[int, int]:
        """(code, argument) for ``reason``, storing it if it is not a common one (lock
        held)."""
        if reason.__class__ is str:
            code = _SIMPLE.get(reason)
            if code is not None:
                return code, 0
            if reason.startswith("SIG"):
                try:
                    return _SIGNAL, int(signal.Signals[reason])
                except KeyError:
                    pass
        elif (reason.__class__ is tuple and len(reason) == 2 and reason[0] == "exit_code"
              and reason[1].__class__ is int and 0 <= reason[1] < 256):
            return _EXIT_CODE, reason[1]
        return _STORED, self._store(reason)

    def _decode(self, code: int, arg: int) -> Any:
        if code == _SIGNAL:
            return signal_reason(arg)
        if code == _EXIT_CODE:
            return ("exit_code", arg)
        if code == _STORED:
            return self._load(arg)
        return _SIMPLE_BACK.get(code, "killed")

    def _store(self, reason: Any) -> int:
        """Write ``reason`` into the ring (lock held); its position / 8, mod 2**32.

        An entry is its position (the bytes reserved before it) and length, then its
        pickle, at the next 8-byte boundary, from the start of the ring again when it
        would not fit before the end. Readers check the position they find there."""
        data = _fitting(reason)
        mm = self.mm
        reserved = _RESERVED.unpack_from(mm, _RESERVED_OFF)[0]
        size = (_ENTRY.size + len(data) + 7) & ~7
        at = reserved % RING
        if at + size > RING:
            reserved += RING - at
            at = 0
        # Reserve first: a reader that copies an entry then sees whether anyone may
        # have written over it meanwhile.
        _RESERVED.pack_into(mm, _RESERVED_OFF, reserved + size)
        start = _RING_OFF + at
        _ENTRY.pack_into(mm, start, reserved, len(data))
        mm[start + _ENTRY.size : start + _ENTRY.size + len(data)] = data
        return int(reserved >> 3) & 0xFFFFFFFF

    def _load(self, arg: int) -> Any:
        """The reason stored at position ``arg`` * 8 (mod 2**35), if still there."""
        mm = self.mm
        reserved = _RESERVED.unpack_from(mm, _RESERVED_OFF)[0]
        position = ((reserved >> 3) & ~0xFFFFFFFF | arg) << 3
        if position > reserved:
            position -= 1 << 35
        if position < 0 or reserved - position > RING:
            return LOST
        start = _RING_OFF + position % RING
        found, length = _ENTRY.unpack_from(mm, start)
        if found != position or length > RING:
            return LOST
        data = mm[start + _ENTRY.size : start + _ENTRY.size + length]
        if _RESERVED.unpack_from(mm, _RESERVED_OFF)[0] - position > RING:
            return LOST  # written over while we copied it
        try:
            return pickle.loads(data)
        except Exception:
            return LOST

    # -- deaths ----------------------------------------------------------------

    def begin_exit(self, serial: int, slot: int, reason: Any) -> Any:
        """A process starts its own exit: record ``reason`` (under the lock, so no killer
        can doom it from now on) and return the reason that stands, which is the
        killer's if one doomed it first."""
        off = _SLOTS + _SLOT_SIZE * slot
        self._lock()
        try:
            s = self.read(slot)
            if s.serial != serial:
                return reason
            if s.state == DOOMED:
                self._mark(off, EXITED, s.doom_code, s.doom_arg)
                return self._decode(s.doom_code, s.doom_arg)
            if s.state == EXITED:
                return self._decode(s.exit_code, s.exit_arg)
            self._mark(off, EXITED, *self._encode(reason))
            return reason
        finally:
            self._unlock()

    def doom(self, serial: int, slot: int, reason: Any, only_ahead: bool = False) -> bool:
        """Record ``reason`` for a process we are about to signal; ``only_ahead``: if
        it is a warm child not taken for a target yet (see ``claim_ahead``).

        Returns False if the process already exited or was doomed by someone else
        (then its reason stands and no signal should be sent by us)."""
        off = _SLOTS + _SLOT_SIZE * slot
        self._lock()
        try:
            s = self.read(slot)
            if s.serial != serial or s.state != ALIVE:
                return False
            if only_ahead and not self.is_ahead(slot):
                return False
            if s.os_pid and zombie_status(s.os_pid, exiting=True) is not None:
                return False  # already dead: watchers may have seen its true reason
            self._mark(off, DOOMED, *self._encode(reason))
            return True
        finally:
            self._unlock()

    def _mark(self, off: int, state: int, code: int, arg: int) -> None:
        """Write a reason and the state it belongs to (lock held): EXITED keeps its
        reason in the exit fields, DOOMED in the doom fields."""
        mm = self.mm
        if state == EXITED:
            mm[off + 14] = code
            struct.pack_into("<I", mm, off + 16, arg)
        else:
            mm[off + 15] = code
            struct.pack_into("<I", mm, off + 20, arg)
        mm[off + _STATE_OFF] = state

    def publish(self, serial: int, slot: int, si_code: int, si_status: int) -> None:
        """Called by whoever reaps a dead process, before reaping it: make its state
        EXITED, with the doomed reason if there is one, else the reason its status
        gives."""
        off = _SLOTS + _SLOT_SIZE * slot
        self._lock()
        try:
            s = self.read(slot)
            if s.serial != serial or s.state in (EXITED, FREE):
                return
            if s.state == DOOMED:
                self._mark(off, EXITED, s.doom_code, s.doom_arg)
            else:
                self._mark(off, EXITED, *self._encode(status_reason(si_code, si_status)))
        finally:
            self._unlock()

    def doomed_reason(self, serial: int, slot: int) -> tuple[Any] | None:
        """(reason,) if a killer has doomed this process, else None."""
        s = self.read(slot)
        if s.serial != serial or s.state != DOOMED:
            return None
        return (self._decode(s.doom_code, s.doom_arg),)

    def reason(self, serial: int, slot: int, os_pid: int) -> Any:
        """The exit reason of a process known to be dead (its pidfd or sentinel fired)."""
        for attempt in range(2):
            s = self.read(slot)
            if s.serial != serial:
                return "noproc"
            if s.state == EXITED:
                return self._decode(s.exit_code, s.exit_arg)
            if s.state == DOOMED:
                return self._decode(s.doom_code, s.doom_arg)
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
        mm = self.mm
        for slot in range(NSLOTS):
            off = _SLOTS + _SLOT_SIZE * slot
            if mm[off + _STATE_OFF] == EXITED:
                serial, pid = struct.unpack_from("<QI", mm, off)
                if pid == os_pid and (found is None or serial > found[0]):
                    found = (serial, slot)
        return found

    def live_slots(self, ahead: bool = False) -> list[tuple[int, int, int]]:
        """(serial, slot, os_pid) of every process not yet known dead, in the order they
        started (see started_now); with ``ahead``, the processes started ahead too
        (``set_ahead``), else not."""
        found = []
        mm = self.mm
        for slot in range(NSLOTS):
            off = _SLOTS + _SLOT_SIZE * slot
            st = mm[off + _STATE_OFF]
            if (st == ALIVE or st == DOOMED) and (ahead or not mm[off + _FLAGS_OFF] & _AHEAD):
                serial, os_pid = struct.unpack_from("<QI", mm, off)
                start = _START_ORDER.unpack_from(mm, off + _START_ORDER_OFF)[0]
                found.append((start, serial, slot, os_pid))
        found.sort()
        return [(serial, slot, os_pid) for _, serial, slot, os_pid in found]
