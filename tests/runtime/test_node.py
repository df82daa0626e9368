"""The node as a whole: no orphans, no files left, an authenticated private transport."""

from __future__ import annotations

import os
import pickle
import resource
import signal
import socket
import stat
import struct
import subprocess
import sys
import textwrap
import time

import psutil

import runtime
from runtime import _embed
from runtime.testing import assert_receive, is_zombie, tagged, wait_down, wait_until

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_script(code: str, *args: str, env: dict | None = None) -> subprocess.Popen:
    full_env = dict(os.environ, PYTHONPATH=REPO)
    full_env.update(env or {})
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env, cwd=REPO,
    )


EMBEDDER = """
    import os, sys, time
    import runtime

    def sleeper():
        time.sleep(600)  # sleep-ok: a process that blocks

    def parent_of_two():
        runtime.spawn(sleeper)
        runtime.spawn(sleeper, link=True)
        time.sleep(600)  # sleep-ok: a process that blocks

    class Server(runtime.GenServer):
        def init(self, arg):
            runtime.trap_exit(True)
            runtime.spawn(parent_of_two)
            return arg
        def handle_call(self, request, from_, state):
            return runtime.Reply(runtime.self(), state)

    if __name__ == "__main__":
        Server.start_link(None, name="server")
        runtime.spawn(parent_of_two)
        runtime.spawn(sleeper, link=True)
        runtime.call("server", "hello")
        node = runtime._embed.current()
        print(node.info.dir, flush=True)
        print("ready", flush=True)
        time.sleep(600)  # sleep-ok: a process that blocks
"""


def _running(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def test_sigkill_of_the_embedding_process_leaves_no_process_and_no_file():
    proc = run_script(EMBEDDER)
    try:
        node_dir = proc.stdout.readline().strip()
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        # root, server, 2 x parent_of_two, 4 sleepers under them, 1 more sleeper
        family = wait_until(lambda: len(_descendants(proc.pid)) >= 9 and _descendants(proc.pid),
                            what="the whole tree to start")
        assert os.path.isdir(node_dir)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        # "every process it started dies within a second": the bound is the contract
        wait_until(lambda: not [p for p in family if _running(p)], timeout=1.0,
                   what="every process of the killed node to die")
        wait_until(lambda: not os.path.exists(node_dir), timeout=2.0, what="the node dir to go")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for p in _descendants(proc.pid):
            p.kill()
        proc.stdout.close()
        proc.stderr.close()


def test_a_script_without_a_main_guard_works():
    proc = run_script("""
        import runtime
        def double(parent, x):
            runtime.send(parent, x * 2)
        runtime.spawn(double, runtime.self(), 21)
        print(runtime.receive(timeout=30))
    """)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.strip() == "42"


def test_interpreter_exit_stops_every_process_and_removes_the_node_dir():
    proc = run_script("""
        import time, runtime
        def sleeper():
            time.sleep(600)  # sleep-ok: a process that blocks
        for _ in range(3):
            runtime.spawn(sleeper)
        print(runtime._embed.current().info.dir)
        print(" ".join(str(p.pid) for p in __import__("psutil").Process().children(recursive=True)))
    """)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    node_dir, pids = out.splitlines()
    assert not os.path.exists(node_dir)
    assert not [p for p in map(int, pids.split()) if psutil.pid_exists(p)
                and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


def test_the_spawn_start_method_runs_the_same_programs():
    proc = run_script("""
        import os, runtime

        class Echo(runtime.GenServer):
            def handle_call(self, request, from_, state):
                return runtime.Reply((request, os.getpid()), state)

        def crash():
            raise KeyError("under spawn")

        def grandparent(parent):
            child = runtime.spawn(lambda: runtime.send(parent, ("grandchild", os.getppid())))
            runtime.send(parent, ("parent", os.getpid()))
            runtime.receive(timeout=30)

        if __name__ == "__main__":
            runtime.configure(start_method="spawn")
            server = Echo.start_link()
            assert runtime.call(server, "hi")[0] == "hi"
            pid, ref = runtime.spawn_monitor(crash)
            down = runtime.receive(timeout=30)
            assert isinstance(down.reason, runtime.Crash), down
            assert "under spawn" in down.reason.traceback
            gp = runtime.spawn(grandparent, runtime.self())
            got = dict(runtime.receive(timeout=30) for _ in range(2))
            assert got["grandchild"] == got["parent"] == gp.os_pid
            import multiprocessing
            print("ok", runtime._embed.current().info.start_method)
    """)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert out.strip() == "ok spawn"


def test_the_node_directory_is_private():
    node = _embed.current()
    mode = os.stat(node.info.dir).st_mode
    assert stat.S_IMODE(mode) == 0o700


def test_a_connection_that_does_not_prove_the_key_is_dropped_before_unpickling(tmp_path):
    marker = tmp_path / "unpickled"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    me = runtime.self()

    def target(parent):
        runtime.send(parent, "ready")
        runtime.receive(timeout=30, match=lambda m: m == "stop")
        runtime.send(parent, "still fine")

    pid, ref = runtime.spawn_monitor(target, me)
    assert_receive("ready")
    node = _embed.current()
    payload = pickle.dumps((0, Evil()))
    hello = struct.pack("!4sQIIQ32s", b"RTH2", 999999, 0, os.getpid(), 1, b"\0" * 32)  # bad proof
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(node.info.sock_path(pid.serial))
        s.sendall(struct.pack("!I", len(payload)) + payload)  # no HELLO at all
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(node.info.sock_path(pid.serial))
        s.sendall(struct.pack("!I", len(hello)) + hello + struct.pack("!I", len(payload)) + payload)
    runtime.send(pid, "stop")
    assert_receive("still fine")
    wait_down(ref)
    assert not marker.exists()


def test_the_file_descriptor_limit_is_raised_for_many_processes():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert soft == hard


def test_the_embedding_process_does_not_leak_descriptors():
    runtime.self()
    before = len(os.listdir("/proc/self/fd"))

    class Tiny(runtime.GenServer):
        def handle_call(self, request, from_, state):
            return runtime.Reply(request, state)

    for _ in range(20):
        pid = Tiny.start_link()
        runtime.call(pid, 1)
        ref = runtime.monitor(pid)
        runtime.exit(pid, "kill")
        wait_down(ref)
        runtime.receive(timeout=5, match=lambda m: isinstance(m, runtime.Exit))
    after = len(os.listdir("/proc/self/fd"))
    assert after <= before + 2


def test_dead_processes_leave_no_socket_file():
    node = _embed.current()
    pid, ref = runtime.spawn_monitor(time.sleep, 60)
    path = node.info.sock_path(pid.serial)
    assert os.path.exists(path)
    os.kill(pid.os_pid, signal.SIGKILL)
    wait_down(ref)
    wait_until(lambda: not os.path.exists(path), what="the socket file to be removed")


def test_shutdown_stops_everything_and_a_new_node_starts_on_next_use():
    old = _embed.current()
    old_dir = old.info.dir
    pid, ref = runtime.spawn_monitor(time.sleep, 60)
    root = runtime.testing.root().os_pid
    runtime.shutdown()
    assert not os.path.exists(old_dir)
    assert not psutil.pid_exists(pid.os_pid) or psutil.Process(pid.os_pid).status() == "zombie"
    assert not psutil.pid_exists(root)
    new = _embed.current()
    assert new is not old and new.info.dir != old_dir
    assert not runtime.is_alive(pid)  # a Pid of the old node is dead in the new one
    runtime.send(pid, "dropped")  # and sends to it are dropped
    assert runtime.call(runtime.testing.root(), ("$ping",)) == "pong"


def test_processes_stopped_at_shutdown_run_terminate():
    proc = run_script("""
        import runtime
        class Noisy(runtime.GenServer):
            def init(self, arg):
                runtime.trap_exit(True)
                return arg
            def terminate(self, reason, state):
                print("terminate", reason, flush=True)
        if __name__ == "__main__":
            Noisy.start_link()
            runtime.shutdown()
            print("after shutdown", flush=True)
    """)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.splitlines() == ["terminate shutdown", "after shutdown"]


def test_descriptor_numbers_above_1024_work():
    """select() cannot watch fds >= 1024; the runtime must not depend on it."""
    filler = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        pid, ref = runtime.spawn_monitor(time.sleep, 60)
        assert runtime.is_alive(pid)

        class Echo(runtime.GenServer):
            def handle_call(self, request, from_, state):
                return runtime.Reply(request, state)

        server = Echo.start_link()
        assert runtime.call(server, "hi") == "hi"
        runtime.stop(server)
        runtime.exit(pid, "kill")
        assert wait_down(ref).reason == "killed"
        assert not runtime.is_alive(pid)
    finally:
        for fd in filler:
            os.close(fd)


def test_orphans_of_a_killed_process_die_and_are_reaped():
    me = runtime.self()

    def parent():
        kids = [runtime.spawn(time.sleep, 60) for _ in range(3)]
        runtime.send(me, ("kids", kids))
        time.sleep(60)  # sleep-ok: killed from outside

    pid, ref = runtime.spawn_monitor(parent)
    _, kids = assert_receive(tagged("kids"))
    refs = [runtime.monitor(k) for k in kids]
    os.kill(pid.os_pid, signal.SIGKILL)
    assert wait_down(ref).reason == "killed"
    assert {wait_down(r).reason for r in refs} == {"killed"}
    # (is_zombie: with psutil, a process reaped between two calls raised)
    wait_until(lambda: not any(is_zombie(k.os_pid) for k in kids),
               what="the orphans to be reaped")
    assert not any(runtime.is_alive(k) for k in kids)


def test_a_script_can_use_agents_with_functions_from_its_main_module():
    proc = run_script("""
        import runtime
        def add_one(state):
            return state + 1
        agent = runtime.Agent.start_link(lambda: 41)
        runtime.Agent.update(agent, add_one)
        print(runtime.Agent.get(agent, lambda s: s))
    """)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.strip() == "42"


def test_a_crash_is_logged_with_its_traceback_and_clean_exits_are_not():
    proc = run_script("""
        import runtime
        def explode():
            raise ValueError("logged on purpose")
        def quiet(reason):
            runtime.exit(runtime.self(), reason)
        if __name__ == "__main__":
            for fn, args in ((explode, ()), (quiet, ("shutdown",)), (quiet, (("shutdown", 1),)),
                             (lambda: None, ())):
                pid, ref = runtime.spawn_monitor(fn, *args)
                runtime.receive(timeout=30, match=lambda m: isinstance(m, runtime.Down))
    """)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert err.count("crashed") == 1, err
    assert "ValueError: logged on purpose" in err
    assert "Traceback (most recent call last)" in err and "in explode" in err


def test_an_outside_event_loop_can_wait_on_the_node():
    import select as sel

    node = _embed.current()
    me = runtime.self()

    def send_when_asked():
        runtime.receive(timeout=10, match=lambda m: m == "go")
        runtime.send(me, "for the event loop")

    # Asked only now: had it sent at once, the message could have arrived while spawn
    # waited for the root's answer, and nothing would be left for the event loop.
    runtime.send(runtime.spawn(send_when_asked), "go")
    poller = sel.poll()
    poller.register(node.fileno(), sel.POLLIN)
    assert poller.poll(10_000)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        node.pump()
        try:
            assert runtime.receive(timeout=0, match=lambda m: m == "for the event loop")
            break
        except TimeoutError:
            poller.poll(100)
    else:
        raise AssertionError("the message never arrived through pump()")


def test_the_descriptor_bitmap_follows_the_descriptors():
    from runtime._poller import FdSet

    fds = FdSet()
    for fd in (3, 4, 5, 9, 300, 301):
        fds.add(fd)
    fds.discard(4)
    fds.discard(300)
    fds.discard(300)
    assert fds.numbers() == [3, 5, 9, 301]
    assert fds.runs() == [(3, 4), (5, 6), (9, 10), (301, 302)]


def _kills_its_child_then_idles(main):
    child = runtime.spawn(time.sleep, 3600)
    ref = runtime.monitor(child)
    os.kill(child.os_pid, signal.SIGKILL)
    assert runtime.receive(timeout=10, match=lambda m: isinstance(m, runtime.Down)).ref == ref
    path = _embed.current().info.sock_path(child.serial)
    runtime.send(main, ("dead child", child.os_pid, path))
    runtime.receive(timeout=10, match=lambda m: m == "done")  # idle: no event to handle


def test_a_dead_child_is_cleaned_up_while_its_parent_idles_in_receive():
    # The cleanup of a child killed by a signal (reaping it, removing its socket file)
    # waits for an idle moment of its parent, which then is inside a receive that is
    # never satisfied: cleanup must not wait for that receive to return.
    parent, ref = runtime.spawn_monitor(_kills_its_child_then_idles, runtime.self())
    _, os_pid, path = assert_receive(tagged("dead child"))
    wait_until(lambda: not is_zombie(os_pid) and not os.path.exists(path),
               what="the killed child to be reaped and its socket file removed")
    runtime.send(parent, "done")
    assert wait_down(ref).reason == "normal"


def _signal_a_child(signo):
    """In a runtime process on one CPU (where the parent wakes while its child is
    still exiting): start a child, send it ``signo``, return its Down's reason."""
    child = runtime.spawn(time.sleep, 3600)
    ref = runtime.monitor(child)
    os.kill(child.os_pid, signo)
    return wait_down(ref).reason


def _kills_its_children_by_signal(main):
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # children inherit it
    reasons = [_signal_a_child(s) for s in (signal.SIGKILL, signal.SIGTERM, signal.SIGKILL)]
    runtime.send(main, ("reasons", reasons))


def test_a_parent_reads_the_true_signal_of_a_dying_child():
    # A parent woken by its child's sentinel usually finds it in the middle of its
    # exit on one CPU, not waitable yet: it reads the status from /proc then.
    parent, ref = runtime.spawn_monitor(_kills_its_children_by_signal, runtime.self())
    assert assert_receive(tagged("reasons"))[1] == ["killed", "SIGTERM", "killed"]
    assert wait_down(ref).reason == "normal"


def _ticker(dest):
    for _ in range(50_000):  # at most ~15-30 s; stopped long before
        runtime.send(dest, "tick")
        time.sleep(0.0003)  # sleep-ok: a steady stream of messages, never 1 ms apart


def _kills_its_children_then_serves(main):
    children = [runtime.spawn(time.sleep, 3600) for _ in range(3)]
    refs = [runtime.monitor(c) for c in children]
    for c in children:
        os.kill(c.os_pid, signal.SIGKILL)
    for ref in refs:
        runtime.receive(timeout=10, match=lambda m, ref=ref: isinstance(m, runtime.Down)
                        and m.ref == ref)
    info = _embed.current().info
    runtime.send(main, ("dead children", [(c.os_pid, info.sock_path(c.serial))
                                          for c in children]))
    while runtime.receive(timeout=10) != "done":
        pass  # a tick: never idle for a millisecond


def test_dead_children_are_cleaned_up_while_their_parent_is_never_idle():
    parent, ref = runtime.spawn_monitor(_kills_its_children_then_serves, runtime.self())
    ticker = runtime.spawn(_ticker, parent)
    _, dead = assert_receive(tagged("dead children"))
    wait_until(lambda: not any(is_zombie(p) or os.path.exists(path) for p, path in dead),
               what="the killed children to be cleaned up under a stream of messages")
    runtime.exit(ticker, "kill")
    runtime.send(parent, "done")
    assert wait_down(ref).reason == "normal"
