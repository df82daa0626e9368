"""What our side runs in runtime processes spawned from the embedding process: light
on purpose (only ``runtime``), as the README advises, since such a process
unpickles its target and imports the target's module itself."""

from __future__ import annotations

from typing import Any

import runtime

TIMEOUT = 30.0


def ready(parent: runtime.Pid) -> None:
    """Say ready, then wait (as a new server would) until told to stop."""
    runtime.send(parent, "ready")
    runtime.receive(timeout=3600, match=lambda m: m == "stop")


def hello(parent: runtime.Pid, n: int) -> None:
    """Say hello (with ``n``), and exit: a one-shot task."""
    runtime.send(parent, ("hello", n))


class Echo(runtime.GenServer):
    """Answers a call with its request; takes casts and does nothing."""

    def handle_call(self, request: Any, from_: Any, state: Any) -> Any:
        return runtime.Reply(request, state)

    def handle_cast(self, request: Any, state: Any) -> Any:
        return runtime.NoReply(state)


class Probe(runtime.GenServer):
    """A supervised child that says when it is up, and answers calls."""

    def init(self, parent: Any) -> Any:
        runtime.send(parent, ("up", runtime.self()))
        return parent

    def handle_call(self, request: Any, from_: Any, state: Any) -> Any:
        return runtime.Reply(request, state)


def get_k(state: dict[str, Any]) -> Any:
    return state.get("k")


def put_k(value: Any, state: dict[str, Any]) -> dict[str, Any]:
    state["k"] = value
    return state
