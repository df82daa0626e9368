"""Internal: the one place a process waits, and the lock that guards its node.

Every descriptor a node owns (its listening socket, its connections, the
sentinels and pidfds of the processes it watches) sits in one ``epoll``, each
with its *owner*, the object that handles its events. A wake-up costs O(1)
however many processes are watched; nothing sleeps and polls. Events are hints:
every owner checks, without blocking, that there is something to do, so an
event that went stale (its descriptor read by another thread, or closed and
reused) does no harm.

Threads. Any thread may use the node. All node state is guarded by
:attr:`Poller.lock`, taken only for short sections that never block and never
run user code. One thread at a time polls (the *leader*); the others (the
*followers*) wait with the lock released, each on a lock of its own that is
released when something was delivered, so that an exception while they wait
(Ctrl-C) leaves no lock half-taken. A follower waiting for one call's reply is
woken by that reply only (its *key*), not by every delivery, and a leader that
leaves hands the poll to one of them. A thread that delivers something while
another one polls wakes it through an eventfd, made the first time a second
thread needs it. Should a leader vanish without handing over, a follower that
finds it in one poll for ``LEASE`` seconds wakes it, and takes over if it has
not come back from that poll a ``LEASE`` later.

Signals. A signal handler runs in the main thread between two bytecodes, so it
could land inside a section and leave the node half-changed. The handlers the
runtime installs (Ctrl-C in the embedding process, the exit signal in runtime
processes) therefore call :meth:`Poller.defer_signal` when the lock is held: the
signal is sent again to the main thread as soon as the lock is free, and acts
then.

Cleanup (reaping a dead child, removing its socket file) waits for an idle
moment, so that it does not hold up what is on its way: see :meth:`defer`.
"""

from __future__ import annotations

import os
import select
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from .errors import ProcessError

EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
POLL_MAX = 1024  # events one epoll.poll returns at most
_POLL_LONGEST = 86400.0  # one poll's timeout at most (epoll takes at most ~24 days)
LEASE = 1.0
_NONE: list[tuple[int, int]] = []  # no events (never appended to)
_monotonic = time.monotonic
# Cleanup jobs wait for an idle moment: this long without events. Once the oldest
# has waited CLEANUP_DUE, or CLEANUP_MAX are pending, each wait runs one anyway.
IDLE_CLEANUP = 0.001
CLEANUP_DUE = 0.01
CLEANUP_MAX = 32

Batch = list[tuple[int, int, Any]]  # (fd, event mask, owner when the batch was read)
OnEvents = Callable[[Batch, bool], None]
OnEvent = Callable[[int, int, Any], None]


class _Wake:
    """The owner of the eventfd other threads use to wake the leader."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd


class Reader:
    """A descriptor of the runtime's own with a callback, run (lock held) when it is
    readable."""

    __slots__ = ("fd", "callback")

    def __init__(self, fd: int, callback: Callable[[], None]) -> None:
        self.fd = fd
        self.callback = callback


class FdSet:
    """A bitmap of descriptor numbers. A forked child closes its parent's descriptors
    from the bitmap alone: walking the parent's objects would touch one object per
    descriptor, and each page touched in the inherited heap costs the child a
    copy-on-write fault."""

    __slots__ = ("bits",)

    def __init__(self) -> None:
        self.bits = bytearray()

    def add(self, fd: int) -> None:
        bits = self.bits
        if fd >= len(bits):
            bits.extend(bytes(fd + 1 - len(bits) + 256))
        bits[fd] = 1

    def __contains__(self, fd: int) -> bool:
        return 0 <= fd < len(self.bits) and self.bits[fd] == 1

    def discard(self, fd: int) -> None:
        if 0 <= fd < len(self.bits):
            self.bits[fd] = 0

    def runs(self) -> list[tuple[int, int]]:
        """The runs of set numbers, as ``(first, past_last)``."""
        bits = self.bits
        out = []
        lo = bits.find(1)
        while lo >= 0:
            hi = bits.find(0, lo)
            if hi < 0:
                hi = len(bits)
            out.append((lo, hi))
            lo = bits.find(1, hi)
        return out

    def numbers(self) -> list[int]:
        return [fd for lo, hi in self.runs() for fd in range(lo, hi)]


class Poller:
    """See the module docstring. ``on_events(batch, whole)`` handles what a poll
    returned (lock held; ``whole``: the poll returned every ready event, fewer than
    the most it returns), and ``on_event(fd, mask, owner)`` what a poll returned
    when that was one event; ``after_events()`` runs after them, lock released (the
    node's exit path starts there)."""

    def __init__(self, on_events: OnEvents, on_event: OnEvent,
                 after_events: Callable[[], None]) -> None:
        self.lock = threading.Lock()
        self._epoll = select.epoll()
        self._owners: dict[int, Any] = {}
        self.fds = FdSet()
        self._leader = 0
        self._followers: list[threading.Lock] = []  # one held lock each, released to wake
        self._keyed: dict[Any, threading.Lock] = {}  # the same, each waiting for its key
        self._leader_key: Any = None  # what the leader waits for (see wait)
        self._leader_since = 0.0  # when the leader started polling
        self._wake: _Wake | None = None
        self._jobs: list[Callable[[], None]] = []
        self._jobs_due = 0.0
        self._closed = False
        self._listeners: list[Callable[[], None]] = []
        self._waiting: set[int] = set()  # threads inside wait() (set.add is atomic)
        self._on_events = on_events
        self._on_event = on_event
        self._after_events = after_events

    # ------------------------------------------------------------ descriptors

    def add(self, fd: int, owner: Any, events: int = EPOLLIN) -> None:
        """Poll ``fd`` for ``owner`` (lock held)."""
        self._owners[fd] = owner
        self.fds.add(fd)
        self._epoll.register(fd, events)

    def modify(self, fd: int, events: int) -> None:
        self._epoll.modify(fd, events)

    def remove(self, fd: int, owner: Any) -> None:
        """Stop polling ``fd`` if ``owner`` still owns it (once closed, its number may
        belong to another). Lock held."""
        if self._owners.get(fd) is owner:
            del self._owners[fd]
            self.fds.discard(fd)
            try:
                self._epoll.unregister(fd)
            except (OSError, ValueError):
                pass

    def owner(self, fd: int) -> Any:
        return self._owners.get(fd)

    def fileno(self) -> int:
        return self._epoll.fileno()

    @property
    def waiting(self) -> bool:
        """Is a thread waiting in the runtime (for a message, a reply, room to write)?"""
        return bool(self._waiting)

    @property
    def polling(self) -> bool:
        """Is a thread blocked in the poll right now?"""
        return self._leader != 0

    @property
    def threaded(self) -> bool:
        """Has a second thread used this node? (Then an event may be stale in more ways:
        see ``_node``.)"""
        return self._wake is not None

    # ---------------------------------------------------------------- waiting

    def wait(self, ready: Callable[[], Any], deadline: float | None, key: Any = None) -> Any:
        """Block until ``ready()`` (called with the lock held) returns something other
        than None, and return that; None once ``deadline`` (monotonic seconds; None:
        never) has passed. Polls at least once, so a deadline already past still
        finds what has arrived (OTP's ``after 0``).

        ``key``: the one delivery ``ready`` waits for (a call's ref), announced by
        ``notify(key)``; a thread waiting while another polls is then woken by that
        delivery only, not by every other one (None: by every delivery).

        Raises:
            ProcessError: the node was shut down meanwhile.
        """
        me = threading.get_ident()
        self._waiting.add(me)
        try:
            return self._wait(ready, deadline, key, me)
        finally:
            self._waiting.discard(me)
            if self._keyed and not self._leader:
                self._pass_lead()

    def _wait(self, ready: Callable[[], Any], deadline: float | None, key: Any,
              me: int) -> Any:
        lock = self.lock
        polled = False
        kick: tuple[float, float] | None = None  # (the leader's poll we kicked, when)
        while True:
            waiter: threading.Lock | None = None
            woken = leading = False
            events: list[tuple[int, int]] = _NONE
            # From the section that makes us the leader or a follower to the one that
            # undoes it, an exception (Ctrl-C, between two sections) must leave neither
            # a leader that does not poll nor a follower that does not wait.
            try:
                with lock:
                    r = ready()
                    if r is not None:
                        return r
                    if self._closed:
                        raise ProcessError("the runtime node has been shut down")
                    if deadline is None:
                        timeout = -1.0
                    else:
                        timeout = deadline - _monotonic()
                        if timeout < 0.0:
                            timeout = 0.0
                    if timeout == 0.0:
                        if polled:
                            return None
                        # Poll once, without blocking, whoever leads.
                        now = self._epoll.poll(0, POLL_MAX)
                        if now:
                            self._process(now)
                            self._wake_followers()
                    elif self._leader and self._leader != me and not self._abandoned(kick):
                        # The leader polls. If it has been in one poll for LEASE seconds,
                        # kick it; take over if it has not come back from that very
                        # poll a LEASE later.
                        if self._leader_gone() and (kick is None
                                                    or kick[0] != self._leader_since):
                            kick = (self._leader_since, time.monotonic())
                            self._wake_leader()
                        waiter = threading.Lock()
                        waiter.acquire()
                        if key is None:
                            self._followers.append(waiter)
                        else:
                            self._keyed[key] = waiter
                    else:
                        leading = True
                        self._leader = me
                        self._leader_key = key
                        self._leader_since = _monotonic()
                        if self._jobs:
                            timeout = self._poll_timeout(timeout)
                        if timeout > _POLL_LONGEST:
                            timeout = _POLL_LONGEST
                if waiter is not None:
                    # Another thread polls: wait to be woken (a waker takes us off
                    # its list).
                    woken = waiter.acquire(True, LEASE if timeout < 0 else min(timeout, LEASE))
                elif leading:
                    events = self._epoll.poll(timeout, POLL_MAX)
            finally:
                if leading:
                    # Give up the lead, handle what the poll returned, and look at what
                    # we wait for in the same section.
                    with lock:
                        if self._leader == me:
                            self._leader = 0
                        if events:
                            self._process(events)
                        elif self._jobs and not self._closed:
                            self._clean_up_idle()
                        if self._followers:
                            self._wake_followers()
                        r = ready() if events else None
                elif waiter is not None and not woken:
                    with lock:
                        self._unfollow(waiter, key)
            if waiter is not None:
                continue
            if r is not None:
                self._after_events()
                return r
            polled = True
            self._after_events()

    def _unfollow(self, waiter: threading.Lock, key: Any) -> None:
        """Take a follower that was not woken off its list (lock held)."""
        if key is None:
            if waiter in self._followers:
                self._followers.remove(waiter)
        elif self._keyed.get(key) is waiter:
            del self._keyed[key]

    def _leader_gone(self) -> bool:
        return time.monotonic() - self._leader_since >= LEASE

    def _abandoned(self, kick: tuple[float, float] | None) -> bool:
        """Is the leader still in the poll we kicked it in, a LEASE after the kick?
        (Then it vanished without handing over: take over.)"""
        return (kick is not None and kick[0] == self._leader_since
                and time.monotonic() - kick[1] >= LEASE)

    def _wake_followers(self) -> None:
        """Wake the threads waiting for any delivery while another polls (lock held);
        those waiting for one key's wait for it (see ``notify``)."""
        if self._followers:
            followers, self._followers = self._followers, []
            for waiter in followers:
                waiter.release()

    def _wake_keyed(self) -> None:
        """Wake the threads waiting for their key too (lock held): the node closes."""
        keyed, self._keyed = self._keyed, {}
        for waiter in keyed.values():
            waiter.release()

    def _pass_lead(self) -> None:
        """No thread polls, and threads wait for their key while none polls: wake one
        of them to poll (it leads, or has what it waited for and passes the lead)."""
        with self.lock:
            if self._keyed and not self._leader and not self._followers:
                self._keyed.popitem()[1].release()

    def listen(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` (lock held, in whichever thread delivers) whenever
        something is delivered: how an event loop learns that what it awaits may be
        there (see ``runtime.aio``). It must return at once and never block."""
        with self.lock:
            self._listeners.append(listener)

    def unlisten(self, listener: Callable[[], None]) -> None:
        with self.lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def notify(self, key: Any = None) -> None:
        """Something was delivered (lock held): wake the threads waiting for it. With
        ``key``, the delivery is the one awaited under that key (see ``wait``):
        the thread waiting for it is woken, and those waiting for any delivery."""
        if key is not None and self._keyed:
            waiter = self._keyed.pop(key, None)
            if waiter is not None:
                waiter.release()
        if self._followers:
            self._wake_followers()
        if self._listeners:
            for listener in self._listeners:
                listener()
        if self._leader and (key is None or self._leader_key is None
                             or self._leader_key == key):
            self._wake_leader()

    def _wake_leader(self) -> None:
        """Make a thread blocked in the poll come back (lock held)."""
        leader = self._leader
        if leader and leader != threading.get_ident():
            wake = self._wake
            if wake is None:
                fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                wake = self._wake = _Wake(fd)
                self.add(fd, wake)
            os.eventfd_write(wake.fd, 1)

    def poll_now(self) -> None:
        """Handle what is ready now, without blocking (lock held): for a thread that
        must keep the node going while it waits for something else."""
        events = self._epoll.poll(0, POLL_MAX)
        if events:
            self._process(events)

    def pump(self) -> None:
        """Handle what is ready now, without blocking (for an outside event loop)."""
        with self.lock:
            if self._jobs:
                self.run_jobs()
            self.poll_now()
            self._wake_followers()
        self._after_events()

    def _process(self, events: list[tuple[int, int]]) -> None:
        owners = self._owners
        if len(events) == 1:  # the common case, kept short
            fd, mask = events[0]
            owner = owners.get(fd)
            if owner is not None and owner.__class__ is not _Wake:
                self._on_event(fd, mask, owner)
                return
        batch: Batch = []
        for fd, mask in events:
            owner = owners.get(fd)
            if owner is None:
                continue
            if owner.__class__ is _Wake:
                # Only the thread it wakes clears it: had another thread (an event
                # loop's pump) taken it, the leader would sleep on.
                if self._leader == 0 or self._leader == threading.get_ident():
                    try:
                        os.eventfd_read(fd)
                    except OSError:
                        pass
                continue
            batch.append((fd, mask, owner))
        if batch:
            self._on_events(batch, len(events) < POLL_MAX)

    # ---------------------------------------------------------------- signals

    def defer_signal(self, signo: int) -> None:
        """Called by a signal handler that found the lock held: send ``signo`` to the
        main thread again once the lock is free, so that it acts between sections."""
        threading.Thread(target=self._redeliver, args=(signo,), daemon=True,
                         name="runtime-signal").start()

    def _redeliver(self, signo: int) -> None:
        with self.lock:
            pass
        ident = threading.main_thread().ident
        if ident is not None:
            try:
                signal.pthread_kill(ident, signo)
            except (OSError, ProcessLookupError):
                pass

    # ---------------------------------------------------------------- cleanup

    def defer(self, job: Callable[[], None]) -> None:
        """Run ``job`` at the next idle moment (lock held): IDLE_CLEANUP without events,
        or sooner once jobs pile up (see the module constants)."""
        if not self._jobs:
            self._jobs_due = time.monotonic() + CLEANUP_DUE
        self._jobs.append(job)

    def run_jobs(self) -> None:
        """Run every pending cleanup job now (lock held)."""
        jobs, self._jobs = self._jobs, []
        for job in jobs:
            job()

    def _poll_timeout(self, remaining: float) -> float:
        """How long a poll may block (lock held) before the cleanup jobs run: once the
        oldest is due, or too many are pending, one runs now, whether idle or not."""
        jobs = self._jobs
        if not jobs:
            return remaining
        if len(jobs) >= CLEANUP_MAX or time.monotonic() >= self._jobs_due:
            jobs.pop(0)()
            if not jobs:
                return remaining
        return IDLE_CLEANUP if remaining < 0 or remaining > IDLE_CLEANUP else remaining

    def _clean_up_idle(self) -> None:
        """Run the cleanup jobs one at a time (lock held) while nothing arrives."""
        jobs = self._jobs
        while jobs:
            jobs.pop(0)()
            if jobs:
                events = self._epoll.poll(0, POLL_MAX)
                if events:
                    self._process(events)
                    return

    # ---------------------------------------------------------------- closing

    def abandon(self) -> None:
        """Close the epoll, and nothing else: see ``Node.abandon``."""
        self._closed = True
        self._epoll.close()

    def close(self, close_owner: Callable[[int, Any], None]) -> None:
        """Wake every waiting thread (they raise ProcessError) and every listener, give
        each registered descriptor to ``close_owner(fd, owner)``, and close the epoll.
        Waits up to 2 s for a polling thread to come back."""
        with self.lock:
            self.run_jobs()
            self._closed = True
            self.notify()
            self._wake_keyed()
        deadline = time.monotonic() + 2.0
        while self._leader and self._leader != threading.get_ident() \
                and time.monotonic() < deadline:
            time.sleep(0.005)  # (the poller wakes at once: notify wrote its eventfd)
        with self.lock:
            for fd, owner in list(self._owners.items()):
                if owner.__class__ is _Wake:
                    os.close(fd)
                else:
                    close_owner(fd, owner)
            self._owners.clear()
            self.fds = FdSet()
            self._wake = None
            self._epoll.close()
            self._wake_followers()
            self._wake_keyed()

    @property
    def closed(self) -> bool:
        return self._closed
