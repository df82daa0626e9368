"""Internal: checks of the arguments users give the public functions."""

from __future__ import annotations

import math
from typing import Any

FOREVER = 1e8  # seconds (three years): a longer timeout waits as long as None does


def timeout(value: Any, name: str = "timeout", *, none: bool = True) -> float | None:
    """``value`` as a timeout in seconds: a non-negative number (None for "no limit" if
    ``none``). Beyond ``FOREVER`` (infinity too) it means no limit: None if ``none``,
    else ``FOREVER``.

    Raises:
        TypeError: it is not a number (a bool is not one here).
        ValueError: it is negative or NaN.
    """
    if value.__class__ is float and 0.0 <= value <= FOREVER:  # (common; NaN fails)
        return value
    if value is None and none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        expected = "a number of seconds or None" if none else "a number of seconds"
        raise TypeError(f"{name} must be {expected}, got {value!r}")
    if math.isnan(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative number of seconds, got {value!r}")
    if value > FOREVER:  # (inf too: what the OS calls take has limits)
        return None if none else FOREVER
    return float(value)


def name(value: Any) -> str:
    """``value`` as a registered name.

    Raises:
        TypeError: it is not a str.
        ValueError: it is empty.
    """
    if not isinstance(value, str):
        raise TypeError(f"a registered name must be a str, got {value!r}")
    if not value:
        raise ValueError("a registered name must not be empty")
    return value
