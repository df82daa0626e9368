"""A bucket: a key-value map held by an Agent, so a bucket is a real OS process.

A bucket is a :class:`Bucket`, an Agent whose state is a dict: ``Agent.get``,
``Agent.update`` and the rest work on it. It also takes a batch of plain
operations (:func:`run`), so that no function travels with a request: that is
how ``get``, ``put``, ``delete`` and the TCP server reach it.

All functions block until the bucket answered (5 s at most) and raise
``runtime.NoProcError`` if the bucket is dead (the guide's "bucket can crash at
any time": a put to a stopped bucket raises, it never hangs).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import runtime
from runtime import Agent, Pid, Reply
from runtime import child_spec as specs

__all__ = [
    "Bucket", "OPERATIONS", "adelete", "aget", "aput", "arun", "child_spec", "delete", "get",
    "put", "run", "start_link",
]

OPERATIONS = ("get", "put", "delete")


class Bucket(Agent):
    """An Agent over a dict that also answers ``("$kv", operations)`` calls (see :func:`run`)."""

    def handle_call(self, request: Any, from_: Any, state: Any) -> Any:
        if request.__class__ is tuple and request[0] == "$kv":
            return Reply(_apply(state, request[1]), state)
        return super().handle_call(request, from_, state)


def start_link() -> Pid:
    """Start an empty bucket linked to the caller. Blocks until it runs."""
    return Bucket.start_link(dict)


def run(bucket: Any, operations: Sequence[tuple[Any, ...]],
        timeout: float | None = runtime.DEFAULT_TIMEOUT) -> list[Any]:
    """Apply ``operations`` in order inside the bucket, as one request (no other
    request runs in between), and return their results in a list:

    - ``("get", key)``: the value, or None;
    - ``("put", key, value)``: None;
    - ``("delete", key)``: the value removed, or None.

    Blocks until the bucket answered, at most ``timeout`` seconds.

    Raises:
        ValueError: an operation is not one of those (checked before anything is sent).
        runtime.NoProcError: the bucket is dead.
        runtime.ExitError: the bucket died while it held the request.
        runtime.CallTimeout: no answer in time.
    """
    return runtime.call(bucket, _request(operations), timeout)  # type: ignore[no-any-return]


def _request(operations: Sequence[tuple[Any, ...]]) -> tuple[str, Sequence[tuple[Any, ...]]]:
    for operation in operations:
        if operation[0] not in OPERATIONS or len(operation) != (3 if operation[0] == "put" else 2):
            raise ValueError(f"not a bucket operation: {operation!r}")
    return ("$kv", operations)


async def arun(bucket: Any, operations: Sequence[tuple[Any, ...]],
               timeout: float | None = runtime.DEFAULT_TIMEOUT) -> list[Any]:
    """:func:`run` for coroutines (``runtime.acall``): the same operations, results
    and errors, awaited instead of blocking."""
    result: list[Any] = await runtime.acall(bucket, _request(operations), timeout)
    return result


async def aget(bucket: Any, key: Any) -> Any:
    """:func:`get`, awaited."""
    return (await arun(bucket, (("get", key),)))[0]


async def aput(bucket: Any, key: Any, value: Any) -> None:
    """:func:`put`, awaited."""
    await arun(bucket, (("put", key, value),))


async def adelete(bucket: Any, key: Any) -> Any:
    """:func:`delete`, awaited."""
    return (await arun(bucket, (("delete", key),)))[0]


def get(bucket: Any, key: Any) -> Any:
    """The value stored under ``key``, or None."""
    return run(bucket, (("get", key),))[0]


def put(bucket: Any, key: Any, value: Any) -> None:
    """Store ``value`` under ``key`` (replacing any old value)."""
    run(bucket, (("put", key, value),))


def delete(bucket: Any, key: Any) -> Any:
    """Remove ``key``; return the value it had, or None. Atomic."""
    return run(bucket, (("delete", key),))[0]


def child_spec(arg: Any = None) -> dict[str, Any]:
    """Buckets are temporary workers: never restarted (a restarted bucket would be
    unknown to the registry)."""
    return specs.make("kv.bucket", start_link, restart="temporary")


def _apply(state: dict[Any, Any], operations: Sequence[tuple[Any, ...]]) -> list[Any]:
    """Runs in the bucket's process."""
    results: list[Any] = []
    append = results.append
    for operation in operations:
        verb = operation[0]
        if verb == "get":
            append(state.get(operation[1]))
        elif verb == "put":
            state[operation[1]] = operation[2]
            append(None)
        elif verb == "delete":
            append(state.pop(operation[1], None))
        else:  # (run checks first: only a request made by hand gets here, and crashes us)
            raise ValueError(f"not a bucket operation: {operation!r}")
    return results
