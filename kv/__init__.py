"""The key-value store of the "Mix and OTP" guide, on the runtime.

- ``kv.bucket``: a bucket (an Agent, a real OS process).
- ``kv.registry``: names to buckets; forgets a name when its bucket exits.
- ``kv.start()`` / ``kv.stop()``: the supervision tree (``kv.supervisor``).
- ``kv.command``: the TCP protocol's ``parse`` and ``run``.
- ``kv.server`` and ``kv.serve(host, port)``: the TCP server, in a tree of its own.
- ``python -m kv demo``: a narrated crash-recovery demo; ``python -m kv serve``: the server;
  ``python -m kv chaos``: the server under load while faults are injected, checked.
"""

from . import bucket, command, registry, server
from .server import serve
from .supervisor import start, stop

__all__ = ["bucket", "command", "registry", "serve", "server", "start", "stop"]
