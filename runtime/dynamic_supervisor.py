"""DynamicSupervisor: a supervisor that starts its children on demand.

It starts with no children; ``start_child`` adds one and returns its Pid. The
strategy is always one_for_one; ``restart``, ``shutdown`` and the restart
intensity behave as in ``runtime.supervisor``. When it stops, it stops all its
children at once (each with its own shutdown time), as Elixir's does::

    sup = runtime.DynamicSupervisor.start_link(name="buckets")
    pid = runtime.DynamicSupervisor.start_child("buckets", (Bucket, None))

Calls (``start_child``, ``terminate_child``, ``which_children``,
``count_children``) block until the supervisor answered.
"""

from __future__ import annotations

from typing import Any

from . import child_spec as specs
from .errors import InvalidChildSpec, NoProcError, StartError
from .gen_server import GenServer, NoReply, Reply, call, start_server
from .messages import Exit
from .pid import Pid
from .process import keep_warm
from .supervisor import (
    Child,
    ChildEntry,
    Restarter,
    count,
    start_reply,
    unwrap,
    validate_intensity,
)

__all__ = ["DynamicSupervisor"]


class DynamicSupervisor(GenServer):
    """See the module doc."""

    @classmethod
    def start_link(cls, name: str | None = None, max_children: int | None = None,  # type: ignore[override]
                   max_restarts: int = 3, max_seconds: float = 5.0,
                   timeout: float = 60.0, warm_child: bool = False,
                   zygote: bool = False) -> Pid:
        """Start the supervisor, with no children, linked to the caller. Blocks until
        it runs. Raises InvalidChildSpec for a bad option, AlreadyRegisteredError.

        ``warm_child``: keep one child process started ahead, so that ``start_child``
        hands it the child's start function instead of forking then (see
        ``runtime.keep_warm``: the child runs in a process forked while the
        supervisor was last idle). For supervisors that start many short-lived or
        many small children.

        ``zygote``: have the children forked by a zygote instead, a small fresh
        process that keeps two started ahead (see ``runtime.keep_warm(zygote=True)``):
        starting a child then costs the same with ten thousand children as with
        ten, where a supervisor's own fork slows down as its children grow. The
        children run in fresh interpreters, not copies of the supervisor. For
        supervisors of thousands of children, such as kv's buckets."""
        if max_children is not None and not (
                isinstance(max_children, int) and not isinstance(max_children, bool)
                and max_children >= 0):
            raise InvalidChildSpec("max_children", max_children, "None or an int >= 0")
        validate_intensity(max_restarts, max_seconds)
        options = {"max_children": max_children, "max_restarts": max_restarts,
                   "max_seconds": max_seconds, "warm_child": bool(warm_child),
                   "zygote": bool(zygote)}
        return start_server(cls, options, name, timeout, link=True, trap=True)

    @classmethod
    def child_spec(cls, **options: Any) -> dict[str, Any]:  # type: ignore[override]
        """A spec to run this supervisor under another one: a permanent child of type
        "supervisor", started with ``start_link(**options)``, whose id is
        ``options["name"]`` or the class."""
        return specs.make(options.get("name") or cls, cls.start_link, (), options,
                          type="supervisor")

    @staticmethod
    def start_child(sup: Any, spec: Any) -> Pid:
        """Start a child from ``spec`` (checked in the caller first) and return its Pid.

        Raises:
            InvalidChildSpec: bad spec.
            StartError: the child failed to start, or ``max_children`` are running.
            NoProcError: the supervisor is not running.
        """
        normalized = specs.normalize(spec)
        return unwrap(call(sup, ("$dsup", "start_child", normalized), None))  # type: ignore[no-any-return]

    @staticmethod
    def terminate_child(sup: Any, pid: Pid) -> None:
        """Stop the child ``pid`` (as at shutdown) and forget it. Raises NoProcError if
        it is not a child of ``sup``."""
        unwrap(call(sup, ("$dsup", "terminate_child", pid), None))

    @staticmethod
    def which_children(sup: Any) -> list[Child]:
        """The running children (id is None for all, as in Elixir)."""
        return call(sup, ("$dsup", "which_children"), None)  # type: ignore[no-any-return]

    @staticmethod
    def count_children(sup: Any) -> dict[str, int]:
        """{"specs", "active", "supervisors", "workers"}."""
        return call(sup, ("$dsup", "count_children"), None)  # type: ignore[no-any-return]

    # ------------------------------------------------------------ the process

    def init(self, options: dict[str, Any]) -> Any:
        self.max_children = options["max_children"]
        self.restarter = Restarter(options["max_restarts"], options["max_seconds"])
        self.children: dict[Pid, ChildEntry] = {}
        if options["warm_child"] or options.get("zygote"):
            keep_warm(True, zygote=bool(options.get("zygote")))
        return None

    def handle_call(self, request: Any, from_: Any, state: Any) -> Any:
        if not (request.__class__ is tuple and request[0] == "$dsup"):
            return super().handle_call(request, from_, state)
        kind = request[1]
        if kind == "start_child":
            spec = request[2]
            if self.max_children is not None and len(self.children) >= self.max_children:
                return Reply(("error", StartError(spec.id, "max_children")), state)
            entry = ChildEntry(spec)
            result = start_reply(entry)
            if entry.pid is not None:
                self.children[entry.pid] = entry
            return Reply(result, state)
        if kind == "terminate_child":
            found = self.children.pop(request[2], None)
            if found is None:
                return Reply(("error", NoProcError(request[2], "not a child")), state)
            found.stop()
            return Reply(("ok", None), state)
        if kind == "which_children":
            return Reply([Child(None, pid, e.spec.type, e.spec.modules, e.restarts)
                          for pid, e in self.children.items()], state)
        if kind == "count_children":
            return Reply(count(self.children.values()), state)
        return super().handle_call(request, from_, state)

    def handle_info(self, msg: Any, state: Any) -> Any:
        if msg.__class__ is Exit:
            entry = self.children.pop(msg.pid, None)
            if entry is None:
                return NoReply(state)
            entry.pid = None
            if not entry.spec.is_restarted_after(msg.reason):
                return NoReply(state)
            result = self.restarter.restart([entry], state)
            if entry.pid is not None:
                self.children[entry.pid] = entry
            return result
        return super().handle_info(msg, state)

    def terminate(self, reason: Any, state: Any) -> None:
        specs.terminate_children([(pid, e.spec.shutdown) for pid, e in self.children.items()])
        self.children.clear()
