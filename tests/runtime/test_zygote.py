"""``runtime.keep_warm(zygote=True)``: a runtime process's spawns are forked by a
zygote, a small fresh process it keeps (its child), renewed every few hundred
children; what the children see, how they die, and that nothing is left behind."""

from __future__ import annotations

import os
import signal
import threading

import psutil
import pytest

import runtime
from runtime import Crash
from runtime.testing import assert_receive, tagged, wait_down, wait_until

from .test_keep_warm import _gone, _stop

STATE = "as imported"  # what a zygote's child sees of this module (see _keeper)


def _keeper(main, renew=None):
    """(A runtime process) Keeps a zygote, traps exits and does what it is told."""
    global STATE
    if renew is not None:  # (in this process only: the keeper decides renewals)
        from runtime import _warm
        _warm.ZYGOTE_RENEW, _warm.ZYGOTE_LEAD = renew
    runtime.trap_exit(True)
    runtime.keep_warm(True, zygote=True)
    runtime.send(main, ("keeper", runtime.self()))
    while True:
        msg = runtime.receive()
        if msg.__class__ is runtime.Exit:
            runtime.send(main, ("exit", msg.pid, msg.reason))
            continue
        kind = msg[0]
        if kind in ("spawn", "spawn_asking"):
            _, fn, args, link = msg
            if kind == "spawn_asking":
                runtime.send(main, ("asking",))
            try:
                runtime.send(main, ("spawned", runtime.spawn(fn, *args, link=link)))
            except runtime.ProcessError as exc:
                runtime.send(main, ("spawn_error", str(exc)))
        elif kind == "set":
            STATE = msg[1]
            runtime.send(main, ("set",))
        elif kind == "unpicklable":
            lock = threading.Lock()
            runtime.send(main, ("spawned", runtime.spawn(
                lambda lock=lock: runtime.send(main, ("lambda", lock.locked(), os.getppid())))))
        elif kind == "supervisor":
            sup = runtime.Supervisor.start_link([], strategy="one_for_one")
            runtime.send(main, ("supervisor", sup))
        elif kind == "burst":  # spawns back to back, never idle in between
            runtime.send(main, ("burst", [runtime.spawn(_report, main, ("b", i), link=False)
                                          for i in range(msg[1])]))
        elif kind == "keep_warm":
            runtime.keep_warm(msg[1], zygote=True)
            runtime.send(main, ("keep_warm",))
        elif kind == "exit":
            raise SystemExit(msg[1]) if msg[1] is None else RuntimeError(msg[1])
        elif kind == "stop":
            return


def _report(main, tag="child"):
    runtime.send(main, (tag, runtime.self(), os.getpid(), os.getppid(), STATE))
    msg = runtime.receive(timeout=30)  # until told to go
    if msg == "crash":
        raise ValueError("told to crash")


def _start_keeper(renew=None):
    pid, ref = runtime.spawn_monitor(_keeper, runtime.self(), renew)
    assert_receive(("keeper", pid))
    zygote = wait_until(lambda: (lambda z: z[0] if z else None)(_info(pid)["zygotes"]),
                        what="the zygote")
    wait_until(lambda: len(_info(pid)["warm_children"]) == 2, what="two children ahead")
    return pid, ref, zygote


def _info(pid):
    info = runtime.info(pid, timeout=5.0)
    assert info is not None
    return info


def _spawn(keeper, tag="child", link=True):
    runtime.send(keeper, ("spawn", _report, (runtime.self(), tag), link))
    _, spawned = assert_receive(tagged("spawned"))
    _, me, os_pid, ppid, seen = assert_receive(tagged(tag))
    assert me == spawned and os_pid == spawned.os_pid
    return spawned, ppid, seen


def test_a_spawn_runs_in_a_child_of_the_zygote_that_is_a_fresh_interpreter():
    keeper, ref, zygote = _start_keeper()
    assert psutil.Process(zygote.os_pid).ppid() == keeper.os_pid
    assert zygote in runtime.processes() and zygote not in _info(keeper)["children"]
    runtime.send(keeper, ("set", "changed in the keeper"))
    assert_receive(("set",))
    ahead = _info(keeper)["warm_children"]
    child, ppid, seen = _spawn(keeper)
    assert child == ahead[0]  # the oldest started ahead
    assert ppid == zygote.os_pid and _info(child)["parent"] == zygote
    assert seen == "as imported"  # not a copy of the keeper: the documented trade
    assert child in _info(keeper)["links"] and keeper in _info(child)["links"]
    # The zygote starts another ahead once the child has got going.
    wait_until(lambda: len(_info(keeper)["warm_children"]) == 2, what="a new child ahead")
    runtime.send(child, "go")
    assert_receive(("exit", child, "normal"))
    _stop(keeper, ref)
    wait_until(lambda: _gone(zygote.os_pid), what="the zygote")


def test_a_spawn_whose_zygote_dies_while_asked_raises_and_is_not_forked_again():
    # The zygote may have forked a process for the target before it died (which then
    # dies with it): the spawn must raise, not run the target a second time.
    keeper, ref, zygote = _start_keeper()
    ahead = [_spawn(keeper, tag=i)[0] for i in range(2)]  # the two started ahead
    os.kill(zygote.os_pid, signal.SIGSTOP)  # asked next, it answers nothing
    try:
        runtime.send(keeper, ("spawn_asking", _report, (runtime.self(), "late"), True))
        assert_receive(("asking",))
        # Asleep from then on only in the call to the zygote: the request is written.
        wait_until(lambda: psutil.Process(keeper.os_pid).status() == psutil.STATUS_SLEEPING,
                   what="the keeper waiting for the zygote")
    finally:
        os.kill(zygote.os_pid, signal.SIGKILL)
    outcome = assert_receive(lambda m: m.__class__ is tuple and m[0] in ("spawn_error",
                                                                          "spawned"))
    if outcome[0] == "spawn_error":  # (as it is but on a loaded machine)
        assert "the zygote died during the spawn" in outcome[1]
        with pytest.raises(AssertionError):
            assert_receive(tagged("late"), timeout=0.3)  # it ran nowhere
    else:
        # On a loaded machine: the stopped zygote had started a third child ahead,
        # which took the target; or the keeper saw the zygote dead before it asked
        # and forked the target, or a new zygote did; or the target went to a child
        # the dead zygote had started ahead, which the kernel killed as it took it.
        # It ran once at most.
        late = outcome[1]
        got = assert_receive(lambda m: m == ("exit", late, "killed") or (
            m.__class__ is tuple and m[0] == "late"))
        if got[0] == "late":
            assert got[1] == late
            runtime.send(late, "go")
        with pytest.raises(AssertionError):
            assert_receive(tagged("late"), timeout=0.3)
    for child in ahead:  # (killed with the zygote)
        assert_receive(("exit", child, "killed"))
    _stop(keeper, ref)


def test_a_busy_keeper_renews_its_zygote_in_its_spawns():
    # Renewal must not wait for an idle moment: a keeper that spawns without ever
    # waiting for a message still moves to a new zygote.
    keeper, ref, first = _start_keeper(renew=(3, 1))
    runtime.send(keeper, ("burst", 10))
    _, children = assert_receive(tagged("burst"))
    parents = {psutil.Process(pid.os_pid).ppid() for pid in children}
    assert len(parents - {keeper.os_pid}) >= 2  # more than one zygote forked them
    for child in children:
        runtime.send(child, "go")
    _stop(keeper, ref)


@pytest.mark.skipif(runtime.options().start_method == "spawn",
                    reason="under spawn the keeper's own children are fresh interpreters too")
def test_a_zygote_that_dies_importing_the_keeper_s_modules_is_replaced_without_them(tmp_path):
    # A module of the keeper's targets that exits at import in a fresh interpreter
    # kills the zygote that imports it as it starts: the next one must start without
    # it, not die the same way at every idle moment of the keeper.
    (tmp_path / "zyg_exits_at_import.py").write_text(
        "import os\nif os.environ.get('ZYG_FRESH') == '1':\n    os._exit(3)\n\n"
        "def target(main):\n    import runtime\n    runtime.send(main, ('ran',))\n")
    pid, ref = runtime.spawn_monitor(_exiting_import_keeper, runtime.self(), str(tmp_path))
    _, zygotes, failed, modules = assert_receive(tagged("idled"), timeout=30)
    assert len(zygotes) == 1 and failed == 1 and "zyg_exits_at_import" not in modules
    _stop(pid, ref)


def _exiting_import_keeper(main, path):
    import sys

    from runtime import _current
    sys.path.insert(0, path)
    import zyg_exits_at_import  # (here, before the fresh interpreters are told to exit)
    os.environ["ZYG_FRESH"] = "1"
    runtime.keep_warm(True, zygote=True)
    runtime.spawn(zyg_exits_at_import.target, runtime.self())  # forked: no zygote yet
    runtime.receive(match=lambda m: m == ("ran",), timeout=10)
    keeper = _current.get().keeper
    for i in range(100):  # idle moments: the first zygote dies, one more is started
        try:
            runtime.receive(timeout=0.1)
        except runtime.ReceiveTimeout:
            pass
        if keeper.failed and i >= 10:
            break
    runtime.send(main, ("idled", runtime.info(runtime.self())["zygotes"], keeper.failed,
                        list(keeper.modules)))
    runtime.receive(match=lambda m: m == ("stop",))


def test_a_crash_in_a_zygote_s_child_reaches_the_keeper_with_its_true_reason():
    keeper, ref, zygote = _start_keeper()
    child, _, _ = _spawn(keeper)
    cref = runtime.monitor(child)
    runtime.send(child, "crash")
    _, pid, reason = assert_receive(tagged("exit"))
    assert pid == child and isinstance(reason, Crash) and "told to crash" in str(reason)
    assert isinstance(wait_down(cref).reason, Crash)
    _stop(keeper, ref)


def test_spawns_beyond_what_is_started_ahead_are_forked_by_the_zygote_at_once():
    keeper, ref, zygote = _start_keeper()
    children = []
    for i in range(5):  # back to back: more than the two started ahead
        runtime.send(keeper, ("spawn", _report, (runtime.self(), i), True))
    for i in range(5):
        _, spawned = assert_receive(tagged("spawned"))
        _, me, _, ppid, _ = assert_receive(tagged(i))
        assert ppid == zygote.os_pid
        children.append(me)
    for child in children:
        runtime.send(child, "go")
    for child in children:
        assert_receive(("exit", child, "normal"))
    _stop(keeper, ref)


def test_a_zygote_is_replaced_after_its_share_and_exits_once_its_children_are_gone():
    keeper, ref, first = _start_keeper(renew=(3, 1))
    zref = runtime.monitor(first)
    old = [_spawn(keeper, tag=i)[0] for i in range(3)]
    # The successor was started one child before the end of the first one's share,
    # and takes over while the keeper is idle.
    second = wait_until(lambda: (lambda z: z[0] if z and z[0] != first else None)(
        _info(keeper)["zygotes"]), what="the next zygote")
    wait_until(lambda: all(pid.os_pid in [p.pid for p in psutil.Process(
        second.os_pid).children()] for pid in _info(keeper)["warm_children"][-1:]),
        what="children ahead from the new zygote")
    # The first one killed the children it had started ahead, which the keeper had
    # not taken: the next spawns are the new one's.
    spawned = [_spawn(keeper, tag=i) for i in range(3, 5)]
    assert [ppid for _, ppid, _ in spawned] == [second.os_pid] * 2
    assert first in _info(keeper)["zygotes"]  # retired, its children still run
    for child in old + [c for c, _, _ in spawned]:
        runtime.send(child, "go")
        assert_receive(("exit", child, "normal"))
    assert wait_down(zref).reason == "normal"  # none of its children left
    assert first not in _info(keeper)["zygotes"]
    _stop(keeper, ref)


def test_killing_the_zygote_kills_what_it_forked_and_the_keeper_starts_another():
    keeper, ref, zygote = _start_keeper()
    child, _, _ = _spawn(keeper)
    cref = runtime.monitor(child)
    os.kill(zygote.os_pid, 9)
    assert wait_down(cref).reason == "killed"  # (the kernel's parent-death signal)
    assert_receive(("exit", child, "killed"))
    fresh = wait_until(lambda: (lambda z: z[0] if z and z[0] != zygote else None)(
        _info(keeper)["zygotes"]), what="a new zygote")
    wait_until(lambda: len(_info(keeper)["warm_children"]) == 2, what="two children ahead")
    second, ppid, _ = _spawn(keeper, tag="second")
    assert ppid == fresh.os_pid
    runtime.send(second, "go")
    assert_receive(("exit", second, "normal"))
    _stop(keeper, ref)


def test_a_keeper_that_crashes_passes_its_reason_to_its_children_and_leaves_nothing():
    keeper, ref, zygote = _start_keeper()
    child, _, _ = _spawn(keeper)
    cref = runtime.monitor(child)
    warm = _info(keeper)["warm_children"]
    runtime.send(keeper, ("exit", "keeper broke"))
    reason = wait_down(ref).reason
    assert isinstance(reason, Crash) and "keeper broke" in str(reason)
    assert wait_down(cref).reason == reason  # the link's reason, not the zygote's exit
    for os_pid in [zygote.os_pid, *(pid.os_pid for pid in warm)]:
        wait_until(lambda os_pid=os_pid: _gone(os_pid), what="the zygote and its children")


def test_a_keeper_killed_takes_its_zygote_and_the_children_along():
    keeper, ref, zygote = _start_keeper()
    child, _, _ = _spawn(keeper)
    cref = runtime.monitor(child)
    os.kill(keeper.os_pid, 9)
    assert wait_down(ref).reason == "killed"
    assert wait_down(cref).reason == "killed"
    wait_until(lambda: _gone(zygote.os_pid), what="the zygote")


def test_keep_warm_false_stops_the_children_ahead_and_the_zygote_once_its_are_gone():
    keeper, ref, zygote = _start_keeper()
    zref = runtime.monitor(zygote)
    child, _, _ = _spawn(keeper)
    warm = _info(keeper)["warm_children"]
    runtime.send(keeper, ("keep_warm", False))
    assert_receive(("keep_warm",))
    for pid in warm:
        wait_until(lambda pid=pid: _gone(pid.os_pid), what="the children started ahead")
    assert runtime.is_alive(child) and runtime.is_alive(zygote)
    forked, ppid, _ = _spawn(keeper, tag="forked")  # forked by the keeper again
    assert ppid == keeper.os_pid
    for pid in (child, forked):
        runtime.send(pid, "go")
        assert_receive(("exit", pid, "normal"))
    assert wait_down(zref).reason == "normal"
    assert _info(keeper)["zygotes"] == []
    _stop(keeper, ref)


def test_a_start_that_traps_exits_is_forked_by_the_zygote_too():
    keeper, ref, zygote = _start_keeper()
    runtime.send(keeper, ("supervisor",))
    _, sup = assert_receive(tagged("supervisor"))
    assert psutil.Process(sup.os_pid).ppid() == zygote.os_pid
    assert _info(sup)["trap_exit"] is True
    _stop(keeper, ref)
    wait_until(lambda: _gone(sup.os_pid), what="the supervisor")


@pytest.mark.skipif(runtime.options().start_method == "spawn",
                    reason="under spawn every target must be picklable")
def test_a_target_that_cannot_be_pickled_is_forked_by_the_keeper():
    keeper, ref, zygote = _start_keeper()
    runtime.send(keeper, ("unpicklable",))
    assert_receive(tagged("spawned"))
    _, locked, ppid = assert_receive(tagged("lambda"))
    assert locked is False and ppid == keeper.os_pid
    _stop(keeper, ref)
