"""Scenarios found in review: each failed once; each must keep passing."""

from __future__ import annotations

import os
import resource
import threading
import time

import pytest

import runtime
from runtime import _node
from runtime.testing import assert_receive, tagged, wait_down


class SlowTerminate(runtime.GenServer):
    """Traps exits; its terminate takes a while, then reports."""

    def init(self, main):
        runtime.trap_exit(True)
        self.main = main
        return None

    def terminate(self, reason, state):
        runtime.send(self.main, ("terminating", reason))
        time.sleep(0.6)  # sleep-ok: a terminate that flushes state
        runtime.send(self.main, ("terminate done", reason))


def _parent_of_slow(main):
    SlowTerminate.start_link(main)
    runtime.send(main, ("ready", runtime.self()))
    time.sleep(30)  # sleep-ok: busy until killed


def test_exit_signal_lets_trapping_children_finish_terminate():
    pid = runtime.spawn(_parent_of_slow, runtime.self())
    assert_receive(tagged("ready"))
    runtime.exit(pid, "boom")
    assert assert_receive(tagged("terminate done")) == ("terminate done", "boom")


def _exits_then_waits(main):
    SlowTerminate.start_link(main)
    runtime.send(main, ("ready", runtime.self()))
    runtime.receive(timeout=10, match=lambda m: m == "go")
    runtime.exit(runtime.self(), "mine")


def test_a_late_exit_signal_does_not_change_the_reason_of_an_exiting_process():
    pid, ref = runtime.spawn_monitor(_exits_then_waits, runtime.self())
    assert_receive(tagged("ready"))
    runtime.send(pid, "go")
    assert_receive(tagged("terminating"))  # the parent is in its exit path, waiting
    runtime.exit(pid, "other")
    assert assert_receive(tagged("terminate done"))[1] == "mine"
    assert wait_down(ref).reason == "mine"


def _crash_with_a_huge_reason(main):
    SlowTerminate.start_link(main)
    runtime.send(main, ("ready", runtime.self()))
    runtime.receive(timeout=10, match=lambda m: m == "go")
    raise RuntimeError("x" * 2_000_000)


def test_a_huge_crash_reason_reaches_trapping_children_and_monitors():
    pid, ref = runtime.spawn_monitor(_crash_with_a_huge_reason, runtime.self())
    assert_receive(tagged("ready"))
    runtime.send(pid, "go")
    _, reason = assert_receive(tagged("terminate done"))
    assert isinstance(reason, runtime.Crash) and len(reason.message) == 2_000_000
    assert wait_down(ref).reason == reason


def test_stop_is_not_confused_by_another_thread_receiving():
    class Plain(runtime.GenServer):
        pass

    server = Plain.start_link()
    taken = []
    stop_at = time.monotonic() + 3

    def inbox():
        while time.monotonic() < stop_at:
            try:
                taken.append(runtime.receive(timeout=0.05))
            except TimeoutError:
                pass

    thread = threading.Thread(target=inbox)
    thread.start()
    try:
        runtime.stop(server)
    finally:
        stop_at = 0
        thread.join(5)
    assert not any(isinstance(m, runtime.Down) for m in taken)


class Caller(runtime.GenServer):
    """Calls ``peer`` from its terminate: the peer must still be there at shutdown."""

    def init(self, arg):
        runtime.trap_exit(True)
        return arg

    def terminate(self, reason, state):
        print("peer answered", runtime.call(state, "ping"), flush=True)


class Pong(runtime.GenServer):
    def init(self, arg):
        runtime.trap_exit(True)
        return arg

    def handle_call(self, request, from_, state):
        return runtime.Reply("pong", state)


def test_shutdown_stops_top_level_processes_one_at_a_time_last_first():
    from .test_node import run_script

    proc = run_script("""
        import runtime
        from tests.runtime.test_regressions import Caller, Pong
        if __name__ == "__main__":
            a = Pong.start_link()
            Caller.start_link(a)
            runtime.shutdown()
    """)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "peer answered pong" in out


def test_shutdown_wakes_a_thread_blocked_in_receive():
    from .test_node import run_script

    proc = run_script("""
        import threading, runtime
        runtime.self()
        errors = []
        def waiter():
            try:
                runtime.receive()
            except runtime.ProcessError as exc:
                errors.append(exc)
        t = threading.Thread(target=waiter)
        t.start()
        node = runtime._node.current()
        from runtime.testing import wait_until
        wait_until(lambda: node.polling, what="the waiter to block in poll")
        runtime.shutdown()
        t.join(5)
        print("woken" if errors and not t.is_alive() else "still blocked")
    """)
    out, err = proc.communicate(timeout=60)
    assert out.strip() == "woken", err


def test_a_failed_fork_in_the_root_raises_in_the_caller_and_spares_the_node():
    node = _node.current()
    worker, ref = runtime.spawn_monitor(time.sleep, 60)
    root = node.root.os_pid
    old = resource.prlimit(root, resource.RLIMIT_NOFILE)
    used = len(os.listdir(f"/proc/{root}/fd"))
    resource.prlimit(root, resource.RLIMIT_NOFILE, (used, old[1]))
    try:
        with pytest.raises(OSError):
            runtime.spawn(time.sleep, 60)
    finally:
        resource.prlimit(root, resource.RLIMIT_NOFILE, old)
    assert runtime.is_alive(node.root) and runtime.is_alive(worker)
    other, ref2 = runtime.spawn_monitor(time.sleep, 60)
    for pid, r in ((worker, ref), (other, ref2)):
        runtime.exit(pid, "kill")
        wait_down(r)
