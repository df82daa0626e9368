"""Internal: every undocumented part of the standard library the runtime relies on.

The runtime starts its processes through ``multiprocessing``, and a few of the
hooks it needs for that are not part of the documented API. They are all here,
each behind a small function or class, so that a new CPython is checked in one
place (``tests/runtime/test_compat.py`` exercises every name below on each
supported version, 3.10 to 3.13):

- ``popen_fork.Popen._launch`` and ``popen_spawn_posix.Popen._launch``: the hook
  where a ``Popen`` starts its process (``multiprocessing.popen_forkserver``
  overrides it too). :class:`ForkPopen` and :class:`SpawnPopen` turn it into a
  public ``launch`` method.
- ``popen_spawn_posix.Popen._fds``: the descriptors a spawned child inherits.
- ``multiprocessing.process._current_process``: what
  ``multiprocessing.current_process()`` returns, set in a new runtime process.
- ``multiprocessing.process.ORIGINAL_DIR``, ``spawn.get_command_line``,
  ``spawn.get_executable`` and ``util.spawnv_passfds``: how a spawned child is
  started (public names in undocumented modules).
- ``_signal``: ``signal.signal`` and ``signal.pthread_sigmask`` without their
  conversions to and from ``enum`` members, which touch enough objects to cost a
  new forked child ~0.2 ms of copy-on-write faults (every object Python touches
  gets its reference count written).
"""

from __future__ import annotations

import _signal
import os
from collections.abc import Callable
from multiprocessing import popen_fork, popen_spawn_posix, process, spawn, util
from typing import Any

__all__ = [
    "ForkPopen",
    "SpawnPopen",
    "original_dir",
    "ALL_SIGNALS",
    "set_current_process",
    "set_handler",
    "sigmask",
    "spawn_command",
    "spawn_with_fds",
]

ALL_SIGNALS: frozenset[int] = frozenset(_signal.valid_signals())


def set_handler(signo: int, handler: Callable[[int, Any], Any] | int) -> None:
    """``signal.signal(signo, handler)``, for a handler or SIG_DFL / SIG_IGN."""
    _signal.signal(signo, handler)


def sigmask(how: int, signals: frozenset[int] | set[int] | tuple[int, ...]) -> set[int]:
    """``signal.pthread_sigmask(how, signals)``: the previous mask, as signal numbers."""
    old: set[int] = _signal.pthread_sigmask(how, signals)
    return old


class ForkPopen(popen_fork.Popen):
    """multiprocessing's fork ``Popen`` (``sentinel``, ``poll``, ``kill``, ``close``)
    whose start is the subclass's :meth:`launch`."""

    def _launch(self, process_obj: Any) -> None:
        self.launch(process_obj)

    def launch(self, process_obj: Any) -> None:
        """Start the process: set ``self.pid`` and ``self.sentinel``."""
        raise NotImplementedError


class SpawnPopen(popen_spawn_posix.Popen):
    """multiprocessing's spawn ``Popen`` whose start is the subclass's :meth:`launch`."""

    def _launch(self, process_obj: Any) -> None:
        self.launch(process_obj)

    def launch(self, process_obj: Any) -> None:
        """Start the process: set ``self.pid`` and ``self.sentinel``."""
        raise NotImplementedError

    @property
    def inherited_fds(self) -> list[int]:
        """The descriptors the child will inherit (``duplicate_for_child`` adds to it)."""
        fds: list[int] = self._fds  # type: ignore[attr-defined]
        return fds


def set_current_process(obj: Any) -> None:
    """Make ``obj`` what ``multiprocessing.current_process()`` returns here."""
    process._current_process = obj  # type: ignore[attr-defined]



def original_dir() -> str:
    """The working directory the program started in (a spawned child's ``sys.path``
    uses it in place of ``""``)."""
    return str(process.ORIGINAL_DIR)  # type: ignore[attr-defined]


def spawn_command(pipe_handle: int) -> tuple[Any, list[Any]]:
    """The executable and arguments of a spawned child that reads its process object
    from ``pipe_handle``; no resource tracker is passed (a child starts its own)."""
    return spawn.get_executable(), spawn.get_command_line(tracker_fd=None,
                                                          pipe_handle=pipe_handle)


def spawn_with_fds(executable: Any, args: list[Any], fds: list[int]) -> int:
    """Start ``executable`` with ``args`` (str or bytes), keeping only ``fds`` open;
    its pid."""
    pid: int = util.spawnv_passfds(os.fsencode(executable), args, fds)
    return pid
