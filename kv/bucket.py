"""A bucket: a key-value map held by an Agent, so a bucket is a real OS process.

All functions block until the bucket answered (5 s at most) and raise
``runtime.NoProcError`` if the bucket is dead (the guide's "bucket can crash at
any time": a put to a stopped bucket raises, it never hangs).
"""

from __future__ import annotations

from functools import partial
from operator import methodcaller
from typing import Any

from runtime import Agent, Pid
from runtime import child_spec as specs

__all__ = ["child_spec", "delete", "get", "put", "start_link"]


def start_link() -> Pid:
    """Start an empty bucket linked to the caller."""
    return Agent.start_link(dict)


def get(bucket: Any, key: Any) -> Any:
    """The value stored under ``key``, or None."""
    return Agent.get(bucket, methodcaller("get", key))


def put(bucket: Any, key: Any, value: Any) -> None:
    """Store ``value`` under ``key`` (replacing any old value)."""
    Agent.update(bucket, partial(_put, key, value))


def delete(bucket: Any, key: Any) -> Any:
    """Remove ``key``; return the value it had, or None. Atomic."""
    return Agent.get_and_update(bucket, partial(_pop, key))


def child_spec(arg: Any = None) -> dict[str, Any]:
    """Buckets are temporary workers: never restarted (a restarted bucket would be
    unknown to the registry)."""
    return specs.make("kv.bucket", start_link, restart="temporary")


# Module-level functions (not lambdas): they travel by reference, with plain pickle.

def _put(key: Any, value: Any, state: dict[Any, Any]) -> dict[Any, Any]:
    state[key] = value
    return state


def _pop(key: Any, state: dict[Any, Any]) -> tuple[Any, dict[Any, Any]]:
    return state.pop(key, None), state
