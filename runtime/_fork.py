"""Internal: the fork that starts a runtime process's child.

``os.fork()`` runs the interpreter's at-fork machinery around the C library's
``fork()``: in the parent the ``before`` and ``after_in_parent`` hooks, in the
child the re-initialisation of the GIL, of the import lock and of the thread
states, and then the ``after_in_child`` hooks (``threading`` rebuilds its
bookkeeping, ``logging`` its locks, ``random`` reseeds). All of it is there for
processes with more than one thread, and all of it writes to pages shared with the
other process, each write a copy-on-write fault: measured here, it is about 200
faults in the child, ~0.8 ms of the ~1.8 ms an ``os.fork()`` handshake takes.

A runtime process is single-threaded, so when nothing needs that machinery it
calls ``fork()`` directly, holding the GIL across the call (``ctypes.PyDLL``): the
child is then the same interpreter in the same state, on the same (only) thread.
It does, in the child, the two things of that machinery a single thread still
needs: ``random`` is reseeded (siblings must not draw the same numbers) and
``threading`` learns its new native thread id. Signals are blocked across the
fork, so that a signal caught by the parent just before is not handled again by
the child (``os.fork`` clears those in the child); the child unblocks them once
its own handlers are in place.

The direct fork is used only when all of this holds, else ``os.fork()`` is:

- CPython 3.10 to 3.12 (the versions whose at-fork code this was checked
  against);
- no thread but the main one (``_thread._count() == 0``);
- no at-fork hook registered in this runtime process but the standard library's
  thread-only ones (the runtime watches ``os.register_at_fork`` in its processes:
  a library that registers its own hook gets ``os.fork()``, and its hook runs).
"""

from __future__ import annotations

import _random
import _signal
import _thread
import ctypes
import os
import sys
from collections.abc import Callable
from typing import Any

from . import _node

_ALL_SIGNALS = _signal.valid_signals()
_SIG_BLOCK = _signal.SIG_BLOCK
_SIG_SETMASK = _signal.SIG_SETMASK
_sigmask = _signal.pthread_sigmask
_seed = _random.Random.seed

_direct_ok = sys.implementation.name == "cpython" and (3, 10) <= sys.version_info[:2] <= (3, 12)
_libc_fork: Callable[[], int] | None = None
if _direct_ok:
    _c_fork = ctypes.PyDLL(None, use_errno=True).fork  # PyDLL: the GIL stays held
    _c_fork.restype = ctypes.c_int
    _c_fork.argtypes = ()
    _libc_fork = _c_fork

# Hooks of these are about other threads (locks, thread bookkeeping) or are done
# by the direct fork itself (random's reseed).
_THREAD_ONLY_HOOK_MODULES = frozenset({"threading", "logging", "random", __name__, _node.__name__})
_LOCK_METHODS = frozenset({"acquire", "release", "_at_fork_reinit"})
_LOCK_TYPES = (type(_thread.allocate_lock()), type(_thread.RLock()))

foreign_hooks = False  # an at-fork hook the direct fork would skip is registered
child_sigmask: Any = None  # in a child of the direct fork: the mask to restore


def _thread_only(hook: Any) -> bool:
    owner = getattr(hook, "__self__", None)
    if isinstance(owner, _LOCK_TYPES):
        return getattr(hook, "__name__", None) in _LOCK_METHODS
    return getattr(hook, "__module__", None) in _THREAD_ONLY_HOOK_MODULES


def watch_hooks() -> None:
    """Make ``os.register_at_fork`` note hooks the direct fork would skip. Called once,
    first thing in the node's root; its children inherit it."""
    real = os.register_at_fork
    if getattr(real, "_runtime_watch", False):
        return

    def register_at_fork(**hooks: Any) -> None:
        global foreign_hooks
        real(**hooks)
        if not all(_thread_only(h) for h in hooks.values()):
            foreign_hooks = True

    register_at_fork.__doc__ = real.__doc__
    register_at_fork._runtime_watch = True  # type: ignore[attr-defined]
    os.register_at_fork = register_at_fork


def fork() -> int:
    """Fork this (runtime) process: 0 in the child, the child's pid in the parent. In
    the child, the parent's node is handed over (``_node.take_forked_from``)."""
    global child_sigmask
    if _libc_fork is None or foreign_hooks or _thread._count():
        _node.forking = True
        try:
            return os.fork()
        finally:
            _node.forking = False
    mask = _sigmask(_SIG_BLOCK, _ALL_SIGNALS)
    pid = _libc_fork()
    if pid == 0:
        child_sigmask = mask
        _node.forked_by_runtime()
        modules = sys.modules
        rnd = modules.get("random")
        if rnd is not None:  # what random's own hook does, minus the Python layers
            _seed(rnd._inst, None)
        threading = modules.get("threading")
        if threading is not None:
            threading.main_thread()._native_id = os.getpid()
        return 0
    _sigmask(_SIG_SETMASK, mask)
    if pid < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return pid


def restore_sigmask() -> None:
    """In the child, once its signal handlers are in place: unblock what the parent had
    unblocked (signals sent meanwhile are delivered now)."""
    global child_sigmask
    mask, child_sigmask = child_sigmask, None
    if mask is not None:
        _sigmask(_SIG_SETMASK, mask)
