"""Internal: checks of the arguments users give the public functions."""

from __future__ import annotations

import math
from typing import Any


def timeout(value: Any, name: str = "timeout", *, none: bool = True) -> float | None:
    """``value`` as a timeout in seconds: a non-negative number (None for "no limit" if
    ``none``).

    Raises:
        TypeError: it is not a number (a bool is not one here).
        ValueError: it is negative or NaN.
    """
    if value.__class__ is float and value >= 0.0:  # (the common case; NaN fails >=)
        return value
    if value is None and none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        expected = "a number of seconds or None" if none else "a number of seconds"
        raise TypeError(f"{name} must be {expected}, got {value!r}")
    if math.isnan(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative number of seconds, got {value!r}")
    return float(value)
