"""Regression tests for bugs found in the runtime's core. Each failed on 54ac191,
except the two marked "passes on 54ac191" (kept as guards).

Public API only, except for the few internal values below, each read through one
helper so that a rewrite of the core has one place to adapt. A bug that hangs a
process or wedges the node is tested in a subprocess with a bounded wait.
"""

from __future__ import annotations

import math
import os
import select
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time

import psutil
import pytest

import runtime
from runtime.testing import assert_receive, tagged, wait_down, wait_until

from .test_node import REPO, run_script
from .test_regressions import _another_thread_polls as another_thread_polls

# ------------------------------------------------ the internals this file reads


def node_info():
    """The node's shared record (NodeInfo)."""
    return runtime._embed.current().info


def node_dir() -> str:
    """The node's directory (under /dev/shm)."""
    return node_info().dir


def sock_path(pid: runtime.Pid) -> str:
    """The path of the Unix socket ``pid`` listens on."""
    return node_info().sock_path(pid.serial)


def root_pid() -> runtime.Pid:
    """The Pid of the node's root process (the one that forks what main spawns)."""
    return runtime.testing.root()


# ------------------------------------------------------------------ helpers


def wait_os_exit(os_pid: int, timeout: float = 10.0) -> None:
    """Wait, without the runtime, until OS process ``os_pid`` has exited (a zombie
    counts): a pidfd is readable once it has."""
    try:
        fd = os.pidfd_open(os_pid)
    except ProcessLookupError:
        return
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        if not poller.poll(timeout * 1000):
            raise AssertionError(f"OS process {os_pid} did not exit within {timeout}s")
    finally:
        os.close(fd)


def kill_and_wait(*pids: runtime.Pid) -> None:
    """Kill ``pids`` (dead ones are fine) and wait for each one's Down."""
    refs = [runtime.monitor(pid) for pid in pids]
    for pid in pids:
        runtime.exit(pid, "kill")
    for ref in refs:
        wait_down(ref)


def finish(proc: subprocess.Popen, timeout: float) -> tuple[str, str, bool]:
    """(stdout, stderr, hung) of a script; a script still running after ``timeout``
    seconds is killed (its root then stops its node and removes its directory)."""
    try:
        out, err = proc.communicate(timeout=timeout)
        return out, err, False
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate(timeout=30)
        return out, err, True


def _running(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class Echo(runtime.GenServer):
    def handle_call(self, request, from_, state):
        return runtime.Reply(request, state)


def _sends_then_exits(main, msg):
    runtime.send(main, msg)


# ------------------------------------------------------------------ bug 1


CTRL_C_STORM = """
    import os, signal, subprocess, sys, time
    import runtime

    class Echo(runtime.GenServer):
        def handle_call(self, request, from_, state):
            return runtime.Reply(request, state)

    # A second process sends SIGINT in a tight loop, bounded in count and time, at a
    # random pace so that signals land everywhere in the runtime's wait.
    STORM = '''
    import os, random, signal, sys, time
    target = int(sys.argv[1])
    sys.stdin.readline()
    end = time.monotonic() + 3
    sent = 0
    try:
        while sent < 200_000 and time.monotonic() < end:
            os.kill(target, signal.SIGINT)
            sent += 1
            for _ in range(random.randrange(400)):
                pass
    except ProcessLookupError:
        pass
    print(sent)
    '''

    # Ctrl-C raises KeyboardInterrupt, here once per try block: one interrupt never
    # lands in the handler of the one before (only the runtime is under test).
    armed = [False]

    def on_sigint(signo, frame):
        if armed[0]:
            armed[0] = False
            raise KeyboardInterrupt

    if __name__ == "__main__":
        server = Echo.start_link(None)
        signal.signal(signal.SIGINT, on_sigint)
        storm = subprocess.Popen([sys.executable, "-c", STORM, str(os.getpid())],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        storm.stdin.write("go\\n")
        storm.stdin.flush()
        interrupted = answered = timed_out = 0
        while storm.poll() is None:
            try:
                armed[0] = True
                runtime.call(server, "ping", timeout=1)
                armed[0] = False
                answered += 1
            except KeyboardInterrupt:
                interrupted += 1
            except runtime.CallTimeout:
                armed[0] = False
                timed_out += 1
        armed[0] = False
        print("storm", storm.stdout.read().strip(), "signals;", answered, "answered,",
              interrupted, "interrupted,", timed_out, "timed out", flush=True)
        print("after the storm:", runtime.call(server, "ping", timeout=3), flush=True)
        print("done", time.monotonic(), flush=True)
"""


def test_calls_work_and_the_program_exits_promptly_after_a_ctrl_c_storm():
    # bug 1: a KeyboardInterrupt in the runtime's wait leaves its polling flag set
    proc = run_script(CTRL_C_STORM)
    out, err, hung = finish(proc, 40)
    ended = time.monotonic()
    assert not hung, f"the script hung after the storm:\n{out}\n{err[-3000:]}"
    assert "after the storm: ping" in out, f"{out}\n{err[-3000:]}"
    assert proc.returncode == 0, f"{out}\n{err[-3000:]}"
    done = float(out.split("done ")[1].split()[0])
    assert ended - done < 5.0, f"the script took {ended - done:.1f}s to exit\n{err[-3000:]}"


# ------------------------------------------------------------------ bug 2


def test_a_dead_process_s_last_message_comes_before_its_noproc_down_while_another_thread_receives():
    # bug 2: a Down overtakes a dead process's last message (passes on 54ac191; fails on 1a4d754^)
    me = runtime.self()
    overtaken, rounds = [], 0
    deadline = time.monotonic() + 5
    with another_thread_polls():
        for i in range(1500):
            if time.monotonic() > deadline:
                break
            rounds += 1
            last = ("last words", i)
            pid = runtime.spawn(runtime.send, me, last)  # (imports nothing in the child)
            wait_os_exit(pid.os_pid)
            ref = runtime.monitor(pid)
            first = runtime.receive(timeout=10, match=lambda m, last=last, ref=ref: m == last or (
                isinstance(m, runtime.Down) and m.ref == ref))
            if isinstance(first, runtime.Down):
                overtaken.append(i)
                assert_receive(last)
            else:
                assert wait_down(ref).reason == "noproc"
    assert not overtaken, f"{len(overtaken)} of {rounds} Downs came before the last message"


# ------------------------------------------------------------------ bug 3


class Offloads(runtime.GenServer):
    """Works on a call in a thread of its own; the result comes back as a message."""

    def handle_call(self, request, from_, state):
        def work():
            time.sleep(0.1)  # sleep-ok: the work takes a while; the server idles meanwhile
            runtime.send(runtime.self(), ("result", from_, request * 2))

        threading.Thread(target=work, daemon=True).start()
        return runtime.NoReply(state)

    def handle_info(self, msg, state):
        if isinstance(msg, tuple) and msg and msg[0] == "result":
            runtime.reply(msg[1], msg[2])
            return runtime.NoReply(state)
        return super().handle_info(msg, state)


def test_a_message_a_thread_of_a_runtime_process_sends_to_its_own_process_wakes_it():
    # bug 3: a thread inside a runtime process that sends to its own process wakes nobody
    server = Offloads.start(None)
    try:
        for n in range(3):
            assert runtime.call(server, n, timeout=5) == 2 * n
    finally:
        kill_and_wait(server)


# ------------------------------------------------------------------ bug 4


RECEIVE_MATCH_USES_THE_RUNTIME = """
    import sys
    import runtime

    def waits():
        runtime.receive(timeout=30)

    if __name__ == "__main__":
        which = sys.argv[1]
        other = runtime.spawn(waits)
        runtime.register("core-bugs-other", other)
        me = runtime.self()
        runtime.send(me, "hello")
        uses = {
            "is_alive": lambda: runtime.is_alive(other),
            "whereis": lambda: runtime.whereis("core-bugs-other"),
            "send": lambda: runtime.send(me, "from match"),
            "monitor": lambda: runtime.monitor(other),
        }

        def match(m):
            uses[which]()
            return m == "hello"

        print(which, "received", runtime.receive(timeout=5, match=match), flush=True)
        runtime.exit(other, "kill")
"""


def test_a_receive_match_in_the_embedding_process_may_call_the_runtime():
    # bug 4: receive(match=...) in the embedding process calls match under the node lock
    uses = ["is_alive", "whereis", "send", "monitor"]
    procs = {use: run_script(RECEIVE_MATCH_USES_THE_RUNTIME, use) for use in uses}
    hung, failed = [], []
    deadline = time.monotonic() + 15  # the scripts run at the same time
    for use, proc in procs.items():
        out, err, timed_out = finish(proc, max(0.1, deadline - time.monotonic()))
        if timed_out:
            hung.append(use)
        elif f"{use} received hello" not in out or proc.returncode != 0:
            failed.append((use, out, err[-2000:]))
    assert not hung, f"receive hung with a match that calls runtime.{hung}"
    assert not failed, failed


# ------------------------------------------------------------------ bug 5


HOLDER_MODULE = """
    import threading, time
    import runtime

    lock = threading.Lock()
    _taken = threading.Event()


    def _hold():
        with lock:
            _taken.set()
            time.sleep(0.5)  # sleep-ok: the module's thread holds its lock a while
        time.sleep(10)  # sleep-ok: then lives on in the background (bounded)


    threading.Thread(target=_hold, daemon=True).start()
    _taken.wait(5)


    def try_lock(main, i):
        runtime.send(main, ("lock", i, lock.acquire(timeout=2)))
"""

ROOT_RUNS_USER_CODE = """
    import psutil
    import runtime
    from core_bugs_holder import try_lock
    from tests.runtime.test_core_bugs import root_pid

    if __name__ == "__main__":
        me = runtime.self()
        for i in range(3):
            runtime.spawn(try_lock, me, i)
        print("root threads", psutil.Process(root_pid().os_pid).num_threads(), flush=True)
        got = [runtime.receive(timeout=15, match=lambda m: m[0] == "lock") for _ in range(3)]
        print("locks", sorted(got), flush=True)
"""


def test_the_root_runs_no_user_code_so_children_never_inherit_a_held_lock(tmp_path):
    # bug 5: the root unpickles spawn targets itself, importing (and running) user modules
    (tmp_path / "core_bugs_holder.py").write_text(textwrap.dedent(HOLDER_MODULE))
    proc = run_script(ROOT_RUNS_USER_CODE, env={"PYTHONPATH": f"{REPO}:{tmp_path}"})
    out, err, hung = finish(proc, 40)
    assert not hung and proc.returncode == 0, f"{out}\n{err[-3000:]}"
    assert "root threads 1\n" in out, out
    assert "locks [('lock', 0, True), ('lock', 1, True), ('lock', 2, True)]" in out, out


# ------------------------------------------------------------------ bug 6


OTHER_PID_NAMESPACE = """
    import os, subprocess, sys, time
    import runtime
    from tests.runtime.test_core_bugs import node_dir

    # A /dev/shm of our own (this runs in a mount namespace of its own): the node
    # started in the other PID namespace must not see, nor remove, other users' nodes.
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=1777", "tmpfs", "/dev/shm"], check=True)

    def registers_and_waits(main):
        runtime.register("core-bugs-pidns", runtime.self())
        runtime.send(main, "registered")
        runtime.receive(timeout=30)

    OTHER = "import runtime; from tests.runtime.test_core_bugs import node_dir; " \\
            "runtime.self(); print(node_dir())"

    if __name__ == "__main__":
        me = runtime.self()
        mine = node_dir()
        other = subprocess.run(
            ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", OTHER],
            capture_output=True, text=True, timeout=60)
        print("other node", other.returncode, other.stdout.strip(), other.stderr[-2000:],
              flush=True)
        print("our node dir exists:", os.path.isdir(mine), flush=True)
        pid = runtime.spawn(registers_and_waits, me)
        print("spawned", flush=True)
        runtime.receive(timeout=10, match=lambda m: m == "registered")
        print("whereis works:", runtime.whereis("core-bugs-pidns") == pid, flush=True)
        runtime.send(pid, "bye")
"""


def test_a_node_in_another_pid_namespace_leaves_the_nodes_it_cannot_see_alone():
    # bug 6: stale-node cleanup deletes live nodes of another PID namespace
    # The whole scene runs in a private mount namespace with its own /dev/shm: the
    # bug removes every node it cannot see, which here would include those of other
    # test runs on this machine.
    probe = subprocess.run(["unshare", "--mount", "--pid", "--fork", "--mount-proc", "true"],
                           capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"unshare is not permitted here: {probe.stderr.strip()}")
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", sys.executable, "-c",
         textwrap.dedent(OTHER_PID_NAMESPACE)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
    )
    out, err, hung = finish(proc, 60)
    if "mount" in err and "spawned" not in out and "other node" not in out:
        pytest.skip(f"cannot mount a private /dev/shm: {err[-500:]}")
    assert "other node 0 " in out, f"{out}\n{err[-3000:]}"
    assert "our node dir exists: True" in out, f"{out}\n{err[-3000:]}"
    assert "whereis works: True" in out, f"{out}\n{err[-3000:]}"
    assert not hung and proc.returncode == 0, f"{out}\n{err[-3000:]}"


# ------------------------------------------------------------------ bug 8


class StopsItself(runtime.GenServer):
    def handle_call(self, request, from_, state):
        try:
            runtime.stop(runtime.self(), timeout=60)
        except runtime.ProcessError as exc:
            return runtime.Reply(type(exc), state)
        return runtime.Reply(None, state)


def test_stop_of_oneself_fails_at_once_with_a_process_error():
    # bug 8: runtime.stop(runtime.self()) in a GenServer waits the whole timeout, then CallTimeout
    server = StopsItself.start(None)
    try:
        error = runtime.call(server, "stop yourself", timeout=10)
        assert isinstance(error, type) and issubclass(error, runtime.ProcessError), error
        assert not issubclass(error, runtime.CallTimeout), error
    finally:
        kill_and_wait(server)


# ------------------------------------------------------------------ bug 9


def _crash(i):
    raise ValueError(f"crash number {i}")


def _count_files(top: str) -> int:
    return sum(len(files) for _, _, files in os.walk(top))


def test_crash_reasons_do_not_pile_up_as_files_in_the_node_directory():
    # bug 9: uncommon exit reasons are written as files in the node directory and kept
    runtime.self()
    before = _count_files(node_dir())
    for i in range(300):
        # int() as the target: spawned from the embedding process, a function of this
        # module would import it (and pytest) in every new process.
        _, ref = runtime.spawn_monitor(int, f"crash number {i}")
        reason = wait_down(ref).reason
        assert isinstance(reason, runtime.Crash), reason
        assert reason.exc_type.endswith("ValueError") and f"'crash number {i}'" in reason.message
    grown = _count_files(node_dir()) - before
    assert grown < 100, f"300 crashes left {grown} more files in the node directory"


# ------------------------------------------------------------------ bug 10


def _sends_on_go_then_exits(main, msg):
    runtime.receive(timeout=10, match=lambda m: m == "go")
    runtime.send(main, msg)


def test_receive_with_timeout_0_takes_a_message_that_has_already_arrived():
    # bug 10: receive(timeout=0) only looks at the in-memory mailbox, not the socket
    msg = ("arrived", os.urandom(8).hex())
    pid = runtime.spawn(_sends_on_go_then_exits, runtime.self(), msg)
    runtime.send(pid, "go")  # (the message must not arrive while spawn still waits)
    wait_os_exit(pid.os_pid)
    try:
        assert runtime.receive(timeout=0, match=lambda m: m == msg) == msg
    except runtime.ReceiveTimeout:
        assert_receive(msg)  # take it out of the way of the next tests
        raise


def test_a_call_with_timeout_0_polls_once_and_the_next_call_works():
    # bug 10: call with timeout=0 polls once, as OTP's `after 0`: it returns a reply
    # that is already there (the server may have answered during the poll), else it
    # raises CallTimeout; never anything else (passes on 54ac191)
    server = Echo.start(None)
    try:
        for n in range(5):  # the first one before main has ever talked to the server
            try:
                assert runtime.call(server, ("zero", n), timeout=0) == ("zero", n)
            except runtime.CallTimeout:
                pass
            assert runtime.call(server, ("after", n), timeout=5) == ("after", n)
    finally:
        kill_and_wait(server)


# ------------------------------------------------------------------ bug 11


def _sends_bytes(to, size):
    runtime.send(to, bytes(size))


def _reports_length(main):
    runtime.send(main, ("length", len(runtime.receive(timeout=60))))


def test_a_200_mb_message_arrives_in_linear_time():
    # bug 11: a large message costs quadratic time (200 MB did not arrive in 60 s)
    if psutil.virtual_memory().available < 4 * 2**30:
        pytest.skip("needs 4 GB of free memory")
    size = 200 * 2**20
    reporter = runtime.spawn(_reports_length, runtime.self())
    sender = runtime.spawn(_sends_bytes, reporter, size)
    try:
        # ~1 s when the cost is linear: 30 s only detects a hang
        assert assert_receive(tagged("length"), timeout=30) == ("length", size)
    finally:
        kill_and_wait(sender, reporter)


# ------------------------------------------------------------------ bug 12


SIGTERM_GROUP = """
    import time
    import runtime
    from tests.runtime.test_core_bugs import node_dir

    class Server(runtime.GenServer):
        def handle_call(self, request, from_, state):
            return runtime.Reply(request, state)

    def sleeper():
        time.sleep(60)  # sleep-ok: a process that blocks

    if __name__ == "__main__":
        server = Server.start_link(None)
        runtime.spawn(sleeper)
        runtime.spawn(sleeper, link=True)
        runtime.call(server, "hello")
        print(node_dir(), flush=True)
        print("ready", flush=True)
        time.sleep(60)  # sleep-ok: the program idles until it is terminated
"""


def test_sigterm_to_the_process_group_stops_every_process_and_removes_the_node_dir():
    # bug 12: SIGTERM to the process group leaves the node directory in /dev/shm
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(SIGTERM_GROUP)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONPATH=REPO), cwd=REPO, start_new_session=True,
    )
    directory = ""
    family: list[psutil.Process] = []
    try:
        directory = proc.stdout.readline().strip()
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()

        def whole_tree():  # the root, the server and two sleepers
            tree = psutil.Process(proc.pid).children(recursive=True)
            return tree if len(tree) >= 4 else None

        family = wait_until(whole_tree, what="the whole tree to start")
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
        wait_until(lambda: not [p for p in family if _running(p)], timeout=5.0,
                   what="every process of the group to be gone")
        wait_until(lambda: not os.path.exists(directory), timeout=5.0,
                   what=f"the node directory {directory} to be removed")
    finally:
        for p in family:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
        if directory.startswith("/") and os.path.basename(directory).startswith("rt-"):
            shutil.rmtree(directory, ignore_errors=True)


# ------------------------------------------------------------- smaller ones


@pytest.mark.parametrize("api", ["receive", "call", "stop"])
@pytest.mark.parametrize(("bad", "error"), [("x", TypeError), (math.nan, ValueError),
                                            (-1, ValueError)], ids=["str", "nan", "negative"])
def test_an_invalid_timeout_is_rejected_with_an_error_naming_it(api, bad, error):
    # timeouts are not validated: a str fails with an arithmetic TypeError, NaN and < 0 act as 0
    server = Echo.start(None)
    try:
        with pytest.raises(error, match="timeout"):
            if api == "receive":
                runtime.receive(timeout=bad)
            elif api == "call":
                runtime.call(server, "ping", timeout=bad)
            else:
                runtime.stop(server, timeout=bad)
        # rejected before anything was done: the server is still there
        assert runtime.call(server, "still there") == "still there"
    finally:
        kill_and_wait(server)


def test_an_unpicklable_message_is_reported_with_the_user_s_value_only():
    # error messages show internal frames: send(pid, Lock()) says "cannot send (0, <lock>)"
    pid = runtime.spawn(time.sleep, 60)
    try:
        with pytest.raises(TypeError) as info:
            runtime.send(pid, threading.Lock())
        assert "lock" in str(info.value)
        assert "(0," not in str(info.value), str(info.value)
    finally:
        kill_and_wait(pid)


def test_the_repr_of_the_node_s_records_does_not_show_the_node_key():
    # repr of the node's records prints the node key
    runtime.self()
    info = node_info()
    for text in (repr(info), str(info)):
        assert repr(info.key) not in text and info.key.hex() not in text, \
            "the node key is in " + text.replace(repr(info.key), "<the key>")


FULL_BACKLOG = """
    import os, socket, threading, time
    import runtime
    from runtime.testing import wait_until
    from tests.runtime.test_core_bugs import sock_path

    class Echo(runtime.GenServer):
        def handle_call(self, request, from_, state):
            return runtime.Reply(request, state)

    def wchan(thread):
        try:
            with open(f"/proc/self/task/{thread.native_id}/wchan") as f:
                return f.read()
        except OSError:
            return ""

    if __name__ == "__main__":
        server = Echo.start_link(None)
        runtime.call(server, "warm up")  # connected already
        sleeper = runtime.spawn(time.sleep, 60)
        path = sock_path(sleeper)
        wait_until(lambda: os.path.exists(path), what="the sleeper's socket")
        # Fill its listen backlog with raw connections that never authenticate.
        raw, full = [], False
        try:
            for _ in range(5000):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.setblocking(False)
                try:
                    s.connect(path)
                except BlockingIOError:
                    s.close()
                    full = True
                    break
                raw.append(s)
            print("backlog full:", full, len(raw), flush=True)
            sender = threading.Thread(target=runtime.send, args=(sleeper, "x"), daemon=True)
            sender.start()
            # bounded: proceed anyway if the send does not block in connect (a fix may not)
            try:
                wait_until(lambda: not sender.is_alive() or wchan(sender) == "unix_wait_for_peer",
                           timeout=3.0)
            except AssertionError:
                pass
            print("sender blocked in connect:", wchan(sender) == "unix_wait_for_peer", flush=True)
            start = time.monotonic()
            answer = runtime.call(server, "ping", timeout=3)
            print("call answered", answer, round(time.monotonic() - start, 3), flush=True)
        finally:
            for s in raw:
                s.close()
        runtime.exit(sleeper, "kill")
        sender.join(10)
        print("sender done:", not sender.is_alive(), flush=True)
"""


def test_a_send_stuck_on_a_full_listen_backlog_does_not_stall_other_threads():
    # _conn_to connects while holding the node lock: a full listen backlog stalls every thread
    proc = run_script(FULL_BACKLOG)
    out, err, hung = finish(proc, 30)
    if "backlog full: False" in out:
        pytest.skip(f"could not fill the listen backlog: {out}")
    assert "call answered ping" in out, f"hung: {hung}\n{out}\n{err[-3000:]}"
    assert not hung and proc.returncode == 0, f"{out}\n{err[-3000:]}"
