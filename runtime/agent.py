"""Agent: a process that holds a state, changed only by functions sent to it.

An Agent is a GenServer (it has no loop of its own). The functions given to
``get``, ``update``, ``get_and_update`` and ``cast`` run inside the agent's
process, one at a time; lambdas and closures work (they travel cloudpickled).
Work done inside the function blocks every other request to the agent, so keep
it short: compute in the caller, store in the agent::

    counter = runtime.Agent.start_link(lambda: 0)
    runtime.Agent.update(counter, lambda n: n + 1)
    runtime.Agent.get(counter, lambda n: n)          # -> 1

A function that raises crashes the agent (its caller gets ``ExitError``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._config import DEFAULT_TIMEOUT
from .gen_server import GenServer, NoReply, Reply, call, cast, start_server, stop
from .pid import Pid

__all__ = ["Agent"]


class Agent(GenServer):
    """A GenServer whose state is read and changed by functions. See the module doc."""

    def init(self, fn: Callable[[], Any]) -> Any:
        return fn()

    def handle_call(self, request: Any, from_: Any, state: Any) -> Any:
        kind = request[0] if request.__class__ is tuple else None
        if kind == "$agent_get":
            return Reply(request[1](state), state)
        if kind == "$agent_update":
            return Reply("ok", request[1](state))
        if kind == "$agent_get_and_update":
            result = request[1](state)
            if not (isinstance(result, tuple) and len(result) == 2):
                raise TypeError(f"get_and_update's function must return (reply, new_state), "
                                f"got {result!r}")
            return Reply(result[0], result[1])
        return super().handle_call(request, from_, state)

    def handle_cast(self, request: Any, state: Any) -> Any:
        if request.__class__ is tuple and request[0] == "$agent_cast":
            return NoReply(request[1](state))
        return super().handle_cast(request, state)

    # ------------------------------------------------------------------ client

    @classmethod
    def start_link(cls, fn: Callable[[], Any] = dict, name: str | None = None,
                   timeout: float = 5.0) -> Pid:
        """Start an agent linked to the caller; ``fn()`` runs in the new process and
        returns the initial state. Blocks until it has. Raises ``StartError`` if
        ``fn`` raised, ``AlreadyRegisteredError`` if ``name`` is taken."""
        if not callable(fn):
            raise TypeError(f"Agent.start_link needs a function for the initial state, got {fn!r}")
        return start_server(cls, fn, name, timeout, link=True)

    @classmethod
    def start(cls, fn: Callable[[], Any] = dict, name: str | None = None,
              timeout: float = 5.0) -> Pid:
        """Like :meth:`start_link`, without the link."""
        if not callable(fn):
            raise TypeError(f"Agent.start needs a function for the initial state, got {fn!r}")
        return start_server(cls, fn, name, timeout, link=False)

    @classmethod
    def child_spec(cls, fn: Callable[[], Any] = dict) -> dict[str, Any]:
        """GenServer's spec, with ``fn`` (an empty dict by default) for the initial state."""
        return super().child_spec(fn)

    @staticmethod
    def get(agent: Any, fn: Callable[[Any], Any],
            timeout: float | None = DEFAULT_TIMEOUT) -> Any:
        """Return ``fn(state)``, computed in the agent. Blocks up to ``timeout`` seconds.
        Raises as ``call`` does (NoProcError for a dead agent)."""
        return call(agent, ("$agent_get", fn), timeout)

    @staticmethod
    def update(agent: Any, fn: Callable[[Any], Any],
               timeout: float | None = DEFAULT_TIMEOUT) -> None:
        """Replace the state with ``fn(state)``; returns once done. Raises as ``call``."""
        call(agent, ("$agent_update", fn), timeout)

    @staticmethod
    def get_and_update(agent: Any, fn: Callable[[Any], tuple[Any, Any]],
                       timeout: float | None = DEFAULT_TIMEOUT) -> Any:
        """``fn(state)`` returns ``(reply, new_state)``: store the new state, return the
        reply, atomically. Raises as ``call``."""
        return call(agent, ("$agent_get_and_update", fn), timeout)

    @staticmethod
    def cast(agent: Any, fn: Callable[[Any], Any]) -> None:
        """Replace the state with ``fn(state)`` without waiting; never raises for a dead
        agent (the update is then lost)."""
        cast(agent, ("$agent_cast", fn))

    @staticmethod
    def stop(agent: Any, reason: Any = "normal", timeout: float | None = 5.0) -> None:
        """Stop the agent; see ``runtime.stop``."""
        stop(agent, reason, timeout)
