"""What ``python -m kv chaos`` was asked to do, and where the server listens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TextIO

from .schedule import KINDS

__all__ = ["HOST", "Options"]

HOST = "127.0.0.1"  # the server listens here, the clients connect here: loopback only


@dataclass
class Options:
    """What ``python -m kv chaos`` was asked to do (see ``--help``)."""

    seconds: float = 30.0
    clients: int = 8
    seed: int | None = None
    port: int = 0
    buckets: int = 4  # per client
    keys: int = 8  # per bucket
    interval: float = 0.25  # mean seconds between faults
    max_gap: float = 2.0
    recovery_timeout: float = 15.0
    max_ops: int = 10_000_000  # per client
    kinds: tuple[str, ...] = KINDS
    log: str | None = None
    json: str | None = None
    progress: TextIO | None = None  # default: stderr
