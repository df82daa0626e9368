"""register, whereis, unregister: node-wide names that vanish with their process."""

from __future__ import annotations

import os
import signal
import time

import pytest

import runtime
from runtime.testing import assert_receive, tagged, wait_down


def sleeper():
    time.sleep(60)  # sleep-ok: a process that blocks until killed


def register_self_and_wait(name, parent):
    runtime.register(name, runtime.self())
    runtime.send(parent, ("registered", name))
    runtime.receive(timeout=30, match=lambda m: m == "stop")


def test_register_whereis_unregister():
    pid, ref = runtime.spawn_monitor(sleeper)
    runtime.register("reg-basic", pid)
    assert runtime.whereis("reg-basic") == pid
    runtime.send("reg-basic", "hello")  # sending by name works
    runtime.unregister("reg-basic")
    assert runtime.whereis("reg-basic") is None
    runtime.exit(pid, "kill")
    wait_down(ref)


def test_a_taken_name_raises():
    a, ra = runtime.spawn_monitor(sleeper)
    b, rb = runtime.spawn_monitor(sleeper)
    runtime.register("reg-taken", a)
    with pytest.raises(runtime.AlreadyRegisteredError) as info:
        runtime.register("reg-taken", b)
    assert info.value.pid == a
    runtime.exit(a, "kill")
    runtime.exit(b, "kill")
    wait_down(ra)
    wait_down(rb)


def test_a_name_vanishes_when_its_process_exits():
    me = runtime.self()
    pid, ref = runtime.spawn_monitor(register_self_and_wait, "reg-vanish-normal", me)
    assert_receive(("registered", "reg-vanish-normal"))
    assert runtime.whereis("reg-vanish-normal") == pid
    runtime.send(pid, "stop")
    wait_down(ref)
    assert runtime.whereis("reg-vanish-normal") is None


def test_a_name_vanishes_when_its_process_is_sigkilled():
    me = runtime.self()
    pid, ref = runtime.spawn_monitor(register_self_and_wait, "reg-vanish-kill", me)
    assert_receive(("registered", "reg-vanish-kill"))
    os.kill(pid.os_pid, signal.SIGKILL)
    wait_down(ref)
    assert runtime.whereis("reg-vanish-kill") is None
    # and the name is free again
    other, ref2 = runtime.spawn_monitor(sleeper)
    runtime.register("reg-vanish-kill", other)
    assert runtime.whereis("reg-vanish-kill") == other
    runtime.exit(other, "kill")
    wait_down(ref2)


@pytest.mark.parametrize("name", [
    "with spaces", "slash/and\\back", "ünïcødé ☃", "x" * 5000, ".", "..", "\x00nul",
])
def test_names_are_arbitrary_strings(name):
    pid, ref = runtime.spawn_monitor(sleeper)
    runtime.register(name, pid)
    assert runtime.whereis(name) == pid
    runtime.unregister(name)
    runtime.exit(pid, "kill")
    wait_down(ref)


def test_bad_names_and_dead_processes_are_rejected():
    with pytest.raises(ValueError):
        runtime.register("", runtime.self())
    with pytest.raises(TypeError):
        runtime.register(42, runtime.self())
    pid, ref = runtime.spawn_monitor(sleeper)
    runtime.exit(pid, "kill")
    wait_down(ref)
    with pytest.raises(runtime.NoProcError):
        runtime.register("reg-dead", pid)
    with pytest.raises(runtime.NoProcError):
        runtime.unregister("reg-never-registered")


def test_names_are_visible_from_every_process():
    me = runtime.self()
    runtime.register("reg-main", me)
    try:
        runtime.spawn(lambda: runtime.send("reg-main", ("found", runtime.whereis("reg-main"))))
        assert assert_receive(tagged("found")) == ("found", me)
    finally:
        runtime.unregister("reg-main")


def test_only_one_of_two_racing_registrations_wins():
    me = runtime.self()

    def racer(parent):
        runtime.receive(timeout=30, match=lambda m: m == "go")
        try:
            runtime.register("reg-race", runtime.self())
            runtime.send(parent, ("won", runtime.self()))
        except runtime.AlreadyRegisteredError:
            runtime.send(parent, ("lost", runtime.self()))
        runtime.receive(timeout=30, match=lambda m: m == "stop")

    pids = [runtime.spawn(racer, me) for _ in range(4)]
    refs = [runtime.monitor(p) for p in pids]
    for p in pids:
        runtime.send(p, "go")
    results = [assert_receive(lambda m: tagged("won")(m) or tagged("lost")(m)) for _ in pids]
    winners = [p for kind, p in results if kind == "won"]
    assert len(winners) == 1
    assert runtime.whereis("reg-race") == winners[0]
    for p in pids:
        runtime.send(p, "stop")
    for ref in refs:
        wait_down(ref)
