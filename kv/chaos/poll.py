"""Waiting for what no message tells."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

__all__ = ["poll"]


def poll(predicate: Callable[[], Any], timeout: float) -> Any:
    """Poll ``predicate`` until it is true (its value) or ``timeout`` (None). Only for
    what no message tells: a name registered again, a port that answers."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(delay)
        delay = min(delay * 2, 0.02)
