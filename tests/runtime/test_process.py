"""spawn, self, send, receive, exit reasons, is_alive, Pid."""

from __future__ import annotations

import logging
import os
import pickle
import signal
import sys
import time

import pytest

import runtime
from runtime import _embed
from runtime.testing import assert_receive, tagged, wait_down, wait_until


def sleeper(seconds=60):
    time.sleep(seconds)  # sleep-ok: the behaviour under test is a process that blocks


def send_back(parent, value):
    runtime.send(parent, value)


def send_self_info(parent):
    runtime.send(parent, ("info", runtime.self(), os.getpid(), os.getppid()))


def raise_key_error():
    {}["missing-key"]


def wait_for_go_then_exit(parent):
    runtime.send(parent, ("ready", runtime.self()))
    runtime.receive(timeout=30, match=lambda m: m == "go")


def spawn_grandchild(parent):
    child = runtime.spawn(send_self_info, parent)
    runtime.send(parent, ("child", child))
    runtime.receive(timeout=30, match=lambda m: m == "stop")


def call_os_exit(code):
    os._exit(code)


def call_sys_exit(code):
    sys.exit(code)


def monitored(fn, *args):
    return runtime.spawn_monitor(fn, *args)


# --------------------------------------------------------------------------- spawn


def test_returning_function_exits_with_reason_normal():
    me = runtime.self()
    pid = runtime.spawn(wait_for_go_then_exit, me)
    ref = runtime.monitor(pid)
    assert_receive(("ready", pid))
    runtime.send(pid, "go")
    down = wait_down(ref)
    assert down.pid == pid and down.reason == "normal"


def test_spawned_process_is_a_separate_os_process():
    me = runtime.self()
    pid = runtime.spawn(send_self_info, me)
    msg = assert_receive(tagged("info"))
    assert msg[1] == pid
    assert msg[2] == pid.os_pid != os.getpid()


def test_spawn_from_a_runtime_process_forks_its_own_child():
    me = runtime.self()
    parent = runtime.spawn(spawn_grandchild, me)
    _, child = assert_receive(tagged("child"))
    info = assert_receive(tagged("info"))
    assert info[1] == child
    assert info[3] == parent.os_pid  # the OS tree mirrors who started whom
    ref = runtime.monitor(child)
    runtime.send(parent, "stop")
    wait_down(ref)


def test_spawn_runs_lambdas_and_closures_from_the_embedding_process():
    me = runtime.self()
    token = object.__repr__(object())
    runtime.spawn(lambda: runtime.send(me, ("closure", token)))
    assert_receive(("closure", token))


def test_a_target_from_a_module_cloudpickle_sends_by_value_runs_where_it_cannot_be_imported(
        tmp_path, monkeypatch):
    # A target importable by name travels as plain pickle, by name; a module the user
    # registered with cloudpickle.register_pickle_by_value travels by value, so its
    # functions run where the module is not importable (the new process's sys.path,
    # the root's, lacks tmp_path).
    import cloudpickle

    runtime.self()
    (tmp_path / "by_value_mod.py").write_text(
        "import runtime\n\ndef target(parent, token):\n"
        "    runtime.send(parent, ('by value', token))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import by_value_mod

    cloudpickle.register_pickle_by_value(by_value_mod)
    try:
        runtime.spawn(by_value_mod.target, runtime.self(), 7)
        assert_receive(("by value", 7))
    finally:
        cloudpickle.unregister_pickle_by_value(by_value_mod)
        sys.modules.pop("by_value_mod", None)


def test_spawn_rejects_a_non_callable():
    with pytest.raises(TypeError, match="callable"):
        runtime.spawn(42)


def test_spawn_rejects_an_unpicklable_target_with_a_clear_error():
    import threading

    lock = threading.Lock()
    with pytest.raises(TypeError, match="cannot send"):
        runtime.spawn(lambda: lock.acquire())


# ---------------------------------------------------------------- exit reasons


def test_crash_reason_carries_the_remote_traceback():
    pid, ref = monitored(raise_key_error)
    down = wait_down(ref)
    assert isinstance(down.reason, runtime.Crash)
    assert down.reason.exc_type == "KeyError"
    assert "missing-key" in down.reason.message
    assert "raise_key_error" in down.reason.traceback
    assert "Traceback (most recent call last)" in down.reason.traceback


def test_sigkill_is_reported_as_killed():
    pid, ref = monitored(sleeper)
    os.kill(pid.os_pid, signal.SIGKILL)
    assert wait_down(ref).reason == "killed"


def test_other_signals_are_reported_by_name():
    pid, ref = monitored(sleeper)
    os.kill(pid.os_pid, signal.SIGTERM)
    assert wait_down(ref).reason == "SIGTERM"


def test_os_exit_without_the_runtime_reports_its_exit_code():
    _, ref = monitored(call_os_exit, 3)
    assert wait_down(ref).reason == ("exit_code", 3)


def test_sys_exit_zero_is_normal_and_nonzero_is_a_crash():
    _, ref = monitored(call_sys_exit, 0)
    assert wait_down(ref).reason == "normal"
    _, ref = monitored(call_sys_exit, 4)
    reason = wait_down(ref).reason
    assert isinstance(reason, runtime.Crash) and reason.exc_type == "SystemExit"


def test_spawn_monitor_reports_the_true_reason_of_an_instant_exit():
    for _ in range(5):
        _, ref = runtime.spawn_monitor(call_os_exit, 7)
        assert wait_down(ref).reason == ("exit_code", 7)


def test_monitoring_a_dead_process_delivers_noproc_at_once():
    pid, ref = monitored(sleeper)
    runtime.exit(pid, "kill")
    wait_down(ref)
    ref2 = runtime.monitor(pid)
    down = assert_receive(lambda m: isinstance(m, runtime.Down) and m.ref == ref2, timeout=0.5)
    assert down.reason == "noproc"


def test_is_alive_follows_the_process():
    pid, ref = monitored(sleeper)
    assert runtime.is_alive(pid)
    runtime.exit(pid, "kill")
    wait_down(ref)
    assert not runtime.is_alive(pid)
    assert runtime.is_alive(runtime.self())


# ---------------------------------------------------------------- send/receive


def test_selective_receive_keeps_other_messages_in_order():
    me = runtime.self()
    for msg in ["a", ("b", 1), "c", ("b", 2), "d"]:
        runtime.send(me, msg)
    assert runtime.receive(timeout=1, match=lambda m: isinstance(m, tuple)) == ("b", 1)
    assert runtime.receive(timeout=1, match=lambda m: isinstance(m, tuple)) == ("b", 2)
    assert [runtime.receive(timeout=1) for _ in range(3)] == ["a", "c", "d"]


def test_messages_from_one_process_arrive_in_send_order():
    me = runtime.self()

    def burst(parent):
        for i in range(500):
            runtime.send(parent, ("n", i))

    runtime.spawn(burst, me)
    got = [runtime.receive(timeout=10, match=tagged("n"))[1] for _ in range(500)]
    assert got == list(range(500))


def test_receive_timeout_raises_a_timeout_error():
    with pytest.raises(TimeoutError):
        runtime.receive(timeout=0.05, match=lambda m: m == "never-sent")
    with pytest.raises(runtime.ReceiveTimeout):
        runtime.receive(timeout=0, match=lambda m: m == "never-sent")


def test_send_to_a_dead_pid_is_silently_dropped():
    pid, ref = monitored(sleeper)
    runtime.exit(pid, "kill")
    wait_down(ref)
    runtime.send(pid, "hello?")  # no error


def test_send_to_an_unregistered_name_raises():
    with pytest.raises(runtime.NoProcError):
        runtime.send("nobody-has-this-name", "hello?")


def test_large_messages_arrive_whole():
    me = runtime.self()
    blob = os.urandom(3 * 1024 * 1024)

    def echo(parent):
        data = runtime.receive(timeout=30)
        runtime.send(parent, ("echo", data))

    pid = runtime.spawn(echo, me)
    runtime.send(pid, blob)
    assert assert_receive(tagged("echo"))[1] == blob


def test_self_in_the_embedding_process_is_stable():
    assert runtime.self() == runtime.self()
    assert runtime.self().os_pid == os.getpid()


# ---------------------------------------------------------------------- Pid


def test_pid_is_hashable_picklable_and_readable():
    pid, ref = monitored(sleeper)
    clone = pickle.loads(pickle.dumps(pid))
    assert clone == pid and hash(clone) == hash(pid)
    assert {pid: 1}[clone] == 1
    assert repr(pid) == f"<Pid {pid.os_pid}.{pid.serial}>"
    runtime.exit(pid, "kill")
    wait_down(ref)


def test_a_new_process_never_equals_an_old_pid_even_with_the_same_os_pid():
    pid, ref = monitored(sleeper)
    runtime.exit(pid, "kill")
    wait_down(ref)
    fake = runtime.Pid(pid.node, pid.serial + 10**6, pid.slot, pid.os_pid)
    assert fake != pid
    assert not runtime.is_alive(fake)


def _fd_targets():
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass
    return out


def _socket_and_pipe_targets(fds):
    return {t for t in fds if t.startswith(("socket:", "pipe:"))}


def test_a_child_does_not_inherit_its_parents_runtime_descriptors():
    me = runtime.self()

    def report(parent):
        runtime.send(parent, ("child fds", _fd_targets()))

    def holder(parent):
        # Children, some gone, so the holder has sentinels and sockets with holes
        # between their numbers.
        gone = [runtime.spawn_monitor(int, "1") for _ in range(3)]
        for _ in range(3):
            runtime.spawn(time.sleep, 60)
        for _, ref in gone:
            runtime.receive(timeout=10, match=lambda m, ref=ref: getattr(m, "ref", None) == ref)
        runtime.spawn(time.sleep, 60)
        targets = _fd_targets()
        numbers = runtime._embed.current().descriptors().numbers()
        own = {targets[fd] for fd in numbers if fd in targets}
        runtime.spawn(report, parent)
        runtime.send(parent, ("holder runtime fds", own))
        runtime.receive(timeout=30, match=lambda m: m == "stop")

    pid = runtime.spawn(holder, me)
    child = assert_receive(tagged("child fds"))[1]
    holder_fds = assert_receive(tagged("holder runtime fds"))[1]
    ref = runtime.monitor(pid)
    runtime.send(pid, "stop")
    wait_down(ref)
    leaked = _socket_and_pipe_targets(holder_fds) & set(child.values())
    assert not leaked
    # stdin/out/err, the node table, its listening socket, the socket to its parent,
    # its sentinel, epoll
    assert len(child) <= 10, sorted(child.items())


def test_the_embedding_process_descriptors_never_reach_runtime_processes():
    r, w = os.pipe()
    try:
        mine = _socket_and_pipe_targets(_fd_targets().values())
        me = runtime.self()
        runtime.spawn(lambda: runtime.send(me, ("fds", _fd_targets())))
        theirs = set(assert_receive(tagged("fds"))[1].values())
        assert not mine & theirs
    finally:
        os.close(r)
        os.close(w)


def test_files_opened_by_a_runtime_process_stay_usable_in_its_children(tmp_path):
    if runtime._embed.current().info.start_method == "spawn":
        pytest.skip("under the spawn method a child inherits nothing from its parent")
    log_path = str(tmp_path / "app.log")
    me = runtime.self()

    def child(parent):
        runtime.send(parent, ("hello", 1))
        logging.getLogger("app-test").warning("the child logs")
        runtime.send(parent, ("hello", 2))

    def parent(main, path):
        handler = logging.FileHandler(path)
        logging.getLogger("app-test").addHandler(handler)
        pid, ref = runtime.spawn_monitor(child, main)
        runtime.receive(timeout=10, match=lambda m: isinstance(m, runtime.Down))
        handler.close()
        runtime.send(main, "parent done")

    runtime.spawn(parent, me, log_path)
    assert assert_receive(("hello", 1))
    assert assert_receive(("hello", 2))
    assert_receive("parent done")
    assert "the child logs" in open(log_path).read()


def test_runtime_processes_ignore_ctrl_c():
    pid, ref = monitored(sleeper)
    os.kill(pid.os_pid, signal.SIGINT)
    with pytest.raises(TimeoutError):
        runtime.receive(timeout=0.2, match=lambda m: isinstance(m, runtime.Down) and m.ref == ref)
    runtime.exit(pid, "kill")
    wait_down(ref)


def test_a_dead_process_leaves_no_zombie():
    pid, ref = monitored(sleeper)
    runtime.exit(pid, "kill")
    wait_down(ref)
    from runtime.testing import is_zombie, wait_until

    wait_until(lambda: not is_zombie(pid.os_pid), what="the dead process to be reaped")


def _fork_then_crash(parent):
    pid = os.fork()
    if pid == 0:  # a fork outside the runtime: it must not hide our death
        time.sleep(30)  # sleep-ok: a grandchild that lingers
        os._exit(0)
    runtime.send(parent, ("grandchild", pid))
    raise RuntimeError("crashed with a foreign fork alive")


def test_a_fork_outside_the_runtime_does_not_hide_a_death():
    me = runtime.self()

    def parent(main):
        pid, ref = runtime.spawn_monitor(_fork_then_crash, main)
        down = runtime.receive(timeout=10, match=lambda m: isinstance(m, runtime.Down))
        runtime.send(main, ("child down", down.reason))

    runtime.spawn(parent, me)
    _, grandchild = assert_receive(tagged("grandchild"))
    try:
        _, reason = assert_receive(tagged("child down"), timeout=5)
        assert isinstance(reason, runtime.Crash)
    finally:
        try:
            os.kill(grandchild, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_the_runtime_refuses_to_work_in_a_foreign_fork():
    runtime.self()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            runtime.self()
            os.write(w, b"worked")
        except runtime.ProcessError:
            os.write(w, b"refused")
        finally:
            os._exit(0)
    os.close(w)
    assert os.read(r, 10) == b"refused"
    os.close(r)
    os.waitpid(pid, 0)


def test_a_foreign_fork_keeps_none_of_the_nodes_descriptors():
    node = _embed.current()
    owned = [fd for fd in node.descriptors().numbers() if fd != node.table.fd]
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            # Each number is taken by /dev/null: the node's sockets, pidfds and pipes
            # are closed here, and a file opened now cannot get one of their numbers.
            targets = {os.readlink(f"/proc/self/fd/{fd}") for fd in owned}
            fresh = os.open(os.devnull, os.O_RDONLY)
            ok = targets == {os.devnull} and fresh not in owned
            os.write(w, b"ok" if ok else repr(targets).encode())
        finally:
            os._exit(0)
    os.close(w)
    answer = os.read(r, 4096)
    os.close(r)
    os.waitpid(pid, 0)
    assert answer == b"ok"


def test_configure_checks_its_options_and_refuses_once_the_node_runs():
    runtime.self()
    with pytest.raises(TypeError):
        runtime.configure(preload="json")
    with pytest.raises(ValueError):
        runtime.configure(start_method="forkserver")
    with pytest.raises(runtime.ProcessError):
        runtime.configure(preload=["json"])


_PRELOADED = """
import os, sys
with open(os.environ["IMPORT_LOG"], "a") as f:
    f.write(f"{os.getpid()}\\n")
if os.environ.get("START_A_THREAD"):
    import threading
    threading.Thread(target=threading.Event().wait, daemon=True).start()

def report(main):
    import runtime
    runtime.send(main, os.getpid())
"""


def _preload_script(tmp_path, **env):
    from .test_node import run_script

    (tmp_path / "preloaded_mod.py").write_text(_PRELOADED)
    log = tmp_path / "imports.log"
    proc = run_script("""
        import sys
        sys.path.insert(0, sys.argv[1])
        import runtime
        if __name__ == "__main__":
            runtime.configure(preload=["preloaded_mod"])
            import preloaded_mod
            me = runtime.self()
            for _ in range(3):
                runtime.spawn(preloaded_mod.report, me)
            print(sorted(runtime.receive(timeout=30) for _ in range(3)))
    """, str(tmp_path), env={"IMPORT_LOG": str(log), **env})
    out, err = proc.communicate(timeout=60)
    return proc.returncode, out, err, log.read_text().split()


def test_a_preloaded_module_is_imported_once_by_the_root_not_by_each_child(tmp_path):
    if os.environ.get("RUNTIME_START_METHOD") == "spawn":
        pytest.skip("under the spawn method every process is a fresh interpreter")
    code, out, err, imports = _preload_script(tmp_path)
    assert code == 0, err
    children = eval(out)
    assert len(imports) == 2  # here, and in the root
    assert not set(map(int, imports)) & set(children)


def test_a_preloaded_module_that_starts_a_thread_stops_the_node_from_starting(tmp_path):
    code, out, err, imports = _preload_script(tmp_path, START_A_THREAD="1")
    assert code != 0
    assert "preloading preloaded_mod left the node's root with 2 threads" in err


def test_processes_lists_the_node_s_live_processes():
    me = runtime.self()
    pid, ref = runtime.spawn_monitor(time.sleep, 60)
    listed = runtime.processes()
    assert me in listed and pid in listed
    assert runtime.testing.root() in listed
    runtime.exit(pid, "kill")
    wait_down(ref)
    assert pid not in runtime.processes()


class _Inspected(runtime.GenServer):
    def init(self, arg):
        runtime.trap_exit(True)
        self.watched = runtime.spawn(time.sleep, 60, link=True)
        runtime.monitor(arg)
        return arg

    def handle_call(self, request, from_, state):
        if request == "busy":
            time.sleep(1.0)  # sleep-ok: busy in its own code
        return runtime.Reply(request, state)


def test_info_reports_what_the_process_s_runtime_holds():
    me = runtime.self()
    server = _Inspected.start(me, name="inspected")
    try:
        runtime.send(server, "queued")  # not a call: stays in its mailbox
        facts = runtime.info(server)
        assert facts["pid"] == server and facts["os_pid"] == server.os_pid
        assert facts["names"] == ["inspected"]
        assert facts["status"] == "waiting" and facts["trap_exit"] is True
        assert facts["monitors"] == [me]
        assert len(facts["links"]) == 1 and facts["children"] == facts["links"]
        assert facts["memory"]["rss"] > 0
        mine = runtime.info(me)
        assert mine["status"] == "running" and mine["parent"] is None
    finally:
        runtime.stop(server, timeout=10)
    assert runtime.info(server) is None


def test_info_of_a_process_busy_in_its_own_code_says_so_without_waiting_long():
    server = _Inspected.start(runtime.self())
    try:
        import threading

        busy = threading.Thread(target=runtime.call, args=(server, "busy"))
        busy.start()
        wait_until(lambda: runtime.info(server, timeout=0.05)["status"] == "running",
                   what="the server to be busy")
        facts = runtime.info(server, timeout=0.05)
        assert facts["message_queue_len"] is None
        busy.join(10)
    finally:
        runtime.stop(server, timeout=10)


def test_the_node_directory_goes_where_configured_and_the_env_preloads(tmp_path):
    from .test_node import run_script

    (tmp_path / "light_mod.py").write_text("import os\nLOADED_IN = os.getpid()\n")
    proc = run_script("""
        import os, sys
        sys.path.insert(0, sys.argv[1])
        import runtime, runtime.testing
        if __name__ == "__main__":
            runtime.configure(node_dir=sys.argv[1])
            import light_mod
            def where(main):
                import light_mod
                runtime.send(main, light_mod.LOADED_IN)
            runtime.spawn(where, runtime.self())
            loaded_in = runtime.receive(timeout=30)
            print(runtime.testing.node_dir().startswith(sys.argv[1]),
                  loaded_in == runtime.testing.root().os_pid)
    """, str(tmp_path), env={"RUNTIME_PRELOAD": "light_mod"})
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    fork = os.environ.get("RUNTIME_START_METHOD", "fork") == "fork"
    assert out.split() == ["True", "True" if fork else "False"]
    assert not [p for p in os.listdir(tmp_path) if p.startswith("rt-")]


def test_a_crash_report_names_the_process(tmp_path):
    from .test_node import run_script

    proc = run_script("""
        import runtime
        class Fragile(runtime.GenServer):
            def handle_cast(self, request, state):
                raise ValueError("broken on purpose")
        if __name__ == "__main__":
            pid = Fragile.start(None, name="fragile")
            ref = runtime.monitor(pid)
            runtime.cast(pid, "go")
            runtime.receive(timeout=30, match=lambda m: getattr(m, "ref", None) == ref)
    """)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "(fragile) crashed: ValueError: broken on purpose" in err
    assert "Traceback (most recent call last)" in err
