"""How runtime processes fork their children (runtime._fork): the direct fork keeps the
behaviour of os.fork that a single-threaded process can observe, and os.fork is used
whenever the direct one would skip something."""

from __future__ import annotations

import os
import random
import signal
import threading

import pytest

import runtime
from runtime import _fork
from runtime.testing import assert_receive

pytestmark = pytest.mark.skipif(
    os.environ.get("RUNTIME_START_METHOD") == "spawn", reason="about the fork start method"
)

HOOK_RAN = False


def _report(parent, tag):
    """Sent from a new process: what a fork should have given it."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    runtime.send(parent, (tag, {
        "random": random.random(),
        "blocked": sorted(int(s) for s in blocked),
        "native_id": threading.current_thread().native_id,
        "os_pid": os.getpid(),
        "threads": len(threading.enumerate()),
        "hook_ran": HOOK_RAN,
    }))


def _forker(parent, n, setup):
    """A runtime process that forks ``n`` children, after ``setup`` (a name)."""
    stop = threading.Event()
    if setup == "thread":
        thread = threading.Thread(target=stop.wait)
        thread.start()
    elif setup == "hook":
        os.register_at_fork(after_in_child=_note_hook)
    refs = [runtime.spawn_monitor(_report, parent, ("child", i))[1] for i in range(n)]
    for ref in refs:  # our children would be stopped when we exit
        runtime.receive(timeout=10, match=lambda m, ref=ref: isinstance(m, runtime.Down)
                        and m.ref == ref)
    runtime.send(parent, ("parent", random.random(), _fork.foreign_hooks))
    stop.set()
    if setup == "thread":
        thread.join()


def _note_hook():
    global HOOK_RAN
    HOOK_RAN = True


def _collect(n, setup="none"):
    me = runtime.self()
    pid, ref = runtime.spawn_monitor(_forker, me, n, setup)
    reports = [assert_receive(lambda m, i=i: m[0] == ("child", i), timeout=10)[1]
               for i in range(n)]
    parent = assert_receive(lambda m: m[0] == "parent", timeout=10)
    assert_receive(lambda m: isinstance(m, runtime.Down) and m.ref == ref, timeout=10)
    return reports, parent


def test_siblings_draw_different_random_numbers():
    reports, (_, parent_draw, _) = _collect(4)
    draws = [r["random"] for r in reports] + [parent_draw]
    assert len(set(draws)) == len(draws)


def test_child_gets_the_signal_mask_and_thread_id_of_a_fresh_fork():
    reports, _ = _collect(2)
    for r in reports:
        assert r["blocked"] == []  # nothing left blocked by the fork
        assert r["native_id"] == r["os_pid"]
        assert r["threads"] == 1


def test_a_registered_at_fork_hook_runs_in_the_children():
    reports, (_, _, foreign) = _collect(2, setup="hook")
    assert foreign
    assert all(r["hook_ran"] for r in reports)


def test_a_process_with_threads_forks_through_os_fork():
    reports, _ = _collect(2, setup="thread")
    for r in reports:
        assert r["threads"] == 1  # threading's own after-fork bookkeeping ran
        assert r["blocked"] == []


def test_standard_library_thread_hooks_do_not_count_as_foreign():
    assert _fork._thread_only(threading.Lock().acquire)
    assert _fork._thread_only(random.Random().seed)
    assert not _fork._thread_only(_note_hook)
    assert not _fork._thread_only(print)
