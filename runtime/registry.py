"""Registered names: node-wide names for processes (OTP's register/whereis/unregister).

A name is any non-empty string, known to every process of the node. A name
vanishes with its process: the process removes its own names when it exits,
and a name whose process is dead (killed before it could) is treated as free.
Wherever a function takes a process, a registered name works too.
"""

from __future__ import annotations

from typing import Any

from . import _checks, _embed
from .errors import NoProcError
from .pid import Pid

__all__ = ["register", "unregister", "whereis"]


def register(name: str, pid: Pid) -> None:
    """Register ``pid`` under ``name`` for the whole node. Never blocks.

    Raises:
        AlreadyRegisteredError: a live process already has the name.
        NoProcError: ``pid`` is not alive.
        TypeError, ValueError: ``name`` is not a str, or is empty.
    """
    _checks.name(name)
    node = _embed.current()
    if not isinstance(pid, Pid) or not node.is_alive(pid):
        raise NoProcError(pid, "cannot register a dead process")
    node.names.register(name, pid)


def whereis(name: str) -> Pid | None:
    """The live process registered under ``name``, or None. Never blocks."""
    return _embed.current().names.whereis(_checks.name(name))


def unregister(name: str) -> None:
    """Remove the name (whichever process holds it). Never blocks.

    Raises:
        NoProcError: no live process has the name.
    """
    _embed.current().names.unregister(_checks.name(name))


def resolve(dest: Any) -> Pid:
    """The Pid for a Pid or a registered name.

    Raises:
        NoProcError: no live process has the name.
        TypeError: ``dest`` is neither a Pid nor a str.
    """
    if isinstance(dest, Pid):
        return dest
    if isinstance(dest, str):
        pid = whereis(dest)
        if pid is None:
            raise NoProcError(dest, "no process is registered under this name")
        return pid
    raise TypeError(f"expected a Pid or a registered name, got {dest!r}")
