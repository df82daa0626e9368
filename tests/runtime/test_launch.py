"""How runtime processes fork their children (runtime._launch): with os.fork, so a child
is what any fork makes (random reseeded, at-fork hooks run, the audit event raised),
and no signal is handled in the child before its own handlers are in place."""

from __future__ import annotations

import os
import posix
import random
import signal
import sys
import threading
import time

import pytest

import runtime
from runtime.testing import assert_receive

pytestmark = pytest.mark.skipif(
    os.environ.get("RUNTIME_START_METHOD") == "spawn", reason="about the fork start method"
)

MARK = threading.Event()  # set by hooks in children
LOCK = threading.Lock()


def _in_runtime(fn, *args, timeout=15):
    """Run ``fn(*args)`` in a runtime process (a child of the root); its return value."""
    me = runtime.self()

    def body():
        runtime.send(me, ("result", fn(*args)))

    _, ref = runtime.spawn_monitor(body)
    msg = assert_receive(lambda m: isinstance(m, tuple) and m[0] == "result", timeout=timeout)
    assert_receive(lambda m: isinstance(m, runtime.Down) and m.ref == ref, timeout=timeout)
    return msg[1]


def _children(n, probe):
    """From a runtime process: start ``n`` children; what ``probe()`` returns in each."""
    me = runtime.self()

    def child():
        runtime.send(me, ("child", probe()))

    refs = [runtime.spawn_monitor(child)[1] for _ in range(n)]
    out = [runtime.receive(timeout=10, match=lambda m: isinstance(m, tuple)
                           and m[0] == "child")[1] for _ in range(n)]
    for ref in refs:  # our children would be stopped when we exit
        runtime.receive(timeout=10, match=lambda m, ref=ref: isinstance(m, runtime.Down)
                        and m.ref == ref)
    return out


def _fresh_fork_state():
    return {
        "blocked": sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])),
        "native_id": threading.current_thread().native_id,
        "os_pid": os.getpid(),
        "threads": len(threading.enumerate()),
    }


def test_siblings_draw_different_random_numbers():
    def draws():
        random.gauss(0.0, 1.0)  # leaves a second gauss value cached in the parent
        kids = _children(4, lambda: (random.random(), random.gauss(0.0, 1.0)))
        return kids + [(random.random(), random.gauss(0.0, 1.0))]

    got = _in_runtime(draws)
    assert len({r for r, _ in got}) == len(got)
    assert len({g for _, g in got}) == len(got)


def test_child_gets_the_signal_mask_of_a_fresh_fork():
    for r in _in_runtime(_children, 2, _fresh_fork_state):
        assert r["blocked"] == []  # nothing left blocked by the fork
        assert r["threads"] == 1


def test_the_os_fork_audit_event_is_raised():
    def forks_seen():
        seen = []
        sys.addaudithook(lambda event, args: seen.append(event) if event == "os.fork" else None)
        _children(1, lambda: 0)
        return seen

    assert _in_runtime(forks_seen) == ["os.fork"]


def _lock_taken():
    return LOCK.acquire(timeout=5)


def _hooked(register):
    if register == "os":
        os.register_at_fork(after_in_child=MARK.set)
    elif register == "posix":  # not through os: the interpreter's own lists tell
        posix.register_at_fork(after_in_child=MARK.set)
    elif register == "event":  # a method defined in threading, not a thread hook
        os.register_at_fork(after_in_child=threading.Event().set)
        os.register_at_fork(after_in_child=MARK.set)
    else:  # a lock the forking thread holds, made usable again in the child
        os.register_at_fork(after_in_child=LOCK._at_fork_reinit)
        with LOCK:
            return _children(1, _lock_taken)
    return _children(2, MARK.is_set)


@pytest.mark.parametrize("register", ["os", "posix", "event", "lock"])
def test_an_at_fork_hook_of_the_users_runs_in_the_children(register):
    assert all(_in_runtime(_hooked, register))


def _with_thread():
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        return _children(2, _fresh_fork_state)
    finally:
        stop.set()
        thread.join()


def test_a_process_with_threads_forks_like_any_other():
    for r in _in_runtime(_with_thread):
        assert r["threads"] == 1  # threading's own after-fork bookkeeping ran
        assert r["blocked"] == []


def test_a_handler_that_raises_at_spawn_leaves_signals_and_children_as_they_were():
    class Interrupted(Exception):
        pass

    def interrupted():
        def handler(signo, frame):
            raise Interrupted

        signal.signal(signal.SIGUSR1, handler)
        sys.addaudithook(lambda event, args: os.kill(os.getpid(), signal.SIGUSR1)
                         if event == "os.fork" else None)
        before = len(runtime._embed.current().watches.children())
        try:
            runtime.spawn(time.sleep, 0)
        except Interrupted:
            pass
        return (sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])),
                len(runtime._embed.current().watches.children()) - before)

    blocked, new_children = _in_runtime(interrupted)
    assert blocked == []
    assert new_children in (0, 1)  # forked and recorded, or never forked
