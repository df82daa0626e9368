"""System messages: the records the runtime puts in a mailbox on its own.

- :class:`Down` arrives once for each ``monitor`` when the monitored process exits
  (OTP's ``{'DOWN', Ref, process, Pid, Reason}``).
- :class:`Exit` arrives for a linked process's exit when the receiver traps exits
  (OTP's ``{'EXIT', Pid, Reason}``), or for ``exit(pid, reason)`` sent to such a process.

User messages can be any picklable value.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from .pid import Pid, Ref

__all__ = ["Down", "Exit"]


class Down(NamedTuple):
    """The monitored process ``pid`` exited with ``reason``; ``ref`` is the monitor's ref.

    A named tuple, like OTP's ``{'DOWN', Ref, process, Pid, Reason}`` is a tuple."""

    ref: Ref
    pid: Pid
    reason: Any


class Exit(NamedTuple):
    """The exit signal of ``pid`` with ``reason``, received as a message (trap_exit)."""

    pid: Pid
    reason: Any
