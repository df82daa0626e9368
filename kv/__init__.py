"""The key-value store of the "Mix and OTP" guide, on the runtime.

- ``kv.bucket``: a bucket (an Agent, a real OS process).
- ``kv.registry``: names to buckets; forgets a name when its bucket exits.
- ``kv.start()`` / ``kv.stop()``: the supervision tree (``kv.supervisor``).
- ``kv.command``: the TCP protocol's ``parse`` and ``run``.
- ``python -m kv demo``: a narrated crash-recovery demo.
"""

from . import bucket, command, registry
from .supervisor import start, stop

__all__ = ["bucket", "command", "registry", "start", "stop"]
