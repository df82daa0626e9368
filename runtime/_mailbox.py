"""Internal: what has been delivered to a process and waits to be taken.

Three kinds of deliveries, each taken by whoever waits for it:

- *messages*, in arrival order, taken by ``receive`` (the first one, or the first
  one a ``match`` accepts: selective receive). A message from another process
  is kept as it arrived, pickled (:class:`Raw`), and unpickled by the thread
  that takes it, outside the node's lock: the user code unpickling may run
  (``__setstate__``, an import) is then free to use the runtime. So is a
  ``match``: it is called outside the lock too.
- *replies* to this process's calls, by call ref;
- the ``Down`` of the runtime's own monitors (``stop``, ``start_link``,
  supervisors), kept apart from the messages so that no ``receive`` of another
  thread can take them.

The embedding process traps exits, and nothing takes its ``Exit`` messages if
it does not receive: at most ``MAIN_EXIT_BACKLOG`` of them are kept there, the
oldest dropped (with a warning) to make room.
"""

from __future__ import annotations

import logging
import pickle
from collections import deque
from collections.abc import Callable
from typing import Any, NamedTuple

from .messages import Down, Exit
from .pid import From, Pid, Ref

log = logging.getLogger("runtime")

MAIN_EXIT_BACKLOG = 1000

_PENDING = object()
_BAD = object()


class Raw:
    """A message as it arrived from another process: its pickle, and what it is part
    of: a call (``From``: it becomes ``("$gen_call", from_, request)``), an exit
    signal (the sender's Pid: ``Exit(sender, reason)``), or nothing (None)."""

    __slots__ = ("data", "part_of", "value")

    def __init__(self, data: bytes, part_of: From | Pid | None = None) -> None:
        self.data = data
        self.part_of = part_of
        self.value: Any = _PENDING  # once unpickled (a selective receive passed it by)

    def load(self) -> Any:
        """The message. Kept, so that a message a ``match`` rejected is not unpickled
        again; the Raw stays in the mailbox (another thread's scan finds it by
        identity)."""
        value = self.value
        if value is not _PENDING:
            return value
        value = pickle.loads(self.data)
        part_of = self.part_of
        if part_of.__class__ is From:
            value = ("$gen_call", part_of, value)
        elif part_of is not None:
            value = Exit(part_of, value)  # type: ignore[arg-type]
        self.value = value
        return value


class CallResult(NamedTuple):
    """How a call ended: ``ok`` with the pickled reply, or not with the server's exit
    reason."""

    ok: bool
    value: Any


Wait = Callable[[Callable[[], Any], "float | None"], Any]


class Mailbox:
    """See the module docstring. Methods marked "lock held" run inside a node section;
    the others wait through ``wait`` (the poller's) and take the lock themselves."""

    def __init__(self, lock: Any, wait: Wait, notify: Callable[..., None], owner: Pid,
                 is_main: bool) -> None:
        self._lock = lock
        self._wait = wait
        self._notify = notify
        self._owner = owner
        self._is_main = is_main
        self._messages: deque[Any] = deque()
        self._generation = 0  # bumps when a message leaves: a scan's positions shift
        self._exits = 0  # Exit messages queued in the embedding process
        self._replies: dict[int, Any] = {}
        self._sinks: dict[int, list[int]] = {}  # call ref -> where its end is noted
        self._downs: dict[Ref, Down | None] = {}

    # ---------------------------------------------------------------- delivery

    def put(self, msg: Any) -> None:
        """Queue a message (lock held)."""
        self._messages.append(msg)
        self._notify()

    def put_back(self, msg: Any) -> None:
        """Return a message taken for nothing (an await that gave up) to the front."""
        with self._lock:
            self._messages.appendleft(msg)
            self._generation += 1  # positions shifted
            if self._is_main and _is_exit(msg):
                self._exits += 1
            self._notify()

    def put_exit(self, msg: Exit | Raw) -> None:
        """Queue an ``Exit`` (or an exit signal still pickled) (lock held)."""
        if self._is_main:
            if self._exits >= MAIN_EXIT_BACKLOG:
                messages = self._messages
                for i, old in enumerate(messages):
                    if _is_exit(old):
                        del messages[i]
                        self._generation += 1
                        break
                log.warning("the embedding process has %d unreceived Exit messages; "
                            "dropped the oldest", MAIN_EXIT_BACKLOG)
            else:
                self._exits += 1
        self.put(msg)

    def expect_reply(self, ref: int) -> None:
        """A call ``ref`` is on its way (lock held)."""
        self._replies[ref] = _PENDING

    def put_reply(self, ref: int, result: CallResult) -> None:
        """The call ``ref`` ended (lock held); ignored unless it is still awaited."""
        if self._replies.get(ref) is _PENDING:
            self._ended(ref, result)

    def reply_arrived(self, ref: int, frame: memoryview) -> None:
        """A REPLY frame's body (its ref, then the pickled reply) came for the call
        ``ref`` (lock held); ignored unless it is still awaited."""
        if self._replies.get(ref) is _PENDING:
            self._ended(ref, CallResult(True, bytes(frame[8:])))

    def _ended(self, ref: int, result: CallResult) -> None:
        """The awaited call ``ref`` ended with ``result`` (lock held): keep it, and tell
        whoever waits for it."""
        self._replies[ref] = result
        if self._sinks:
            sink = self._sinks.pop(ref, None)
            if sink is not None:
                sink.append(ref)
        self._notify(ref)

    def take_reply(self, ref: int) -> CallResult | None:
        """The call's result if it has ended, and the call forgotten (lock held)."""
        r = self._replies.get(ref)
        if r is _PENDING or r is None:
            return None
        del self._replies[ref]
        return r  # type: ignore[no-any-return]

    def drop_reply(self, ref: int) -> None:
        """Forget the call ``ref``: a reply that comes later is dropped (lock held)."""
        self._replies.pop(ref, None)
        self._sinks.pop(ref, None)

    def note_reply(self, ref: int, sink: list[int]) -> None:
        """Append ``ref`` to ``sink`` when the call ``ref`` ends, or now if it has
        (lock held): how an event loop finds which of its many calls ended without
        looking at each."""
        if self._replies.get(ref) is _PENDING:
            self._sinks[ref] = sink
        else:
            sink.append(ref)

    def reply_of(self, ref: int) -> CallResult | None:
        """The call's result if it has ended (lock held)."""
        r = self._replies.get(ref)
        return None if r is _PENDING else r

    def expect_down(self, ref: Ref) -> None:
        """``ref`` is one of the runtime's own monitors (lock held)."""
        self._downs[ref] = None

    def put_down(self, down: Down) -> None:
        """Deliver a Down (lock held): to the runtime's monitor it belongs to, or as a
        message."""
        if down.ref in self._downs:
            self._downs[down.ref] = down
            self._notify()
        else:
            self.put(down)

    def forget_down(self, ref: Ref) -> None:
        """Stop expecting the Down of a runtime monitor (lock held)."""
        self._downs.pop(ref, None)

    def remove_down(self, ref: Ref) -> None:
        """Remove the queued Down of monitor ``ref``, if any (lock held)."""
        messages = self._messages
        for i, m in enumerate(messages):
            if m.__class__ is Down and m.ref == ref:
                del messages[i]
                self._generation += 1
                return

    def down_of(self, refs: Any) -> Down | None:
        """The Down of any of the runtime monitors ``refs``, taken (lock held)."""
        downs = self._downs
        for ref in refs:
            down = downs.get(ref)
            if down is not None:
                del downs[ref]
                return down
        return None

    # ----------------------------------------------------------------- taking

    def take(self, deadline: float | None) -> tuple[Any] | None:
        """The first message, as a 1-tuple; None once ``deadline`` has passed."""
        while True:
            got = self._wait(self._first, deadline)
            if got is None:
                return None
            msg = got[0]
            if msg.__class__ is Raw:
                try:
                    msg = self._load(msg)
                except BaseException:  # Ctrl-C while it unpickled: the message stays
                    self.put_back(got[0])
                    raise
                if msg is _BAD:
                    continue
            return (msg,)

    def _first(self) -> tuple[Any] | None:
        """The first message, taken, as a 1-tuple, if there is one (lock held)."""
        messages = self._messages
        if messages:
            self._generation += 1
            msg = messages.popleft()
            if self._is_main and _is_exit(msg):
                self._exits -= 1
            return (msg,)
        return None

    def take_match(self, match: Callable[[Any], bool],
                   deadline: float | None) -> tuple[Any] | None:
        """The first message ``match`` accepts, as a 1-tuple; None once ``deadline`` has
        passed. ``match`` runs outside the lock; messages it rejected are not shown to
        it again, unless another thread took a message meanwhile."""
        messages = self._messages
        seen = 0
        generation_seen = -1  # the generation for which ``seen`` holds

        def news() -> tuple[int, int, list[Any]] | None:
            nonlocal seen, generation_seen
            if generation_seen != self._generation:
                seen, generation_seen = 0, self._generation
            if len(messages) > seen:
                return seen, generation_seen, [messages[i] for i in range(seen, len(messages))]
            return None

        while True:
            got = self._wait(news, deadline)
            if got is None:
                return None
            start, generation, entries = got
            taken, value, bad = self._scan(match, start, generation, entries)
            if taken:
                return (value,)
            with self._lock:
                if generation != self._generation - bad:
                    seen, generation_seen = 0, -1
                else:
                    seen = start + len(entries) - bad
                    generation_seen = self._generation

    def take_now(self, match: Callable[[Any], bool] | None) -> tuple[Any] | None:
        """The first message (that ``match`` accepts), as a 1-tuple, if one is there;
        never waits. ``match`` runs outside the lock."""
        while True:
            with self._lock:
                generation = self._generation
                entries = list(self._messages)
            if not entries:
                return None
            if match is None:
                match = _anything
            taken, value, bad = self._scan(match, 0, generation, entries)
            if taken:
                return (value,)
            if not bad:
                return None

    def _scan(self, match: Callable[[Any], bool], start: int, generation: int,
              entries: list[Any]) -> tuple[bool, Any, int]:
        """Show ``entries`` (the messages from position ``start`` when the mailbox was
        at ``generation``) to ``match``, outside the lock, and take the first it
        accepts if it is still there: (taken, the message, how many messages that
        cannot be unpickled were dropped)."""
        loaded: dict[int, Any] = {}  # position -> unpickled value
        found = -1
        value: Any = None
        for k, entry in enumerate(entries):
            value = entry
            if entry.__class__ is Raw:
                value = loaded[start + k] = self._load(entry)
                if value is _BAD:
                    continue
            if match(value):
                found = start + k
                break
        bad = sum(v is _BAD for v in loaded.values())
        with self._lock:
            shifted = generation != self._generation
            taken = self._settle(start, entries, loaded, found, shifted)
        return taken, value, bad

    def _settle(self, start: int, entries: list[Any], loaded: dict[int, Any], found: int,
                shifted: bool) -> bool:
        """After a scan of ``entries`` (the messages from position ``start``; lock
        held): drop what could not be unpickled, and take the message at position
        ``found`` if it is still there (another thread may have taken it). True if it
        was taken. Goes from the last position to the first, so that a removal does
        not move the rest."""
        messages = self._messages
        taken = False
        bad = [pos for pos, value in loaded.items() if value is _BAD]
        for pos in sorted({*bad, found} - {-1}, reverse=True):
            entry = entries[pos - start]
            i = pos if (not shifted and messages[pos] is entry) else _index(messages, entry)
            if i < 0:
                continue
            del messages[i]
            self._generation += 1
            if pos == found:
                self._taken(entry)
                taken = True
        return taken

    def _taken(self, msg: Any) -> Any:
        if self._is_main and _is_exit(msg):
            self._exits -= 1
        return msg

    def _load(self, raw: Raw) -> Any:
        try:
            return raw.load()
        except (Exception, SystemExit) as exc:  # (its own code ran: a sys.exit too)
            log.error("%r dropped a message that cannot be unpickled here: %r",
                      self._owner, exc)
            return _BAD

    # ------------------------------------------------------------ inspection

    def peek(self, n: int) -> list[Any]:
        """The first ``n`` messages, left in place (for error messages in tests)."""
        with self._lock:
            head = [self._messages[i] for i in range(min(n, len(self._messages)))]
        out = []
        for m in head:
            if m.__class__ is Raw:
                try:
                    m = m.load()
                except Exception as exc:
                    m = f"<a message that cannot be unpickled: {exc!r}>"
            out.append(m)
        return out

    def clear(self) -> None:
        """Drop every queued message (for tests)."""
        with self._lock:
            self._generation += len(self._messages)
            self._messages.clear()
            self._exits = 0

    def length(self) -> int:
        """How many messages are queued."""
        return len(self._messages)

    def exits_queued(self) -> int:
        return self._exits


def _anything(msg: Any) -> bool:
    return True


def _index(messages: deque[Any], entry: Any) -> int:
    for i, m in enumerate(messages):
        if m is entry:
            return i
    return -1


def _is_exit(msg: Any) -> bool:
    return msg.__class__ is Exit or (msg.__class__ is Raw and msg.part_of.__class__ is Pid)
