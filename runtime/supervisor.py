"""Supervisor: starts children, restarts them when they exit, stops them in order.

A guide in brief::

    sup = runtime.Supervisor.start_link(
        [Registry, (Cache, {"size": 100})],        # GenServer classes, or child specs
        strategy="one_for_one", max_restarts=3, max_seconds=5.0, name="app.sup",
    )

- Children start in order, each linked to the supervisor (they are its OS
  children too), and stop in reverse order. If one fails to start, the ones
  already started are stopped and ``start_link`` raises ``StartError``.
- When a child exits, its ``restart`` decides (see ``runtime.child_spec``):
  permanent children are always restarted, transient ones unless the exit was
  clean, temporary ones never (their spec is dropped). Then the strategy:

  * ``one_for_one``: restart that child;
  * ``one_for_all``: stop all the others (reverse order), restart all (in order);
  * ``rest_for_one``: stop the children started after it, restart it and them.

  A temporary child stopped along with the others is dropped, not restarted; a
  transient one is restarted with them (as in OTP).

- Restart intensity: more than ``max_restarts`` restarts within ``max_seconds``
  means something is badly wrong: the supervisor stops all its children and
  exits with reason ``"shutdown"``, which its own supervisor sees.
- Stopping: each child gets ``exit(child, "shutdown")`` and its ``shutdown``
  seconds, then is killed. A supervisor traps exits: when its parent exits, it
  stops its children first.

The supervisor is a GenServer; ``which_children``, ``count_children``,
``terminate_child``, ``restart_child``, ``delete_child`` and ``start_child`` are
calls to it (they block until it answered; they wait as long as stopping a child
takes).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from . import child_spec as specs
from . import process
from .errors import InvalidChildSpec, NoProcError, ProcessError, StartError
from .gen_server import GenServer, NoReply, Reply, Stop, call, start_server
from .messages import Exit
from .pid import Pid

__all__ = ["Child", "Supervisor", "STRATEGIES"]

log = logging.getLogger("runtime")

STRATEGIES = ("one_for_one", "one_for_all", "rest_for_one")


class Child(NamedTuple):
    """One entry of ``which_children``: OTP's ``{Id, Child, Type, Modules}`` plus the
    number of times the supervisor restarted it."""

    id: Any
    pid: Pid | None
    type: str
    modules: list[str]
    restarts: int


# ------------------------------------------------- shared with DynamicSupervisor


@dataclass(slots=True, eq=False)
class ChildEntry:
    """A supervisor's record of one child: its spec, its Pid while it runs (None
    otherwise), and how many times the supervisor restarted it. Lives in the
    supervisor's process."""

    spec: specs.ChildSpec
    pid: Pid | None = None
    restarts: int = 0

    def start(self) -> Pid:
        """Run the spec's start function and record the child's Pid.

        Runs in the supervisor's process and blocks until the start function
        returned (a GenServer's ``start_link`` waits for ``init``).

        Raises:
            BaseException: whatever the start function raised.
            TypeError: the start function returned something other than a Pid.
        """
        fn, args, kwargs = self.spec.start
        pid = fn(*args, **kwargs)
        if not isinstance(pid, Pid):
            raise TypeError(f"the start function of child {self.spec.id!r} returned {pid!r}, "
                            "not a Pid")
        self.pid = pid
        return pid

    def stop(self) -> None:
        """Stop the child as at shutdown (see ``child_spec.terminate_children``) and
        record that it is not running. Blocks until it is gone, at most its
        ``shutdown`` seconds plus the kill. Returns at once if it is not running."""
        if self.pid is not None:
            specs.terminate_children([(self.pid, self.spec.shutdown)])
            self.pid = None


def start_reply(entry: ChildEntry) -> tuple[str, Any]:
    """Start ``entry`` for a client call: ``("ok", pid)``, or ``("error", StartError)``
    if its start function raised (see :func:`unwrap`)."""
    try:
        return ("ok", entry.start())
    except BaseException as exc:
        return ("error", StartError(entry.spec.id, getattr(exc, "reason", exc)))


class Restarter:
    """The restart engine of Supervisor and DynamicSupervisor.

    It restarts children within OTP's restart intensity: at most ``max_restarts``
    restarts in any ``max_seconds``. Lives in the supervisor's process.
    """

    __slots__ = ("max_restarts", "max_seconds", "_times")

    def __init__(self, max_restarts: int, max_seconds: float) -> None:
        self.max_restarts = max_restarts
        self.max_seconds = max_seconds
        self._times: deque[float] = deque()

    def restart(self, group: Sequence[ChildEntry], state: Any) -> NoReply | Stop:
        """Restart after one child's failure, which counts as one restart whatever
        ``group`` holds.

        Starts, in order, each entry of ``group`` that is not running. A start that
        fails is logged and tried again, and each failure counts as one more
        restart. Blocks while the children start.

        Returns:
            ``NoReply(state)`` once the group runs, or ``Stop("shutdown", state)``
            (logged) as soon as the intensity is exceeded: the supervisor then stops
            its remaining children and exits.
        """
        if self._exceeded_after_one_more():
            return self._give_up(state)
        for entry in group:
            while entry.pid is None:
                try:
                    entry.start()
                except BaseException as exc:
                    log.error("supervisor %r could not restart child %r: %r",
                              process.self(), entry.spec.id, exc)
                    if self._exceeded_after_one_more():
                        return self._give_up(state)
                else:
                    entry.restarts += 1
        return NoReply(state)

    def _exceeded_after_one_more(self) -> bool:
        now = time.monotonic()
        self._times.append(now)
        while now - self._times[0] > self.max_seconds:
            self._times.popleft()
        return len(self._times) > self.max_restarts

    def _give_up(self, state: Any) -> Stop:
        log.error("supervisor %r reached its restart intensity (%d restarts in %ss); "
                  "shutting down", process.self(), self.max_restarts, self.max_seconds)
        return Stop("shutdown", state)


def validate_intensity(max_restarts: Any, max_seconds: Any) -> None:
    """Check the restart intensity options, in the caller of ``start_link``.
    Raises InvalidChildSpec naming the option."""
    if not (isinstance(max_restarts, int) and not isinstance(max_restarts, bool)
            and max_restarts >= 0):
        raise InvalidChildSpec("max_restarts", max_restarts, "an int >= 0")
    if not (isinstance(max_seconds, (int, float)) and not isinstance(max_seconds, bool)
            and max_seconds > 0):
        raise InvalidChildSpec("max_seconds", max_seconds, "seconds > 0")


def count(entries: Iterable[ChildEntry]) -> dict[str, int]:
    """``count_children``'s answer for ``entries``, as OTP counts."""
    entries = list(entries)
    return {
        "specs": len(entries),
        "active": sum(1 for e in entries if e.pid is not None),
        "supervisors": sum(1 for e in entries if e.spec.type == "supervisor"),
        "workers": sum(1 for e in entries if e.spec.type == "worker"),
    }


def unwrap(result: tuple[str, Any]) -> Any:
    """In the client: the value of a supervisor's ``("ok", value)`` answer, or raise
    the exception of its ``("error", exc)`` answer."""
    status, value = result
    if status == "error":
        raise value
    return value


class Supervisor(GenServer):
    """A static supervisor. Start it with :meth:`start_link`; see the module doc."""

    @classmethod
    def start_link(cls, children: list[Any], strategy: str = "one_for_one",  # type: ignore[override]
                   max_restarts: int = 3, max_seconds: float = 5.0,
                   name: str | None = None, timeout: float = 60.0) -> Pid:
        """Start the supervisor and its children, linked to the caller.

        Blocks until every child has started. Specs and options are checked first,
        in the caller.

        Raises:
            InvalidChildSpec: a spec or option is invalid (the message names the field),
                or two children share an id.
            StartError: a child failed to start (the others were stopped again).
            AlreadyRegisteredError: ``name`` is taken.
        """
        options = cls._options(children, strategy, max_restarts, max_seconds)
        return start_server(cls, options, name, timeout, link=True, trap=True)

    @classmethod
    def _options(cls, children: Any, strategy: Any, max_restarts: Any,
                 max_seconds: Any) -> dict[str, Any]:
        if strategy not in STRATEGIES:
            raise InvalidChildSpec("strategy", strategy, " or ".join(STRATEGIES))
        validate_intensity(max_restarts, max_seconds)
        if not isinstance(children, (list, tuple)):
            raise InvalidChildSpec("children", children, "a list of child specs")
        normalized = [specs.normalize(c) for c in children]
        ids = [s.id for s in normalized]
        for i, child_id in enumerate(ids):
            if child_id in ids[:i]:
                raise InvalidChildSpec("id", child_id, "ids unique within a supervisor")
        return {"children": normalized, "strategy": strategy,
                "max_restarts": max_restarts, "max_seconds": max_seconds}

    @classmethod
    def child_spec(cls, children: Any = (), **options: Any) -> dict[str, Any]:  # type: ignore[override]
        """A spec to run this supervisor under another one: a permanent child of type
        "supervisor", started with ``start_link(children, **options)``, whose id is
        ``options["name"]`` or the class."""
        return specs.make(options.get("name") or cls, cls.start_link, (list(children),),
                          options, type="supervisor")

    # ------------------------------------------------------------ client calls

    @staticmethod
    def which_children(sup: Any) -> list[Child]:
        """The children, in start order. A child that is not running has pid None."""
        return call(sup, ("$sup", "which_children"), None)  # type: ignore[no-any-return]

    @staticmethod
    def count_children(sup: Any) -> dict[str, int]:
        """{"specs", "active", "supervisors", "workers"} as OTP counts them."""
        return call(sup, ("$sup", "count_children"), None)  # type: ignore[no-any-return]

    @staticmethod
    def terminate_child(sup: Any, child_id: Any) -> None:
        """Stop the child (as at shutdown) and keep its spec, unless it is temporary.
        Raises NoProcError if the supervisor has no such child."""
        unwrap(call(sup, ("$sup", "terminate_child", child_id), None))

    @staticmethod
    def restart_child(sup: Any, child_id: Any) -> Pid:
        """Start again a child that was terminated. Raises ProcessError if it is
        running, NoProcError if there is no such child, StartError if it fails."""
        return unwrap(call(sup, ("$sup", "restart_child", child_id), None))  # type: ignore[no-any-return]

    @staticmethod
    def delete_child(sup: Any, child_id: Any) -> None:
        """Forget the spec of a child that is not running."""
        unwrap(call(sup, ("$sup", "delete_child", child_id), None))

    @staticmethod
    def start_child(sup: Any, spec: Any) -> Pid:
        """Add a child spec at the end and start it. Raises InvalidChildSpec, StartError."""
        normalized = specs.normalize(spec)
        return unwrap(call(sup, ("$sup", "start_child", normalized), None))  # type: ignore[no-any-return]

    # ------------------------------------------------------------ the process

    def init(self, options: dict[str, Any]) -> Any:
        self.strategy = options["strategy"]
        self.restarter = Restarter(options["max_restarts"], options["max_seconds"])
        self.children = [ChildEntry(spec) for spec in options["children"]]
        for i, entry in enumerate(self.children):
            try:
                entry.start()
            except BaseException as exc:
                self._stop(reversed(self.children[:i]))
                reason = getattr(exc, "reason", None) or repr(exc)
                return Stop(("failed_to_start_child", entry.spec.id, reason), None)
        return None

    def handle_call(self, request: Any, from_: Any, state: Any) -> Any:
        if not (request.__class__ is tuple and request[0] == "$sup"):
            return super().handle_call(request, from_, state)
        kind = request[1]
        if kind == "which_children":
            return Reply([Child(e.spec.id, e.pid, e.spec.type, e.spec.modules, e.restarts)
                          for e in self.children], state)
        if kind == "count_children":
            return Reply(count(self.children), state)
        if kind == "start_child":
            spec = request[2]
            if self._find(spec.id) is not None:
                return Reply(("error", InvalidChildSpec("id", spec.id, "a new id")), state)
            entry = ChildEntry(spec)
            result = start_reply(entry)
            if entry.pid is not None:
                self.children.append(entry)
            return Reply(result, state)
        found = self._find(request[2])
        if found is None:
            return Reply(("error", NoProcError(request[2], "no such child")), state)
        entry = found
        if kind == "terminate_child":
            entry.stop()
            if entry.spec.restart == "temporary":
                self.children.remove(entry)
            return Reply(("ok", None), state)
        if kind == "restart_child":
            if entry.pid is not None:
                return Reply(("error", ProcessError(f"child {request[2]!r} is running")), state)
            return Reply(start_reply(entry), state)
        if kind == "delete_child":
            if entry.pid is not None:
                return Reply(("error", ProcessError(f"child {request[2]!r} is running")), state)
            self.children.remove(entry)
            return Reply(("ok", None), state)
        return super().handle_call(request, from_, state)

    def handle_info(self, msg: Any, state: Any) -> Any:
        if msg.__class__ is Exit:
            entry = next((e for e in self.children if e.pid == msg.pid), None)
            if entry is not None:
                return self._child_exited(entry, msg.reason, state)
            return NoReply(state)
        return super().handle_info(msg, state)

    def terminate(self, reason: Any, state: Any) -> None:
        self._stop(reversed(self.children))

    # ----------------------------------------------------------------- helpers

    def _find(self, child_id: Any) -> ChildEntry | None:
        return next((e for e in self.children if e.spec.id == child_id), None)

    def _stop(self, entries: Iterable[ChildEntry]) -> None:
        """Stop ``entries`` one by one, in the order given."""
        for entry in entries:
            entry.stop()

    def _child_exited(self, entry: ChildEntry, reason: Any, state: Any) -> NoReply | Stop:
        entry.pid = None
        if not entry.spec.is_restarted_after(reason):
            if entry.spec.restart == "temporary":
                self.children.remove(entry)
            return NoReply(state)
        if self.strategy == "one_for_one":
            group = [entry]
        elif self.strategy == "one_for_all":
            group = list(self.children)
        else:
            group = self.children[self.children.index(entry):]
        # The group is stopped before the restarter counts this restart: if that is one
        # too many, terminate() stops the other children, so all stop in reverse order
        # either way.
        self._stop(reversed(group))
        # As in OTP, a temporary child stopped with its group is dropped, not restarted.
        dropped = [e for e in group if e.spec.restart == "temporary"]
        for other in dropped:
            group.remove(other)
            self.children.remove(other)
        return self.restarter.restart(group, state)
