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
from typing import Any, NamedTuple

from . import _node
from . import child_spec as specs
from .child_spec import ChildSpec
from .errors import InvalidChildSpec, NoProcError, ProcessError, StartError, is_clean_exit
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


class _Entry:
    __slots__ = ("spec", "pid", "restarts")

    def __init__(self, spec: ChildSpec) -> None:
        self.spec = spec
        self.pid: Pid | None = None
        self.restarts = 0


def validate_intensity(max_restarts: Any, max_seconds: Any) -> None:
    if not (isinstance(max_restarts, int) and not isinstance(max_restarts, bool)
            and max_restarts >= 0):
        raise InvalidChildSpec("max_restarts", max_restarts, "an int >= 0")
    if not (isinstance(max_seconds, (int, float)) and not isinstance(max_seconds, bool)
            and max_seconds > 0):
        raise InvalidChildSpec("max_seconds", max_seconds, "seconds > 0")


class Intensity:
    """Counts restarts in a sliding window (OTP's restart intensity)."""

    def __init__(self, max_restarts: int, max_seconds: float) -> None:
        self.max_restarts = max_restarts
        self.max_seconds = max_seconds
        self.times: deque[float] = deque()

    def exceeded_after_one_more(self) -> bool:
        now = time.monotonic()
        self.times.append(now)
        while self.times and now - self.times[0] > self.max_seconds:
            self.times.popleft()
        return len(self.times) > self.max_restarts


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
        """A spec to run this supervisor under another one (type "supervisor")."""
        name = options.get("name")
        return {"id": name or cls, "start": (cls.start_link, (list(children),), options),
                "restart": "permanent", "type": "supervisor", "shutdown": "infinity"}

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
        _check(call(sup, ("$sup", "terminate_child", child_id), None))

    @staticmethod
    def restart_child(sup: Any, child_id: Any) -> Pid:
        """Start again a child that was terminated. Raises ProcessError if it is
        running, NoProcError if there is no such child, StartError if it fails."""
        return _check(call(sup, ("$sup", "restart_child", child_id), None))  # type: ignore[no-any-return]

    @staticmethod
    def delete_child(sup: Any, child_id: Any) -> None:
        """Forget the spec of a child that is not running."""
        _check(call(sup, ("$sup", "delete_child", child_id), None))

    @staticmethod
    def start_child(sup: Any, spec: Any) -> Pid:
        """Add a child spec at the end and start it. Raises InvalidChildSpec, StartError."""
        normalized = specs.normalize(spec)
        return _check(call(sup, ("$sup", "start_child", normalized), None))  # type: ignore[no-any-return]

    # ------------------------------------------------------------ the process

    def init(self, options: dict[str, Any]) -> Any:
        self.strategy = options["strategy"]
        self.intensity = Intensity(options["max_restarts"], options["max_seconds"])
        self.children = [_Entry(spec) for spec in options["children"]]
        for i, entry in enumerate(self.children):
            try:
                entry.pid = specs.start(entry.spec)
            except BaseException as exc:
                self._stop(list(reversed(self.children[:i])))
                reason = getattr(exc, "reason", None) or repr(exc)
                return Stop(("failed_to_start_child", entry.spec.id, reason), None)
        return None

    def handle_call(self, request: Any, from_: Any, state: Any) -> Any:
        if not (request.__class__ is tuple and request[0] == "$sup"):
            return super().handle_call(request, from_, state)
        kind = request[1]
        if kind == "which_children":
            return Reply([Child(e.spec.id, e.pid, e.spec.type, e.spec.modules,
                                e.restarts) for e in self.children], state)
        if kind == "count_children":
            return Reply(count(self.children), state)
        if kind == "start_child":
            spec = request[2]
            if self._find(spec.id) is not None:
                return Reply(("error", InvalidChildSpec("id", spec.id, "a new id")), state)
            entry = _Entry(spec)
            try:
                entry.pid = specs.start(spec)
            except BaseException as exc:
                return Reply(("error", StartError(spec.id, getattr(exc, "reason", exc))),
                             state)
            self.children.append(entry)
            return Reply(("ok", entry.pid), state)
        found = self._find(request[2])
        if found is None:
            return Reply(("error", NoProcError(request[2], "no such child")), state)
        entry = found
        if kind == "terminate_child":
            if entry.pid is not None:
                self._stop([entry])
            if entry.spec.restart == "temporary":
                self.children.remove(entry)
            return Reply(("ok", None), state)
        if kind == "restart_child":
            if entry.pid is not None:
                return Reply(("error", ProcessError(f"child {request[2]!r} is running")), state)
            try:
                entry.pid = specs.start(entry.spec)
            except BaseException as exc:
                return Reply(("error", StartError(request[2], getattr(exc, "reason", exc))),
                             state)
            return Reply(("ok", entry.pid), state)
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
        self._stop([e for e in reversed(self.children) if e.pid is not None])

    # ----------------------------------------------------------------- helpers

    def _find(self, child_id: Any) -> _Entry | None:
        return next((e for e in self.children if e.spec.id == child_id), None)

    def _stop(self, entries: list[_Entry]) -> None:
        """Stop ``entries`` one by one, in the order given."""
        for entry in entries:
            if entry.pid is not None:
                specs.terminate_children([(entry.pid, entry.spec.shutdown)])
                entry.pid = None

    def _child_exited(self, entry: _Entry, reason: Any, state: Any) -> Any:
        entry.pid = None
        restart = entry.spec.restart
        if restart == "temporary":
            self.children.remove(entry)
            return NoReply(state)
        if restart == "transient" and is_clean_exit(reason):
            return NoReply(state)
        index = self.children.index(entry)
        if self.strategy == "one_for_one":
            group = [entry]
        elif self.strategy == "one_for_all":
            group = list(self.children)
        else:
            group = self.children[index:]
        # One failure is one restart, whatever the strategy restarts along with it.
        if self.intensity.exceeded_after_one_more():
            return self._give_up(state)
        self._stop([e for e in reversed(group) if e.pid is not None])
        # A temporary child is never restarted: stopped with its group, it is dropped.
        for other in [e for e in group if e.spec.restart == "temporary"]:
            group.remove(other)
            self.children.remove(other)
        return self._restart(group, state)

    def _restart(self, group: list[_Entry], state: Any) -> Any:
        """Start ``group`` again in order; a start that fails is retried, and each retry
        counts against the intensity."""
        for entry in group:
            while entry.pid is None:
                try:
                    entry.pid = specs.start(entry.spec)
                    entry.restarts += 1
                except BaseException as exc:
                    log.error("supervisor %r could not restart child %r: %r",
                              _node.current().me, entry.spec.id, exc)
                    if self.intensity.exceeded_after_one_more():
                        return self._give_up(state)
        return NoReply(state)

    def _give_up(self, state: Any) -> Any:
        log.error("supervisor %r reached its restart intensity (%d restarts in %ss); "
                  "shutting down", _node.current().me, self.intensity.max_restarts,
                  self.intensity.max_seconds)
        return Stop("shutdown", state)


def count(entries: Any) -> dict[str, int]:
    entries = list(entries)
    return {
        "specs": len(entries),
        "active": sum(1 for e in entries if e.pid is not None),
        "supervisors": sum(1 for e in entries if e.spec.type == "supervisor"),
        "workers": sum(1 for e in entries if e.spec.type == "worker"),
    }


def _check(result: Any) -> Any:
    status, value = result
    if status == "error":
        raise value
    return value
