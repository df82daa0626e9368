"""DynamicSupervisor: children on demand, restart types, limits, stopping all at once."""

from __future__ import annotations

import psutil
import pytest

import runtime
from runtime import DynamicSupervisor
from runtime.testing import assert_receive, tagged, wait_down

from .test_supervisor import Worker, spec, started, stopped


@pytest.fixture
def dsup():
    pid = DynamicSupervisor.start_link()
    yield pid
    if runtime.is_alive(pid):
        ref = runtime.monitor(pid)
        runtime.stop(pid)
        wait_down(ref)


def test_start_child_returns_a_child_of_the_supervisor(dsup):
    pid = DynamicSupervisor.start_child(dsup, spec("w1"))
    assert started("w1") == pid
    assert psutil.Process(pid.os_pid).ppid() == dsup.os_pid
    assert DynamicSupervisor.count_children(dsup) == {"specs": 1, "active": 1,
                                                      "supervisors": 0, "workers": 1}
    assert [c.pid for c in DynamicSupervisor.which_children(dsup)] == [pid]


def test_a_permanent_child_is_restarted_and_a_temporary_one_is_not(dsup):
    perm = DynamicSupervisor.start_child(dsup, spec("perm"))
    temp = DynamicSupervisor.start_child(dsup, spec("temp", restart="temporary"))
    started("perm"), started("temp")
    for pid in (perm, temp):
        with pytest.raises(runtime.ExitError):
            runtime.call(pid, "crash")
    assert started("perm") != perm
    with pytest.raises(TimeoutError):
        runtime.receive(timeout=0.2, match=lambda m: tagged("started")(m) and m[1] == "temp")
    assert DynamicSupervisor.count_children(dsup)["active"] == 1


def test_terminate_child_stops_and_forgets_it(dsup):
    pid = DynamicSupervisor.start_child(dsup, spec("t"))
    started("t")
    DynamicSupervisor.terminate_child(dsup, pid)
    assert stopped("t") == "shutdown"
    assert DynamicSupervisor.which_children(dsup) == []
    with pytest.raises(runtime.NoProcError):
        DynamicSupervisor.terminate_child(dsup, pid)


def test_max_children_is_enforced():
    sup = DynamicSupervisor.start_link(max_children=1)
    DynamicSupervisor.start_child(sup, spec("one"))
    started("one")
    with pytest.raises(runtime.StartError, match="max_children"):
        DynamicSupervisor.start_child(sup, spec("two"))
    runtime.stop(sup)


def test_a_child_that_fails_to_start_raises_start_error(dsup):
    with pytest.raises(runtime.StartError):
        DynamicSupervisor.start_child(dsup, {"id": "x", "start": (Worker.start_link, ({},))})
    assert DynamicSupervisor.count_children(dsup)["specs"] == 0


def test_stopping_the_supervisor_stops_every_child(dsup):
    pids = [DynamicSupervisor.start_child(dsup, spec(f"c{i}")) for i in range(5)]
    refs = [runtime.monitor(p) for p in pids]
    runtime.stop(dsup)
    assert {wait_down(r).reason for r in refs} == {"shutdown"}


def test_invalid_specs_and_options_raise(dsup):
    with pytest.raises(runtime.InvalidChildSpec, match="restart"):
        DynamicSupervisor.start_child(dsup, {"id": 1, "start": (Worker.start_link, ()),
                                             "restart": "never"})
    with pytest.raises(runtime.InvalidChildSpec, match="max_children"):
        DynamicSupervisor.start_link(max_children=-2)


def test_restart_intensity_applies(dsup):
    sup = DynamicSupervisor.start_link(max_restarts=1, max_seconds=60)
    ref = runtime.monitor(sup)
    pid = DynamicSupervisor.start_child(sup, spec("flaky"))
    started("flaky")
    with pytest.raises(runtime.ExitError):
        runtime.call(pid, "crash")
    pid = started("flaky")
    with pytest.raises(runtime.ExitError):
        runtime.call(pid, "crash")
    assert wait_down(ref).reason == "shutdown"
    assert_receive(lambda m: isinstance(m, runtime.Exit) and m.pid == sup)


def test_a_failed_restart_is_retried_and_counts_against_the_intensity(tmp_path):
    flag = tmp_path / "fail the next start"
    sup = DynamicSupervisor.start_link(max_restarts=2, max_seconds=60)
    ref = runtime.monitor(sup)
    pid = DynamicSupervisor.start_child(sup, spec("a", arg={"fail_once": str(flag)}))
    started("a")
    flag.touch()
    with pytest.raises(runtime.ExitError):
        runtime.call(pid, "crash")
    pid = started("a")  # at the second try
    assert not flag.exists()
    assert [(c.pid, c.restarts) for c in DynamicSupervisor.which_children(sup)] == [(pid, 1)]
    with pytest.raises(runtime.ExitError):
        runtime.call(pid, "crash")  # the crash and the failed start counted two
    assert wait_down(ref).reason == "shutdown"
    assert_receive(lambda m: isinstance(m, runtime.Exit) and m.pid == sup)
