"""The registry: maps bucket names to bucket processes, and forgets a name when
its bucket exits.

It is a GenServer. ``create`` asks the bucket supervisor (a DynamicSupervisor) to
start the bucket, so the bucket is the supervisor's child, not the registry's;
the registry only *monitors* it. A bucket's exit, for any reason, is a ``Down``
that removes its name; the registry itself never dies with a bucket (the lesson
of the guide: link and the registry dies with the first bucket that crashes).

A stronger promise than the guide's: once ``runtime.stop(bucket)`` has returned,
or the caller has received the bucket's ``Down`` from its own monitor, ``lookup``
never returns the dead bucket (the registry checks its watch on the bucket
before it answers, so it need not have processed the Down yet).

Names are arbitrary strings. Calls block until the registry answered (5 s).
"""

from __future__ import annotations

from typing import Any

import runtime
from runtime import Down, DynamicSupervisor, NoReply, Pid, Reply
from runtime import child_spec as specs

from . import bucket

__all__ = ["Registry", "acreate", "alookup", "create", "lookup", "sizes", "start_link"]


def start_link(name: str | None = None, bucket_supervisor: Any = "kv.bucket_supervisor") -> Pid:
    """Start a registry linked to the caller; its buckets go under ``bucket_supervisor``."""
    return Registry.start_link({"bucket_supervisor": bucket_supervisor}, name=name)


def create(server: Any, name: str) -> Pid:
    """The bucket for ``name``, started if there is none. Synchronous and idempotent."""
    _check(name)
    return runtime.call(server, ("create", name))  # type: ignore[no-any-return]


def lookup(server: Any, name: str) -> Pid | None:
    """The live bucket for ``name``, or None."""
    _check(name)
    return runtime.call(server, ("lookup", name))  # type: ignore[no-any-return]


def sizes(server: Any) -> dict[str, int]:
    """How many entries the registry's maps hold: ``names`` (name -> bucket) and
    ``refs`` (monitor -> name). Both come back to 0 once every bucket is gone: a
    check for leaks."""
    return runtime.call(server, ("sizes",))  # type: ignore[no-any-return]


async def acreate(server: Any, name: str) -> Pid:
    """:func:`create` for coroutines (``runtime.acall``)."""
    _check(name)
    pid: Pid = await runtime.acall(server, ("create", name))
    return pid


async def alookup(server: Any, name: str) -> Pid | None:
    """:func:`lookup` for coroutines (``runtime.acall``)."""
    _check(name)
    pid: Pid | None = await runtime.acall(server, ("lookup", name))
    return pid


def _check(name: Any) -> None:
    if not isinstance(name, str):
        raise TypeError(f"a bucket name must be a str, got {name!r}")


class Registry(runtime.GenServer):
    """State: ``names`` (name -> (pid, monitor ref)) and ``refs`` (ref -> name)."""

    @classmethod
    def child_spec(cls, arg: Any = None) -> dict[str, Any]:
        arg = dict(arg or {})
        name = arg.pop("name", None)
        arg.setdefault("bucket_supervisor", "kv.bucket_supervisor")
        return specs.make(name or cls, cls.start_link, (arg,), {"name": name})

    def init(self, arg: dict[str, Any]) -> Any:
        self.bucket_supervisor = arg["bucket_supervisor"]
        self.names: dict[str, tuple[Pid, Any]] = {}
        self.refs: dict[Any, str] = {}
        return None

    def handle_call(self, request: Any, from_: Any, state: Any) -> Any:
        kind = request[0] if request.__class__ is tuple else None
        if kind == "lookup":
            return Reply(self._live(request[1]), state)
        if kind == "create":
            name = request[1]
            pid = self._live(name)
            if pid is None:
                pid = DynamicSupervisor.start_child(self.bucket_supervisor, bucket.child_spec())
                ref = runtime.monitor(pid)
                self.names[name] = (pid, ref)
                self.refs[ref] = name
            return Reply(pid, state)
        if kind == "sizes":
            return Reply({"names": len(self.names), "refs": len(self.refs)}, state)
        return super().handle_call(request, from_, state)

    def handle_info(self, msg: Any, state: Any) -> Any:
        if msg.__class__ is Down:
            name = self.refs.pop(msg.ref, None)
            if name is not None and self.names.get(name, (None, None))[1] == msg.ref:
                del self.names[name]
            return NoReply(state)
        return NoReply(state)  # as the guide's catch-all: stray messages never crash it

    def _live(self, name: str) -> Pid | None:
        entry = self.names.get(name)
        if entry is None:
            return None
        pid, ref = entry
        if runtime.is_alive(pid):
            return pid
        # Dead, and its Down not processed yet: forget it now.
        del self.names[name]
        self.refs.pop(ref, None)
        runtime.demonitor(ref, flush=True)
        return None
