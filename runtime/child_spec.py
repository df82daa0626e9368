"""Child specs: what a supervisor needs to know to start, restart and stop a child.

A child spec is a dict with these keys (OTP's names):

- ``id``: any hashable value that names the child within its supervisor;
- ``start``: ``(fn, args)`` or ``(fn, args, kwargs)``; ``fn`` runs in the supervisor's
  process, starts the child linked to it and returns its Pid (``start_link``);
- ``restart``: ``"permanent"`` (always restarted), ``"transient"`` (restarted unless
  it exits cleanly: normal, shutdown, ("shutdown", _)) or ``"temporary"`` (never);
- ``shutdown``: seconds to wait for the child after asking it to stop, then kill it;
  ``"brutal_kill"`` kills at once; ``"infinity"`` waits forever (the default for
  supervisors, 5.0 for workers);
- ``type``: ``"worker"`` or ``"supervisor"``.

A GenServer subclass, or a ``(Subclass, arg)`` pair, is accepted wherever a spec is:
its ``child_spec(arg)`` classmethod gives the spec (override it to change the
defaults; :func:`make` builds one). :func:`normalize` checks a spec and completes
it into a :class:`ChildSpec`, the record supervisors keep; an invalid spec raises
:class:`~runtime.InvalidChildSpec` naming the field.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any

from . import _embed
from .errors import InvalidChildSpec, is_clean_exit
from .pid import Pid

__all__ = ["ChildSpec", "make", "normalize", "terminate_children", "RESTARTS", "TYPES"]

RESTARTS = ("permanent", "transient", "temporary")
TYPES = ("worker", "supervisor")
_KEYS = {"id", "start", "restart", "shutdown", "type", "modules"}


@dataclass(frozen=True, slots=True)
class ChildSpec:
    """A checked, complete child spec, as :func:`normalize` returns it.

    The fields are the keys of the dict form (see the module doc), all present;
    ``start`` is always ``(fn, args, kwargs)``. ``spec["restart"]`` reads a field as
    from the dict form.
    """

    id: Hashable
    start: tuple[Callable[..., Pid], tuple[Any, ...], dict[str, Any]]
    restart: str
    shutdown: float | str
    type: str
    modules: list[str]

    def __getitem__(self, key: str) -> Any:
        if key not in _KEYS:
            raise KeyError(key)
        return getattr(self, key)

    def is_restarted_after(self, reason: Any) -> bool:
        """Whether a child that exited with ``reason`` is restarted: a permanent child
        always, a transient one unless the exit was clean, a temporary one never."""
        return self.restart == "permanent" or (
            self.restart == "transient" and not is_clean_exit(reason))


def normalize(spec: Any) -> ChildSpec:
    """The :class:`ChildSpec` for ``spec``: a dict, a GenServer subclass, a
    ``(subclass, arg)`` pair, or a ChildSpec (returned as it is). Runs in the caller.

    Raises:
        InvalidChildSpec: ``spec`` is none of those, or a field is invalid (the
            message names it).
    """
    if isinstance(spec, ChildSpec):
        return spec
    if isinstance(spec, type) and hasattr(spec, "child_spec"):
        spec = spec.child_spec()
    elif (isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], type)
          and hasattr(spec[0], "child_spec")):
        spec = spec[0].child_spec(spec[1])
    if not isinstance(spec, dict):
        raise InvalidChildSpec("child_spec", spec,
                               "a dict, a GenServer subclass or (subclass, arg)")
    unknown = set(spec) - _KEYS
    if unknown:
        raise InvalidChildSpec(f"child_spec key {sorted(unknown, key=str)[0]!r}", spec,
                               f"only {sorted(_KEYS)}")
    if "id" not in spec:
        raise InvalidChildSpec("id", None, "a hashable id")
    try:
        hash(spec["id"])
    except TypeError:
        raise InvalidChildSpec("id", spec["id"], "a hashable value") from None
    start = spec.get("start")
    if callable(start):
        start = (start, ())
    if not (isinstance(start, tuple) and len(start) in (2, 3) and callable(start[0])
            and isinstance(start[1], (tuple, list))
            and (len(start) == 2 or isinstance(start[2], dict))):
        raise InvalidChildSpec("start", start, "(fn, args) or (fn, args, kwargs)")
    fn, args, kwargs = start if len(start) == 3 else (*start, {})
    start = (fn, tuple(args), dict(kwargs))  # copies: the record shares nothing with spec
    restart = spec.get("restart", "permanent")
    if restart not in RESTARTS:
        raise InvalidChildSpec("restart", restart, " or ".join(RESTARTS))
    kind = spec.get("type", "worker")
    if kind not in TYPES:
        raise InvalidChildSpec("type", kind, " or ".join(TYPES))
    shutdown = spec.get("shutdown", _default_shutdown(kind))
    if not (shutdown in ("brutal_kill", "infinity")
            or (isinstance(shutdown, (int, float)) and not isinstance(shutdown, bool)
                and shutdown >= 0)):
        raise InvalidChildSpec("shutdown", shutdown,
                               'seconds >= 0, "brutal_kill" or "infinity"')
    modules = spec.get("modules", [getattr(start[0], "__qualname__", repr(start[0]))])
    return ChildSpec(spec["id"], start, restart, shutdown, kind, modules)


def make(id: Any, start_fn: Callable[..., Pid], args: tuple[Any, ...] | list[Any] = (),
         kwargs: Mapping[str, Any] | None = None, *, restart: str = "permanent",
         shutdown: float | str | None = None, type: str = "worker") -> dict[str, Any]:
    """A child spec in dict form, checked: what a ``child_spec`` classmethod returns.

    Runs in the caller and returns at once (it starts nothing).

    Args:
        id: names the child within its supervisor (any hashable value).
        start_fn: called as ``start_fn(*args, **kwargs)`` in the supervisor's process;
            starts the child linked to it and returns its Pid.
        restart: ``"permanent"``, ``"transient"`` or ``"temporary"``.
        shutdown: seconds, ``"brutal_kill"`` or ``"infinity"``; None for the default
            (``"infinity"`` for a supervisor, 5.0 for a worker).
        type: ``"worker"`` or ``"supervisor"``.

    Returns:
        A new dict with every key but ``modules``; ``start`` is ``(start_fn, args,
        kwargs)``. A ``child_spec`` override may change a key of it.

    Raises:
        InvalidChildSpec: a field is invalid (the message names it).
    """
    spec = {"id": id, "start": (start_fn, args, dict(kwargs or {})), "restart": restart,
            "shutdown": _default_shutdown(type) if shutdown is None else shutdown,
            "type": type}
    normalize(spec)  # raises here, where the spec is written, not where it is used
    return spec


def _default_shutdown(kind: str) -> float | str:
    return "infinity" if kind == "supervisor" else 5.0


def terminate_children(children: list[tuple[Pid, Any]]) -> None:
    """Stop children as a supervisor does, all at once: each gets exit(pid, "shutdown")
    and its ``shutdown`` seconds (``"brutal_kill"``: killed at once; ``"infinity"``:
    waited for), then is killed. Runs in the supervisor; blocks until all are gone,
    at most the longest ``shutdown`` plus the kills (forever for ``"infinity"``).
    A child that is already dead counts as gone at once."""
    node = _embed.current()
    now = time.monotonic()
    pending: dict[Any, tuple[Pid, float | None]] = {}
    for pid, shutdown in children:
        node.unlink(pid)
        ref = node.monitor(pid, internal=True)
        if shutdown == "brutal_kill":
            node.exit(pid, "kill")
            deadline = None
        else:
            node.exit(pid, "shutdown")
            deadline = None if shutdown == "infinity" else now + shutdown
        pending[ref] = (pid, deadline)
    killed: set[Any] = set()
    while pending:
        deadlines = [d for ref, (_, d) in pending.items() if d is not None and ref not in killed]
        timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
        down = node.wait_down(pending, timeout)
        if down is None:
            now = time.monotonic()
            for ref, (pid, deadline) in pending.items():
                if deadline is not None and deadline <= now and ref not in killed:
                    node.exit(pid, "kill")
                    killed.add(ref)
            continue
        pending.pop(down.ref, None)
