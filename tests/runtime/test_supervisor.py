"""Supervisor: start order, strategies, restart types, intensity, shutdown, management."""

from __future__ import annotations

import os
import time

import psutil
import pytest

import runtime
from runtime import Reply, Stop, Supervisor, child_spec
from runtime.testing import assert_receive, tagged, wait_down


class Worker(runtime.GenServer):
    """Reports ("started", id, pid) from init and ("stopped", id, reason) from terminate.

    With ``fail_once``, a path: if that file exists, init removes it and fails."""

    def init(self, arg):
        runtime.trap_exit(arg.get("trap", True))
        if arg.get("fail_once") and os.path.exists(arg["fail_once"]):
            os.remove(arg["fail_once"])
            raise RuntimeError(f"{arg['id']} failed to start once")
        runtime.send(arg["reporter"], ("started", arg["id"], runtime.self()))
        return arg

    def handle_call(self, request, from_, state):
        if request == "ping":
            return Reply(("pong", state["id"]), state)
        if request == "crash":
            raise RuntimeError(f"{state['id']} crashed")
        if request == "exit normally":
            return Stop("normal", state, reply="ok")
        if request == "exit shutdown":
            return Stop(("shutdown", "done"), state, reply="ok")
        return super().handle_call(request, from_, state)

    def terminate(self, reason, state):
        runtime.send(state["reporter"], ("stopped", state["id"], reason))
        if state.get("slow_terminate"):
            time.sleep(30)  # sleep-ok: a child too slow to stop


def spec(child_id, restart="permanent", **extra):
    arg = {"id": child_id, "reporter": runtime.self(), **extra.pop("arg", {})}
    return {"id": child_id, "start": (Worker.start_link, (arg,)), "restart": restart, **extra}


def started(child_id):
    return assert_receive(lambda m: tagged("started")(m) and m[1] == child_id)[2]


def stopped(child_id):
    return assert_receive(lambda m: tagged("stopped")(m) and m[1] == child_id)[2]


def start_sup(children, **options):
    sup = Supervisor.start_link(children, **options)
    pids = {c["id"]: started(c["id"]) for c in children}
    return sup, pids


def stop_sup(sup):
    ref = runtime.monitor(sup)
    runtime.stop(sup, "shutdown")
    wait_down(ref)


def crash(pid):
    with pytest.raises(runtime.ExitError):
        runtime.call(pid, "crash")


# -------------------------------------------------------------------- ordering


def test_children_start_in_order_and_stop_in_reverse_order():
    sup = Supervisor.start_link([spec("a"), spec("b"), spec("c")])
    order = [assert_receive(tagged("started"))[1] for _ in range(3)]
    assert order == ["a", "b", "c"]
    runtime.stop(sup)
    order = [assert_receive(tagged("stopped"))[1] for _ in range(3)]
    assert order == ["c", "b", "a"]


def test_children_are_os_children_of_the_supervisor():
    sup, pids = start_sup([spec("a")])
    assert psutil.Process(pids["a"].os_pid).ppid() == sup.os_pid
    stop_sup(sup)


def test_a_child_that_fails_to_start_stops_the_others_and_fails_the_start():
    bad = {"id": "bad", "start": (Worker.start_link, ({"id": "bad"},))}  # no reporter: crashes
    with pytest.raises(runtime.StartError) as info:
        Supervisor.start_link([spec("a"), bad, spec("c")])
    assert info.value.reason[0] == "failed_to_start_child" and info.value.reason[1] == "bad"
    assert started("a")
    assert stopped("a") == "shutdown"
    with pytest.raises(TimeoutError):
        runtime.receive(timeout=0.1, match=lambda m: tagged("started")(m) and m[1] == "c")


# ------------------------------------------------------------------ strategies


def test_one_for_one_restarts_only_the_crashed_child():
    sup, pids = start_sup([spec("a"), spec("b"), spec("c")], strategy="one_for_one")
    crash(pids["b"])
    new_b = started("b")
    assert new_b != pids["b"]
    assert runtime.call(new_b, "ping") == ("pong", "b")
    children = {c.id: c.pid for c in Supervisor.which_children(sup)}
    assert children == {"a": pids["a"], "b": new_b, "c": pids["c"]}
    stop_sup(sup)


def test_one_for_all_restarts_every_child():
    sup, pids = start_sup([spec("a"), spec("b"), spec("c")], strategy="one_for_all")
    crash(pids["b"])
    assert [stopped(x) for x in ("c", "a")] == ["shutdown", "shutdown"]
    new = [started(x) for x in ("a", "b", "c")]
    assert not set(new) & set(pids.values())
    stop_sup(sup)


def test_rest_for_one_restarts_the_crashed_child_and_those_after_it():
    sup, pids = start_sup([spec("a"), spec("b"), spec("c")], strategy="rest_for_one")
    crash(pids["b"])
    assert stopped("c") == "shutdown"
    new_b, new_c = started("b"), started("c")
    children = {c.id: c.pid for c in Supervisor.which_children(sup)}
    assert children == {"a": pids["a"], "b": new_b, "c": new_c}
    stop_sup(sup)


@pytest.mark.parametrize("strategy", ["one_for_all", "rest_for_one"])
def test_a_group_restart_drops_a_temporary_sibling_and_restarts_a_transient_one(strategy):
    # OTP: a temporary child is never restarted; when the supervisor stops the group
    # to restart it, a temporary child's spec is dropped. A transient sibling is
    # restarted with the group however it was stopped.
    children = [spec("p"), spec("tmp", restart="temporary"), spec("t", restart="transient")]
    sup, pids = start_sup(children, strategy=strategy)
    crash(pids["p"])
    assert [stopped(x) for x in ("t", "tmp")] == ["shutdown", "shutdown"]
    new_p, new_t = started("p"), started("t")
    children = {c.id: c.pid for c in Supervisor.which_children(sup)}
    assert children == {"p": new_p, "t": new_t}
    with pytest.raises(TimeoutError):
        runtime.receive(timeout=0.2, match=lambda m: tagged("started")(m) and m[1] == "tmp")
    assert not runtime.is_alive(pids["tmp"])
    stop_sup(sup)


# --------------------------------------------------------------- restart types


def test_permanent_child_is_restarted_even_after_a_normal_exit():
    sup, pids = start_sup([spec("p")])
    assert runtime.call(pids["p"], "exit normally") == "ok"
    assert started("p") != pids["p"]
    stop_sup(sup)


@pytest.mark.parametrize("request_", ["exit normally", "exit shutdown"])
def test_transient_child_is_not_restarted_after_a_clean_exit(request_):
    sup, pids = start_sup([spec("t", restart="transient")])
    ref = runtime.monitor(pids["t"])
    assert runtime.call(pids["t"], request_) == "ok"
    wait_down(ref)
    assert Supervisor.which_children(sup)[0].pid is None  # kept, not running
    assert Supervisor.count_children(sup) == {"specs": 1, "active": 0, "supervisors": 0,
                                              "workers": 1}
    stop_sup(sup)


def test_transient_child_is_restarted_after_a_crash():
    sup, pids = start_sup([spec("t", restart="transient")])
    crash(pids["t"])
    assert started("t") != pids["t"]
    stop_sup(sup)


def test_temporary_child_is_never_restarted_and_its_spec_is_dropped():
    sup, pids = start_sup([spec("tmp", restart="temporary"), spec("keep")])
    crash(pids["tmp"])
    with pytest.raises(TimeoutError):
        runtime.receive(timeout=0.2, match=lambda m: tagged("started")(m) and m[1] == "tmp")
    assert [c.id for c in Supervisor.which_children(sup)] == ["keep"]
    stop_sup(sup)


# ------------------------------------------------------------------- intensity


def test_too_many_restarts_shut_the_supervisor_down():
    sup, pids = start_sup([spec("a"), spec("b")], max_restarts=2, max_seconds=60)
    ref = runtime.monitor(sup)
    current = pids["b"]
    for _ in range(2):
        crash(current)
        current = started("b")
    crash(current)  # the third restart in the window is one too many
    assert wait_down(ref).reason == "shutdown"
    assert stopped("a") == "shutdown"
    assert not runtime.is_alive(pids["a"])
    runtime.receive(timeout=5, match=lambda m: isinstance(m, runtime.Exit) and m.pid == sup)


def test_a_failed_restart_is_retried_and_counts_against_the_intensity(tmp_path):
    flag = tmp_path / "fail the next start"
    sup, pids = start_sup([spec("a", arg={"fail_once": str(flag)})], max_restarts=2,
                          max_seconds=60)
    flag.touch()
    crash(pids["a"])
    new_a = started("a")  # at the second try
    assert not flag.exists()
    assert Supervisor.which_children(sup)[0].restarts == 1
    ref = runtime.monitor(sup)
    crash(new_a)  # the crash and the failed start counted two: a third is one too many
    assert wait_down(ref).reason == "shutdown"
    runtime.receive(timeout=5, match=lambda m: isinstance(m, runtime.Exit) and m.pid == sup)


def test_restarts_outside_the_window_do_not_count():
    sup, pids = start_sup([spec("a")], max_restarts=1, max_seconds=0.05)
    current = pids["a"]
    for _ in range(3):
        crash(current)
        current = started("a")
        time.sleep(0.06)  # sleep-ok: the restart window is a span of time
    assert runtime.is_alive(sup)
    stop_sup(sup)


# -------------------------------------------------------------------- shutdown


def test_a_child_that_ignores_shutdown_is_killed_after_its_shutdown_time():
    stubborn = spec("s", shutdown=0.2, arg={"slow_terminate": True})
    sup, pids = start_sup([stubborn])
    ref = runtime.monitor(pids["s"])
    runtime.stop(sup)
    assert wait_down(ref).reason == "killed"


def test_brutal_kill_kills_at_once_without_terminate():
    sup, pids = start_sup([spec("b", shutdown="brutal_kill")])
    ref = runtime.monitor(pids["b"])
    runtime.stop(sup)
    assert wait_down(ref).reason == "killed"
    with pytest.raises(TimeoutError):
        runtime.receive(timeout=0.1, match=lambda m: tagged("stopped")(m) and m[1] == "b")


def test_a_non_trapping_child_is_stopped_with_reason_shutdown():
    sup, pids = start_sup([spec("n", arg={"trap": False})])
    ref = runtime.monitor(pids["n"])
    runtime.stop(sup)
    assert wait_down(ref).reason == "shutdown"


def _parent_of_a_supervisor(reporter, children):
    sup = Supervisor.start_link(children)
    runtime.send(reporter, ("parent ready", sup))
    runtime.receive(timeout=30, match=lambda m: m == "crash")
    raise RuntimeError("parent of the supervisor crashed")


def test_a_supervisor_stops_its_children_when_its_parent_crashes():
    pid, ref = runtime.spawn_monitor(_parent_of_a_supervisor, runtime.self(), [spec("a")])
    child = started("a")
    _, sup = assert_receive(tagged("parent ready"))
    sup_ref = runtime.monitor(sup)
    runtime.send(pid, "crash")
    assert stopped("a") == "shutdown"  # as in OTP: a supervisor stops children with shutdown
    reason = wait_down(sup_ref).reason  # and exits with its parent's reason
    assert isinstance(reason, runtime.Crash) and "parent of the supervisor" in reason.message
    wait_down(ref)
    assert not runtime.is_alive(child)


# ------------------------------------------------------------------ management


def test_terminate_restart_and_delete_child():
    sup, pids = start_sup([spec("a"), spec("b")])
    Supervisor.terminate_child(sup, "a")
    assert stopped("a") == "shutdown"
    assert Supervisor.count_children(sup)["active"] == 1
    with pytest.raises(runtime.ProcessError):
        Supervisor.delete_child(sup, "b")  # running
    new_a = Supervisor.restart_child(sup, "a")
    assert started("a") == new_a
    with pytest.raises(runtime.ProcessError):
        Supervisor.restart_child(sup, "a")  # already running
    Supervisor.terminate_child(sup, "a")
    stopped("a")
    Supervisor.delete_child(sup, "a")
    assert [c.id for c in Supervisor.which_children(sup)] == ["b"]
    with pytest.raises(runtime.NoProcError):
        Supervisor.terminate_child(sup, "a")
    pid = Supervisor.start_child(sup, spec("c"))
    assert started("c") == pid
    stop_sup(sup)


def test_a_gen_server_class_is_a_child_spec():
    class Defaults(runtime.GenServer):
        def handle_call(self, request, from_, state):
            return Reply(state, state)

    class Custom(runtime.GenServer):
        @classmethod
        def child_spec(cls, arg=None):
            spec = super().child_spec(arg)
            spec["restart"] = "temporary"
            return spec

    sup = Supervisor.start_link([Defaults, (Custom, "x")])
    children = Supervisor.which_children(sup)
    assert [c.id for c in children] == [Defaults, Custom]
    assert runtime.call(children[0].pid, "state?") is None
    ref = runtime.monitor(children[1].pid)
    runtime.exit(children[1].pid, "kill")
    wait_down(ref)
    assert [c.id for c in Supervisor.which_children(sup)] == [Defaults]  # temporary: dropped
    stop_sup(sup)


def test_child_spec_defaults_follow_the_child_type():
    worker = runtime.GenServer.child_spec("arg")
    assert (worker["id"], worker["restart"], worker["type"], worker["shutdown"]) == (
        runtime.GenServer, "permanent", "worker", 5.0)
    sup = Supervisor.child_spec([spec("a")], name="s")
    assert (sup["id"], sup["restart"], sup["type"], sup["shutdown"]) == (
        "s", "permanent", "supervisor", "infinity")
    assert runtime.DynamicSupervisor.child_spec()["id"] is runtime.DynamicSupervisor


def test_make_checks_a_spec_where_it_is_written():
    with pytest.raises(runtime.InvalidChildSpec, match="restart"):
        child_spec.make("x", Worker.start_link, restart="sometimes")
    spec_ = child_spec.make("x", Worker.start_link, ({"id": "x"},), shutdown="brutal_kill")
    assert child_spec.normalize(spec_).shutdown == "brutal_kill"


@pytest.mark.parametrize("bad, field", [
    ({"id": "x", "start": (Worker.start_link, ()), "restart": "sometimes"}, "restart"),
    ({"id": "x", "start": (Worker.start_link, ()), "shutdown": -1}, "shutdown"),
    ({"id": "x", "start": (Worker.start_link, ()), "type": "manager"}, "type"),
    ({"id": "x", "start": "not callable"}, "start"),
    ({"start": (Worker.start_link, ())}, "id"),
    ({"id": "x", "start": (Worker.start_link, ()), "colour": "red"}, "key"),
    ("just a string", "child_spec"),
])
def test_invalid_specs_raise_naming_the_field(bad, field):
    with pytest.raises(runtime.InvalidChildSpec) as info:
        Supervisor.start_link([bad])
    assert field in str(info.value)


@pytest.mark.parametrize("options, field", [
    ({"strategy": "one_for_some"}, "strategy"),
    ({"max_restarts": -1}, "max_restarts"),
    ({"max_seconds": 0}, "max_seconds"),
])
def test_invalid_options_raise_naming_the_field(options, field):
    with pytest.raises(runtime.InvalidChildSpec) as info:
        Supervisor.start_link([], **options)
    assert info.value.field == field


def test_duplicate_ids_are_rejected():
    with pytest.raises(runtime.InvalidChildSpec, match="id"):
        Supervisor.start_link([spec("a"), spec("a")])


def test_supervisors_nest():
    inner = Supervisor.child_spec([spec("leaf")], name="inner-sup")
    outer = Supervisor.start_link([inner])
    leaf = started("leaf")
    assert runtime.whereis("inner-sup") is not None
    assert Supervisor.which_children(outer)[0].type == "supervisor"
    crash(leaf)
    assert isinstance(stopped("leaf"), runtime.Crash)
    assert started("leaf") != leaf
    runtime.stop(outer)
    assert stopped("leaf") == "shutdown"


def test_one_crash_is_one_restart_whatever_the_strategy_restarts():
    children = [spec(x) for x in "abcd"]
    sup, pids = start_sup(children, strategy="one_for_all", max_restarts=1, max_seconds=60)
    crash(pids["a"])  # restarts four children: still one restart
    new = {x: started(x) for x in "abcd"}
    assert runtime.is_alive(sup)
    ref = runtime.monitor(sup)
    crash(new["b"])  # the second failure within the window is one too many
    assert wait_down(ref).reason == "shutdown"
    runtime.receive(timeout=5, match=lambda m: isinstance(m, runtime.Exit) and m.pid == sup)
