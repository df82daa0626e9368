"""monitor and demonitor: Down with the true reason, exactly once per monitor."""

from __future__ import annotations

import os
import time

import pytest

import runtime
from runtime.testing import assert_receive, tagged, wait_down


def sleeper():
    time.sleep(60)  # sleep-ok: a process that blocks until killed


def crash_on(msg):
    runtime.receive(timeout=30, match=lambda m: m == msg)
    raise RuntimeError(f"asked to crash by {msg!r}")


def test_each_monitor_gets_its_own_down():
    pid = runtime.spawn(sleeper)
    refs = [runtime.monitor(pid) for _ in range(3)]
    assert len(set(refs)) == 3
    runtime.exit(pid, "kill")
    downs = [wait_down(ref) for ref in refs]
    assert {d.reason for d in downs} == {"killed"}


def test_down_carries_the_crash_of_the_monitored_process():
    pid = runtime.spawn(crash_on, "boom")
    ref = runtime.monitor(pid)
    runtime.send(pid, "boom")
    down = wait_down(ref)
    assert down.pid == pid
    assert isinstance(down.reason, runtime.Crash)
    assert down.reason.exc_type == "RuntimeError"
    assert "asked to crash by 'boom'" in down.reason.message


def test_demonitor_stops_the_down():
    pid = runtime.spawn(sleeper)
    ref = runtime.monitor(pid)
    keep = runtime.monitor(pid)
    assert runtime.demonitor(ref) is True
    runtime.exit(pid, "kill")
    wait_down(keep)
    with pytest.raises(TimeoutError):
        runtime.receive(timeout=0.1, match=lambda m: isinstance(m, runtime.Down) and m.ref == ref)


def test_demonitor_flush_removes_a_down_already_queued():
    pid = runtime.spawn(sleeper)
    ref = runtime.monitor(pid)
    witness = runtime.monitor(pid)
    runtime.exit(pid, "kill")
    wait_down(witness)  # by now the Down of ref is queued too
    assert runtime.demonitor(ref, flush=True) is False
    with pytest.raises(TimeoutError):
        runtime.receive(timeout=0, match=lambda m: isinstance(m, runtime.Down) and m.ref == ref)


def test_monitor_by_registered_name():
    pid = runtime.spawn(sleeper)
    runtime.register("monitored-by-name", pid)
    ref = runtime.monitor("monitored-by-name")
    runtime.exit(pid, "kill")
    assert wait_down(ref).pid == pid


def test_monitor_of_an_unknown_name_is_noproc():
    ref = runtime.monitor("no-such-name-anywhere")
    down = assert_receive(lambda m: isinstance(m, runtime.Down) and m.ref == ref, timeout=0.5)
    assert down.reason == "noproc"


def test_a_process_monitors_another_that_is_not_its_child():
    me = runtime.self()

    def watcher(parent, target):
        ref = runtime.monitor(target)
        runtime.send(parent, "watching")
        down = runtime.receive(timeout=30, match=lambda m: isinstance(m, runtime.Down))
        runtime.send(parent, ("seen", down.ref == ref, down.pid, down.reason))

    target = runtime.spawn(sleeper)
    runtime.spawn(watcher, me, target)
    assert_receive("watching")
    runtime.exit(target, "kill")
    assert assert_receive(tagged("seen")) == ("seen", True, target, "killed")


def test_a_parent_sees_its_childs_true_reason():
    me = runtime.self()

    def parent(reporter):
        child = runtime.spawn(crash_on, "go")
        ref = runtime.monitor(child)
        runtime.send(child, "go")
        down = runtime.receive(timeout=30, match=lambda m: isinstance(m, runtime.Down))
        runtime.send(reporter, ("child down", down.ref == ref, down.reason))

    runtime.spawn(parent, me)
    _, same, reason = assert_receive(tagged("child down"))
    assert same and isinstance(reason, runtime.Crash)


def test_messages_sent_before_death_arrive_before_the_down():
    me = runtime.self()

    def last_words(parent):
        runtime.receive(timeout=30, match=lambda m: m == "go")
        for i in range(100):
            runtime.send(parent, ("word", i))

    pid = runtime.spawn(last_words, me)
    ref = runtime.monitor(pid)
    runtime.send(pid, "go")
    wait_down(ref)
    words = []
    while True:
        try:
            words.append(runtime.receive(timeout=0, match=lambda m: isinstance(m, tuple)
                                         and m[0] == "word")[1])
        except TimeoutError:
            break
    assert words == list(range(100))


def _observer(test, watcher, victim, fifo):
    ref = runtime.monitor(victim)
    runtime.send(test, ("watching",))
    wait_down(ref)
    runtime.send(watcher, "sent after the Down")
    with open(fifo, "wb") as f:  # the watcher may go on
        f.write(b"x")


def _watcher(test, fifo, observer_is_ours):
    victim = runtime.spawn(sleeper)
    ref = runtime.monitor(victim)
    if observer_is_ours:  # its message comes over the socketpair made at spawn
        runtime.spawn(_observer, test, runtime.self(), victim, fifo)
    runtime.send(test, ("victim", victim))
    with open(fifo, "rb") as f:  # not waiting in the runtime: both events pile up
        f.read(1)
    first = runtime.receive(timeout=10)
    second = runtime.receive(timeout=10)
    runtime.send(test, ("order", first, second, ref))


@pytest.mark.parametrize("observer", ["child", "stranger"])
def test_a_message_sent_after_a_death_was_seen_comes_after_the_down(tmp_path, observer):
    fifo = str(tmp_path / "go")
    os.mkfifo(fifo)
    pid, ref = runtime.spawn_monitor(_watcher, runtime.self(), fifo, observer == "child")
    _, victim = assert_receive(tagged("victim"))
    if observer == "stranger":  # its first message to the watcher: a new connection
        runtime.spawn(_observer, runtime.self(), pid, victim, fifo)
    assert_receive(tagged("watching"))
    runtime.exit(victim, "kill")
    _, first, second, victim_ref = assert_receive(tagged("order"))
    assert isinstance(first, runtime.Down) and first.ref == victim_ref
    assert second == "sent after the Down"
    wait_down(ref)
