"""Internal: the fork that starts a runtime process's child.

``os.fork()`` runs the interpreter's at-fork machinery around the C library's
``fork()``: in the parent the ``before`` and ``after_in_parent`` hooks, in the
child the re-initialisation of the GIL, of the import lock and of the thread
states, and then the ``after_in_child`` hooks (``threading`` rebuilds its
bookkeeping, ``logging`` its locks, ``random`` reseeds). Nearly all of it is
there for processes with more than one thread, and all of it writes to pages
shared with the other process, each write a copy-on-write fault: measured here,
about 200 faults in the child, ~0.8 ms of the ~1.8 ms an ``os.fork()`` handshake
takes.

A runtime process is single-threaded, so when nothing needs that machinery it
calls ``fork()`` directly, holding the GIL across the call (``ctypes.PyDLL``): the
child is then the same interpreter in the same state, on the same (only) thread.
What of the machinery a single thread still needs is done here:

- ``random`` is reseeded in the child, as its own hook does (siblings must not
  draw the same numbers), and ``threading`` learns the child's native thread id;
- the ``os.fork`` audit event is raised;
- signals are blocked across the fork, after the parent ran the handlers of
  those it had caught, so that no handler runs in both processes (``os.fork``
  clears them in the child). The parent unblocks once the child is recorded
  (``parent_done``): a handler that raises then leaves no child untracked. The
  child unblocks once its own handlers are in place (``restore_sigmask``).

The direct fork is used only when all of this holds, else ``os.fork()`` is:

- CPython 3.10 to 3.12, whose at-fork code this was checked against, without a
  perf trampoline (3.12's ``sys.activate_stack_trampoline`` has a child hook);
- one OS thread in the process (``/proc/self/task``: a thread the interpreter
  did not start counts too);
- every at-fork hook registered in the interpreter (read from its own hook lists,
  so hooks registered before the runtime started count, however registered) is
  one of the standard library's thread-only hooks or one done here.
"""

from __future__ import annotations

import _random
import _signal
import ctypes
import gc
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
_stat = os.stat
_audit = sys.audit
_trampoline_active: Callable[[], bool] | None = getattr(sys, "is_stack_trampoline_active", None)

_libc_fork: Callable[[], int] | None = None
if sys.implementation.name == "cpython" and (3, 10) <= sys.version_info[:2] <= (3, 12):
    _c_fork = ctypes.PyDLL(None, use_errno=True).fork  # PyDLL: the GIL stays held
    _c_fork.restype = ctypes.c_int
    _c_fork.argtypes = ()
    _libc_fork = _c_fork


def _mark_before() -> None:
    pass


def _mark_parent() -> None:
    pass


def _mark_child() -> None:
    pass


# Markers, to find the interpreter's three hook lists (see _find_hook_lists).
os.register_at_fork(before=_mark_before, after_in_parent=_mark_parent,
                    after_in_child=_mark_child)

_hook_lists: tuple[list[Any], ...] | None = None
_hooks_seen = -1  # how many hooks there were when _hooks_known was worked out
_hooks_known = False
child_sigmask: Any = None  # in a child of the direct fork: the mask to restore
_parent_mask: Any = None  # in the parent, between fork and parent_done


def _find_hook_lists() -> tuple[list[Any], ...] | None:
    """The interpreter's before, after_in_parent and after_in_child hook lists: the
    one list that holds each marker (the interpreter keeps them as plain lists)."""
    found = []
    for marker in (_mark_before, _mark_parent, _mark_child):
        lists = [r for r in gc.get_referrers(marker)
                 if type(r) is list and any(h is marker for h in r)]
        if len(lists) != 1:
            return None
        found.append(lists[0])
    return tuple(found)


def prepare() -> None:
    """Find the hook lists, once, first thing in the node's root (its children inherit
    them). Without it, every fork is an ``os.fork()``."""
    global _hook_lists
    if _libc_fork is not None and _hook_lists is None:
        _hook_lists = _find_hook_lists()


def _thread_only_hooks() -> set[Any]:
    """The registered hooks the direct fork may skip: the standard library's, which
    matter only with other threads, random's reseed (done here) and the runtime's."""
    known: set[Any] = {_mark_before, _mark_parent, _mark_child, _node._after_fork_in_child}
    modules = sys.modules
    threading = modules.get("threading")
    if threading is not None:
        known.add(getattr(threading, "_after_fork", None))
    logging = modules.get("logging")
    if logging is not None:
        for name in ("_acquireLock", "_releaseLock", "_after_at_fork_child_reinit_locks"):
            known.add(getattr(logging, name, None))
    rnd = modules.get("random")
    if rnd is not None:
        known.add(rnd._inst.seed)
    futures = modules.get("concurrent.futures.thread")
    lock = getattr(futures, "_global_shutdown_lock", None)
    if lock is not None:
        known.update((lock.acquire, lock.release, lock._at_fork_reinit))
    known.discard(None)
    return known


def _direct() -> bool:
    global _hooks_seen, _hooks_known
    lists = _hook_lists
    if lists is None:
        return False
    if _stat("/proc/self/task").st_nlink != 3:  # 2 + one directory per thread
        return False
    if _trampoline_active is not None and _trampoline_active():
        return False
    before, parent, child = lists
    seen = len(before) + len(parent) + len(child)  # hooks are only ever added
    if seen != _hooks_seen:
        known = _thread_only_hooks()
        _hooks_known = all(h in known for hooks in lists for h in hooks)
        _hooks_seen = seen
    return _hooks_known


def fork() -> int:
    """Fork this (runtime) process: 0 in the child, the child's pid in the parent. In
    the child, the parent's node is handed over (``_node.take_forked_from``). The
    parent must call ``parent_done`` once it has recorded the child."""
    global child_sigmask, _parent_mask
    libc_fork = _libc_fork
    if libc_fork is None or not _direct():
        _node.forking = True
        try:
            return os.fork()
        finally:
            _node.forking = False
    _audit("os.fork")
    old = _sigmask(_SIG_BLOCK, ())  # handlers of signals caught so far run here
    try:
        _sigmask(_SIG_BLOCK, _ALL_SIGNALS)  # and those of signals caught meanwhile
    except BaseException:
        _sigmask(_SIG_SETMASK, old)
        raise
    pid = libc_fork()
    if pid == 0:
        child_sigmask = old
        _node.forked_by_runtime()
        modules = sys.modules
        rnd = modules.get("random")
        if rnd is not None:  # what random's own hook does, minus the Python layers
            inst = rnd._inst
            _seed(inst, None)
            inst.gauss_next = None
        threading = modules.get("threading")
        if threading is not None:
            threading.main_thread()._native_id = os.getpid()
        return 0
    if pid < 0:
        err = ctypes.get_errno()
        _sigmask(_SIG_SETMASK, old)
        raise OSError(err, os.strerror(err))
    _parent_mask = old
    return pid


def parent_done() -> None:
    """In the parent, once the child is recorded: unblock signals. The handlers of
    signals caught meanwhile run now (one that raises, raises here)."""
    global _parent_mask
    mask, _parent_mask = _parent_mask, None
    if mask is not None:
        _sigmask(_SIG_SETMASK, mask)


def restore_sigmask() -> None:
    """In the child, once its signal handlers are in place: unblock what the parent had
    unblocked (signals sent meanwhile are delivered now)."""
    global child_sigmask
    mask, child_sigmask = child_sigmask, None
    if mask is not None:
        _sigmask(_SIG_SETMASK, mask)
