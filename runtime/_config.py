"""Internal: the node's options, in one place.

Each option has a default, an environment variable that overrides the default,
and ``runtime.configure(...)``, which overrides both. ``current()`` reads them
(the environment at that moment) and checks them; an option is read when it is
needed: the node's when it starts, ``call_timeout`` at each call.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any

START_METHODS = ("fork", "spawn")


@dataclass(frozen=True)
class Config:
    """The options in force (see ``runtime.configure`` for each)."""

    start_method: str = "fork"
    preload: tuple[str, ...] = ()
    node_dir: str | None = None
    call_timeout: float | None = 5.0
    warm_children: int = 2
    warm_imports: bool = True


ENV = {
    "start_method": "RUNTIME_START_METHOD",
    "preload": "RUNTIME_PRELOAD",
    "node_dir": "RUNTIME_NODE_DIR",
    "call_timeout": "RUNTIME_CALL_TIMEOUT",
    "warm_children": "RUNTIME_WARM_CHILDREN",
    "warm_imports": "RUNTIME_WARM_IMPORTS",
}

_set: dict[str, Any] = {}  # what configure() set


def _check(option: str, value: Any, source: str) -> Any:
    """``value`` of ``option``, checked; errors name ``source`` (an argument or a
    variable)."""
    if option == "start_method":
        if value not in START_METHODS:
            raise ValueError(f"{source} must be one of {START_METHODS}, got {value!r}")
        return value
    if option == "preload":
        if isinstance(value, str) or not all(isinstance(m, str) and m for m in value):
            raise TypeError(f"{source} must be a list of module names, got {value!r}")
        return tuple(value)
    if option == "node_dir":
        if not isinstance(value, str) or not os.path.isdir(value):
            raise ValueError(f"{source} must be an existing directory, got {value!r}")
        return value
    if option == "call_timeout":
        from ._checks import timeout

        return timeout(value, source)
    if option == "warm_children":
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{source} must be an int, got {value!r}")
        if not 0 <= value <= 64:
            raise ValueError(f"{source} must be between 0 and 64, got {value!r}")
        return value
    if option == "warm_imports":
        if not isinstance(value, bool):
            raise TypeError(f"{source} must be True or False, got {value!r}")
        return value
    raise TypeError(f"unknown option {option!r}")


def _from_env(option: str, text: str) -> Any:
    name = ENV[option]
    if option == "preload":
        return tuple(m.strip() for m in text.split(",") if m.strip())
    if option == "call_timeout":
        if text.strip().lower() in ("none", "inf", "infinity"):
            return None
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{name} must be a number of seconds or 'none', "
                             f"got {text!r}") from None
    if option == "warm_imports":
        flag = text.strip().lower()
        if flag in ("1", "true", "yes", "on"):
            return True
        if flag in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{name} must be 1 or 0 (true or false), got {text!r}")
    if option == "warm_children":
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{name} must be an int, got {text!r}") from None
    return text


def check_options(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` given to ``configure``, checked, without those left as None."""
    return {k: _check(k, v, k) for k, v in options.items() if v is not None}


def set_options(checked: dict[str, Any]) -> None:
    """Keep ``checked`` (from ``check_options``) for good."""
    _set.update(checked)


def current() -> Config:
    """The options in force: ``configure``'s, else the environment's, else defaults.

    Raises:
        ValueError, TypeError: an environment variable holds a bad value (named).
    """
    values: dict[str, Any] = {}
    for f in fields(Config):
        if f.name in _set:
            values[f.name] = _set[f.name]
            continue
        text = os.environ.get(ENV[f.name])
        if text:
            values[f.name] = _check(f.name, _from_env(f.name, text), ENV[f.name])
    return Config(**values)


def call_timeout() -> float | None:
    """The default timeout of a call (seconds; None: none): ``configure``'s, else the
    environment's (read at the first call that needs it: a call is on the hot path),
    else the default."""
    if "call_timeout" in _set:
        return _set["call_timeout"]  # type: ignore[no-any-return]
    global _env_call_timeout
    if _env_call_timeout is _UNREAD:
        text = os.environ.get(ENV["call_timeout"])
        _env_call_timeout = Config.call_timeout if not text else _check(
            "call_timeout", _from_env("call_timeout", text), ENV["call_timeout"])
    return _env_call_timeout  # type: ignore[no-any-return]


_UNREAD = object()
_env_call_timeout: Any = _UNREAD


class _Default:
    """The value of a ``timeout`` parameter that means "the configured call timeout"."""

    _instance: _Default | None = None

    def __new__(cls) -> _Default:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "DEFAULT_TIMEOUT"

    def __reduce__(self) -> str:
        return "DEFAULT_TIMEOUT"


DEFAULT_TIMEOUT: Any = _Default()  # (typed Any: it stands for a float | None)

