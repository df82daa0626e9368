"""The application's supervision tree, as the guide ends it.

``kv.supervisor`` (one_for_all)
  1. ``kv.bucket_supervisor``: a DynamicSupervisor; every bucket is its child,
     forked by its zygote (``runtime.keep_warm(zygote=True)``), so that creating
     a bucket costs the same with thousands alive as with ten.
  2. ``kv.registry``: the registry, which monitors the buckets.

The bucket supervisor starts first because the registry needs it. The strategy
is one_for_all: if the registry dies, the buckets it knew are orphaned, and if
the bucket supervisor dies, the registry's names point to dead buckets; either
way the whole tree starts again, empty.
"""

from __future__ import annotations

import runtime
from runtime import DynamicSupervisor, Pid, Supervisor

from .registry import Registry

__all__ = ["start", "stop"]

SUPERVISOR = "kv.supervisor"
BUCKET_SUPERVISOR = "kv.bucket_supervisor"
REGISTRY = "kv.registry"


def start() -> Pid:
    """Start the tree (names above). Blocks until it runs. Raises
    ``AlreadyRegisteredError`` if it is running already."""
    children = [
        DynamicSupervisor.child_spec(name=BUCKET_SUPERVISOR, zygote=True),
        Registry.child_spec({"name": REGISTRY, "bucket_supervisor": BUCKET_SUPERVISOR}),
    ]
    return Supervisor.start_link(children, strategy="one_for_all", name=SUPERVISOR)


def stop(timeout: float | None = 30.0) -> None:
    """Stop the tree: buckets, registry and supervisors. Blocks until all are gone.
    Raises NoProcError if it is not running."""
    runtime.stop(SUPERVISOR, "shutdown", timeout)
