"""GenServer: start, call, cast, info, deferred replies, stop, errors, threads."""

from __future__ import annotations

import threading
import time

import psutil
import pytest

import runtime
from runtime import NoReply, Reply, Stop
from runtime.testing import assert_receive, tagged, wait_down


class Stack(runtime.GenServer):
    """A small server used across these tests. State: a dict."""

    def init(self, arg):
        arg = dict(arg or {})
        if arg.get("fail"):
            raise ValueError("init failed on purpose")
        if arg.get("stop"):
            return Stop("no thanks", None)
        if "notify" in arg:
            runtime.send(arg["notify"], ("init ran", runtime.self()))
        if arg.get("trap"):
            runtime.trap_exit(True)
        arg.setdefault("items", [])
        return arg

    def handle_call(self, request, from_, state):
        kind = request[0] if isinstance(request, tuple) else request
        if kind == "pop":
            return Reply(state["items"].pop() if state["items"] else None, state)
        if kind == "items":
            return Reply(list(state["items"]), state)
        if kind == "later":  # answer from handle_info, after a message arrives
            state["pending"] = from_
            return NoReply(state)
        if kind == "slow":
            time.sleep(request[1])  # sleep-ok: a server busy in a callback
            return Reply("slow done", state)
        if kind == "stop with reply":
            return Stop("normal", state, reply="bye")
        if kind == "bad return":
            return "not a Reply"
        if kind == "crash":
            raise RuntimeError("crash in handle_call")
        if kind == "os pid":
            import os

            return Reply(os.getpid(), state)
        return super().handle_call(request, from_, state)

    def handle_cast(self, request, state):
        if request[0] == "push":
            state["items"].append(request[1])
            return NoReply(state)
        return super().handle_cast(request, state)

    def handle_info(self, msg, state):
        if msg == "release" and "pending" in state:
            runtime.reply(state.pop("pending"), "released")
            return NoReply(state)
        if isinstance(msg, runtime.Exit) and "notify" in state:
            runtime.send(state["notify"], ("got exit", msg.pid, msg.reason))
            return NoReply(state)
        return super().handle_info(msg, state)

    def terminate(self, reason, state):
        if state and "notify" in state:
            runtime.send(state["notify"], ("terminate", reason))


@pytest.fixture
def stack():
    pid = Stack.start_link({"notify": runtime.self()})
    assert_receive(("init ran", pid))
    yield pid
    if runtime.is_alive(pid):
        ref = runtime.monitor(pid)
        runtime.exit(pid, "kill")
        wait_down(ref)


# -------------------------------------------------------------------- starting


def test_start_link_returns_after_init_ran():
    pid = Stack.start_link({"notify": runtime.self()})
    assert runtime.receive(timeout=0, match=lambda m: m == ("init ran", pid))
    runtime.stop(pid)
    assert_receive(("terminate", "normal"))


def test_start_link_raises_the_init_crash_with_its_traceback():
    with pytest.raises(runtime.StartError) as info:
        Stack.start_link({"fail": True})
    reason = info.value.reason
    assert isinstance(reason, runtime.Crash) and reason.message == "init failed on purpose"
    assert "in init" in str(info.value.__cause__)
    # the caller (linked) is not killed by the failed start: we are still here


def test_init_returning_stop_fails_the_start_with_that_reason():
    with pytest.raises(runtime.StartError) as info:
        Stack.start({"stop": True})
    assert info.value.reason == "no thanks"


def test_start_with_a_taken_name_raises_and_leaves_nothing_running():
    pid = Stack.start_link({}, name="gs-taken")
    with pytest.raises(runtime.AlreadyRegisteredError) as info:
        Stack.start_link({}, name="gs-taken")
    assert info.value.pid == pid
    runtime.stop("gs-taken")


def test_a_server_started_by_a_runtime_process_is_its_child():
    me = runtime.self()

    def starter(parent):
        pid = Stack.start_link({})
        runtime.send(parent, ("started", pid, runtime.call(pid, "os pid")))
        runtime.receive(timeout=30, match=lambda m: m == "stop")

    proc, ref = runtime.spawn_monitor(starter, me)
    _, server, os_pid = assert_receive(tagged("started"))
    assert server.os_pid == os_pid
    assert psutil.Process(os_pid).ppid() == proc.os_pid
    runtime.send(proc, "stop")
    wait_down(ref)


# --------------------------------------------------------------- call and cast


def test_call_cast_and_info(stack):
    runtime.cast(stack, ("push", 1))
    runtime.cast(stack, ("push", 2))
    assert runtime.call(stack, "items") == [1, 2]
    assert runtime.call(stack, "pop") == 2
    runtime.send(stack, "an unexpected message")  # logged and ignored
    assert runtime.call(stack, "items") == [1]


def test_call_by_registered_name():
    Stack.start_link({"items": ["x"]}, name="gs-by-name")
    assert runtime.call("gs-by-name", "items") == ["x"]
    runtime.stop("gs-by-name")


def test_a_deferred_reply_from_another_callback(stack):
    result = []
    t = threading.Thread(target=lambda: result.append(runtime.call(stack, "later")))
    t.start()
    runtime.call(stack, "items")  # the server is still serving others meanwhile
    runtime.send(stack, "release")
    t.join(10)
    assert result == ["released"]


def test_a_late_reply_is_discarded_and_never_reaches_a_later_call(stack):
    with pytest.raises(runtime.CallTimeout) as info:
        runtime.call(stack, ("slow", 0.3), timeout=0.05)
    assert isinstance(info.value, TimeoutError)
    assert isinstance(info.value, runtime.ProcessError)
    assert runtime.call(stack, "items") == []  # not "slow done"
    assert runtime.call(stack, "items") == []
    with pytest.raises(TimeoutError):
        runtime.receive(timeout=0.05, match=lambda m: m == "slow done")


def test_a_server_dying_during_a_call_fails_the_call_at_once(stack):
    result = []

    def caller():
        try:
            runtime.call(stack, ("slow", 30), timeout=30)
        except runtime.ProcessError as exc:
            result.append(exc)

    t = threading.Thread(target=caller)
    t.start()
    wait_for_call = runtime.monitor(stack)
    runtime.exit(stack, "kill")
    wait_down(wait_for_call)
    t.join(10)
    assert len(result) == 1 and isinstance(result[0], runtime.ExitError)
    assert result[0].reason == "killed"


def test_a_crash_in_handle_call_reaches_the_caller_with_its_traceback(stack):
    with pytest.raises(runtime.ExitError) as info:
        runtime.call(stack, "crash")
    assert isinstance(info.value.reason, runtime.Crash)
    assert "crash in handle_call" in str(info.value.__cause__)
    terminate = assert_receive(tagged("terminate"))
    assert isinstance(terminate[1], runtime.Crash)


def test_an_unknown_call_crashes_the_server_naming_the_request(stack):
    with pytest.raises(runtime.ExitError) as info:
        runtime.call(stack, ("no such request", 42))
    assert "no such request" in info.value.reason.message


def test_an_unknown_cast_crashes_the_server_naming_the_request(stack):
    ref = runtime.monitor(stack)
    runtime.cast(stack, ("mystery cast",))
    reason = wait_down(ref).reason
    assert isinstance(reason, runtime.Crash) and "mystery cast" in reason.message


def test_a_bad_return_value_crashes_the_server(stack):
    with pytest.raises(runtime.ExitError) as info:
        runtime.call(stack, "bad return")
    assert info.value.reason.exc_type == "TypeError"
    assert "not a Reply" in info.value.reason.message


def test_call_to_a_dead_or_unknown_process_raises_noproc(stack):
    ref = runtime.monitor(stack)
    runtime.exit(stack, "kill")
    wait_down(ref)
    with pytest.raises(runtime.NoProcError):
        runtime.call(stack, "items")
    with pytest.raises(runtime.NoProcError):
        runtime.call("gs-nobody", "items")
    runtime.cast(stack, ("push", 1))  # casts never raise
    runtime.cast("gs-nobody", ("push", 1))


def test_calls_from_eight_threads_at_once(stack):
    errors = []
    barrier = threading.Barrier(8)

    def worker(n):
        try:
            barrier.wait(10)
            for i in range(50):
                runtime.cast(stack, ("push", (n, i)))
                runtime.call(stack, "items")
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    items = runtime.call(stack, "items")
    assert sorted(items) == sorted((n, i) for n in range(8) for i in range(50))
    for n in range(8):  # each thread's casts arrive in its order
        assert [i for m, i in items if m == n] == list(range(50))


# ------------------------------------------------------------------- stopping


def test_stop_runs_terminate_and_returns_once_the_process_is_gone(stack):
    runtime.stop(stack, "normal")
    assert runtime.receive(timeout=0, match=lambda m: m == ("terminate", "normal"))
    assert not runtime.is_alive(stack)
    with pytest.raises(runtime.NoProcError):
        runtime.stop(stack)


def test_stop_with_a_custom_reason(stack):
    ref = runtime.monitor(stack)
    runtime.stop(stack, ("shutdown", "tests"))
    assert wait_down(ref).reason == ("shutdown", "tests")
    assert_receive(("terminate", ("shutdown", "tests")))


def test_stop_from_handle_call_replies_first(stack):
    ref = runtime.monitor(stack)
    assert runtime.call(stack, "stop with reply") == "bye"
    assert wait_down(ref).reason == "normal"


# --------------------------------------------------------------------- links


def test_a_trapping_server_gets_linked_exits_in_handle_info():
    server = Stack.start_link({"notify": runtime.self(), "trap": True})
    assert_receive(("init ran", server))

    def link_and_crash(target):
        runtime.link(target)
        raise RuntimeError("linked process crashed")

    pid = runtime.spawn(link_and_crash, server)
    _, who, reason = assert_receive(tagged("got exit"))
    assert who == pid and isinstance(reason, runtime.Crash)
    runtime.stop(server)


def test_a_trapping_server_terminates_when_its_parent_exits():
    me = runtime.self()

    def parent(reporter):
        Stack.start_link({"notify": reporter, "trap": True})
        runtime.receive(timeout=30, match=lambda m: m == "crash")
        raise RuntimeError("parent crashed")

    pid = runtime.spawn(parent, me)
    _, server = assert_receive(tagged("init ran"))
    ref = runtime.monitor(server)
    runtime.send(pid, "crash")
    _, reason = assert_receive(tagged("terminate"))
    assert isinstance(reason, runtime.Crash) and reason.message == "parent crashed"
    assert wait_down(ref).reason == reason


def test_a_linked_server_crash_kills_its_non_trapping_starter():
    me = runtime.self()

    def starter(parent):
        server = Stack.start_link({})
        runtime.send(parent, ("server", server))
        time.sleep(60)  # sleep-ok: busy while the linked server crashes

    pid, ref = runtime.spawn_monitor(starter, me)
    _, server = assert_receive(tagged("server"))
    with pytest.raises(runtime.ExitError):
        runtime.call(server, "crash")
    reason = wait_down(ref).reason
    assert isinstance(reason, runtime.Crash) and reason.message == "crash in handle_call"


def test_a_call_after_is_alive_said_dead_raises_noproc_even_with_a_watch_on_it():
    # Found by the TCP server's work: with a monitor (a watch) on it, the death was not
    # handled yet when the call started, and the call raised ExitError.
    import os
    import signal

    from runtime.testing import wait_until

    class Quiet(runtime.GenServer):
        pass

    pid = Quiet.start(None)
    ref = runtime.monitor(pid)
    os.kill(pid.os_pid, signal.SIGKILL)
    wait_until(lambda: not runtime.is_alive(pid), what="the server's death")
    with pytest.raises(runtime.NoProcError):
        runtime.call(pid, "hi")
    assert runtime.receive(timeout=5, match=lambda m: getattr(m, "ref", None) == ref).reason \
        == "killed"
