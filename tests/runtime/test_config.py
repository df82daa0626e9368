"""The runtime's options (``configure``, ``options``, the environment) and the
children the root starts ahead for the embedding process's spawns."""

from __future__ import annotations

import math
import os
import signal

import pytest

import runtime
from runtime import testing
from runtime.testing import assert_receive, tagged, wait_down, wait_until

from .test_node import run_script


class _Mute(runtime.GenServer):
    def handle_call(self, request, from_, state):
        return runtime.NoReply(state)


# ------------------------------------------------------------------- options


def test_options_shows_what_is_in_force():
    opts = runtime.options()
    assert isinstance(opts, runtime.Config)
    assert opts.start_method in ("fork", "spawn")
    assert opts.call_timeout == 5.0 and opts.warm_children == 2


def test_the_default_call_timeout_is_configurable_at_any_time():
    pid = _Mute.start_link(None)
    try:
        runtime.configure(call_timeout=0.2)
        assert runtime.options().call_timeout == 0.2
        with pytest.raises(runtime.CallTimeout, match="0.2"):
            runtime.call(pid, "hi")
        with pytest.raises(runtime.CallTimeout):
            runtime.Agent.get(pid, lambda s: s)  # (Agent calls follow it too)
        runtime.configure(call_timeout=math.inf)
        assert runtime.options().call_timeout is None
    finally:
        runtime.configure(call_timeout=5.0)
        runtime.stop(pid)


@pytest.mark.parametrize("option, value, error", [
    ("warm_children", -1, ValueError), ("warm_children", 65, ValueError),
    ("warm_children", 1.5, TypeError), ("call_timeout", -1, ValueError),
    ("call_timeout", "5", TypeError), ("start_method", "forkserver", ValueError),
    ("node_dir", "/no/such/dir", ValueError), ("preload", "json", TypeError),
    ("warm_imports", 1, TypeError),
])
def test_configure_names_a_bad_option(option, value, error):
    with pytest.raises(error, match=option):
        runtime.configure(**{option: value})


def test_node_options_cannot_change_once_it_runs():
    runtime.self()
    with pytest.raises(runtime.ProcessError, match="before the runtime is first used"):
        runtime.configure(warm_children=0)


def test_the_environment_sets_options_and_a_bad_value_is_named():
    proc = run_script("""
        import runtime
        o = runtime.options()
        print(o.warm_children, o.call_timeout, o.start_method)
    """, env={"RUNTIME_WARM_CHILDREN": "0", "RUNTIME_CALL_TIMEOUT": "none",
              "RUNTIME_START_METHOD": "fork"})
    out, err = proc.communicate(timeout=60)
    assert out.split() == ["0", "None", "fork"], err
    proc = run_script("""
        import runtime
        try:
            runtime.spawn(len, "x")
        except ValueError as e:
            print(e)
    """, env={"RUNTIME_WARM_CHILDREN": "many"})
    out, err = proc.communicate(timeout=60)
    assert "RUNTIME_WARM_CHILDREN must be an int, got 'many'" in out, err
    proc = run_script("""
        import runtime
        print(runtime.options().warm_imports)
    """, env={"RUNTIME_WARM_IMPORTS": "off"})
    out, err = proc.communicate(timeout=60)
    assert out.split() == ["False"], err
    proc = run_script("""
        import runtime
        try:
            runtime.options()
        except ValueError as e:
            print(e)
    """, env={"RUNTIME_WARM_IMPORTS": "maybe"})
    out, err = proc.communicate(timeout=60)
    assert "RUNTIME_WARM_IMPORTS must be 1 or 0" in out, err


# ------------------------------------------------------------- warm children


def _report(parent):
    runtime.send(parent, ("ran", os.getpid(), os.getppid()))
    runtime.receive(timeout=30)


def _pool_full():
    runtime.self()  # (joins the node: the first test to run may be this one)
    return len(testing.warm_children()) == runtime.options().warm_children


def test_a_spawn_hands_over_a_child_started_ahead_and_the_pool_refills():
    wait_until(_pool_full, what="the pool of warm children")
    warm = testing.warm_children()
    assert not set(warm) & {p.os_pid for p in runtime.processes()}  # not listed yet
    pid = runtime.spawn(_report, runtime.self())
    _, os_pid, parent = assert_receive(tagged("ran"))
    assert os_pid == pid.os_pid == warm[0]  # the oldest one
    assert parent == testing.root().os_pid
    assert pid in runtime.processes()
    wait_until(_pool_full, what="the pool refilled")
    assert pid.os_pid not in testing.warm_children()
    ref = runtime.monitor(pid)
    runtime.send(pid, "go")
    assert wait_down(ref).reason == "normal"


def test_a_warm_child_spawned_linked_is_linked_and_its_crash_reason_is_true():
    wait_until(_pool_full, what="the pool of warm children")
    pid = runtime.spawn(_crash_when_told, link=True)
    # (the child records the link when it takes its target: an info() that overtook
    # the target can still show none)
    wait_until(lambda: runtime.self() in runtime.info(pid)["links"], what="the link")
    ref = runtime.monitor(pid)
    runtime.send(pid, "crash")
    down = wait_down(ref)
    assert isinstance(down.reason, runtime.Crash) and "told to" in str(down.reason)
    exit_msg = assert_receive(lambda m: isinstance(m, runtime.Exit) and m.pid == pid)
    assert exit_msg.reason == down.reason


def _crash_when_told():
    runtime.receive(timeout=30)
    raise RuntimeError("told to")


def test_a_dead_warm_child_is_skipped_and_replaced():
    wait_until(_pool_full, what="the pool of warm children")
    victim = testing.warm_children()[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: not os.path.exists(f"/proc/{victim}") or testing.is_zombie(victim),
               what="the warm child dead")
    pid = runtime.spawn(_report, runtime.self())
    _, os_pid, _ = assert_receive(tagged("ran"))
    assert os_pid != victim
    wait_until(_pool_full, what="the pool refilled")
    assert victim not in testing.warm_children()
    ref = runtime.monitor(pid)
    runtime.send(pid, "go")
    wait_down(ref)


def _own_code(parent):
    runtime.send(parent, ("busy", os.getpid()))
    signal.pause()  # in its own code, never in the runtime's, until it is killed


def test_a_child_busy_in_its_own_code_keeps_its_place_until_a_spawn_finds_none():
    # A child taken from the pool is replaced once it has settled (first waited in
    # the runtime) or exited; one that runs only its own code never tells, so the
    # pool is one short until a spawn finds it empty: that one is forked at once, and
    # then every child taken is replaced.
    want = runtime.options().warm_children
    busy = []
    for _ in range(want):
        wait_until(lambda: testing.warm_children(), what="a warm child")
        busy.append(runtime.spawn(_own_code, runtime.self()))
        assert_receive(tagged("busy"))
    wait_until(lambda: not testing.warm_children() and not testing.warm_serials(),
               what="the pool empty: every place held by a busy child")
    busy.append(runtime.spawn(_own_code, runtime.self()))  # forked at once
    assert_receive(tagged("busy"))
    wait_until(_pool_full, what="the pool refilled")
    refs = [runtime.monitor(pid) for pid in busy]
    for pid in busy:
        runtime.exit(pid, "kill")
    for ref in refs:
        assert wait_down(ref).reason == "killed"


def test_no_warm_children_when_turned_off_and_none_left_at_shutdown():
    proc = run_script("""
        import os, runtime, runtime.testing as t
        def report(parent):
            runtime.send(parent, os.getpid())
        runtime.spawn(report, runtime.self())
        runtime.receive(timeout=10)
        print(t.warm_children(), runtime.options().warm_children)
        root = t.root().os_pid
        runtime.shutdown()
        print(os.path.exists(f"/proc/{root}"))
    """, env={"RUNTIME_WARM_CHILDREN": "0"})
    out, err = proc.communicate(timeout=60)
    assert out.split("\n")[:2] == ["[] 0", "False"], err


def test_system_info_names_the_node_s_own_processes():
    info = runtime.system_info()
    assert isinstance(info, runtime.SystemInfo)
    assert info.node_dir == testing.node_dir() and os.path.isdir(info.node_dir)
    assert info.root == testing.root() and runtime.is_alive(info.root)
    assert info.janitor is not None and os.path.exists(f"/proc/{info.janitor}")
    wait_until(_pool_full, what="the pool of warm children")
    assert list(runtime.system_info().warm_children) == testing.warm_children()
    # From a runtime process: what it knows.
    me = runtime.self()
    runtime.spawn(lambda: runtime.send(me, ("seen", runtime.system_info())))
    _, seen = assert_receive(tagged("seen"))
    assert (seen.node_dir, seen.root, seen.janitor, seen.warm_children) == (
        info.node_dir, info.root, None, ())


# ------------------------------------------------- what warm children import ahead

WARM_IMPORTS = """
    import os, sys
    import runtime
    from runtime.testing import wait_until, warm_children

    def probe(parent):
        # (by value, from __main__: unpickling it imports nothing of the module)
        runtime.send(parent, ("probe", "learned_mod" in sys.modules))

    if __name__ == "__main__":
        me = runtime.self()
        want = runtime.options().warm_children
        wait_until(lambda: len(warm_children()) == want)
        import learned_mod
        runtime.spawn(learned_mod.target, me)
        print(runtime.receive(timeout=10))
        if len(sys.argv) > 1:  # from now on, importing learned_mod fails
            open(sys.argv[1], "w").close()
        seen = []
        for _ in range(2 * want + 2):
            wait_until(lambda: len(warm_children()) == want)
            runtime.spawn(probe, me)
            seen.append(runtime.receive(timeout=10)[1])
        print(seen)
        if len(sys.argv) > 1:
            _, ref = runtime.spawn_monitor(learned_mod.target, me)
            down = runtime.receive(timeout=10, match=lambda m: getattr(m, "ref", None) == ref)
            print(down.reason.exc_type)
        runtime.shutdown()
"""

LEARNED_MOD = """
    import os
    import sys
    import runtime

    if os.path.exists(os.environ.get("LEARNED_MOD_FLAG", "/nonexistent")):
        raise RuntimeError("learned_mod cannot be imported here")
    if os.path.exists(os.environ.get("LEARNED_MOD_EXIT", "/nonexistent")):
        os._exit(3)

    def target(parent):
        runtime.send(parent, "target ran")

    def configured(parent):
        # configures, then imports: what it imports in its body is not imported ahead
        os.environ["ENVCONF_MODE"] = "fast"
        import envconf_mod
        runtime.send(parent, ("mode", envconf_mod.MODE))

    def purges(parent):
        # drops modules it did not import (as a test suite may), then waits
        for name in [n for n in sys.modules if n.startswith("email")][:5] + ["learned_mod"]:
            sys.modules.pop(name, None)
        sys.modules["a_proxy"] = object()  # not a module
        runtime.send(parent, ("purged", runtime.receive(timeout=10)))
"""


def _run_learning(tmp_path, env=None, *args, script=WARM_IMPORTS):
    import textwrap

    from .test_node import REPO

    (tmp_path / "learned_mod.py").write_text(textwrap.dedent(LEARNED_MOD))
    (tmp_path / "envconf_mod.py").write_text(
        "import os\nMODE = os.environ.get('ENVCONF_MODE', 'default')\n")
    full_env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), REPO]),
                "LEARNED_MOD_FLAG": str(tmp_path / "flag"), **(env or {})}
    proc = run_script(script, *args, env=full_env)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    return out.splitlines(), err


def test_a_warm_child_imports_ahead_what_the_targets_before_it_imported(tmp_path):
    # A target from learned_mod ran in a warm child, which tells the root at its first
    # idle moment what it imported; the warm children the root forks after that import
    # it before they offer themselves (the ones forked before do not have it).
    lines, err = _run_learning(tmp_path)
    assert lines[0] == "target ran", err
    seen = eval(lines[1])
    assert seen[-1] is True and seen[-2] is True, (seen, err)


def test_warm_imports_off_imports_nothing_ahead(tmp_path):
    lines, err = _run_learning(tmp_path, {"RUNTIME_WARM_IMPORTS": "0"})
    assert lines[0] == "target ran", err
    assert eval(lines[1]) == [False] * len(eval(lines[1])), err


def test_a_module_that_fails_to_import_ahead_is_left_to_the_target(tmp_path):
    # The warm children's import of learned_mod fails from now on: they start all the
    # same, and a target that needs it crashes with the import's own error.
    lines, err = _run_learning(tmp_path, None, str(tmp_path / "flag"))
    assert lines[0] == "target ran", err
    assert eval(lines[1]) == [False] * len(eval(lines[1])), err
    assert lines[2] == "RuntimeError", err


LEARNED_EDGES = """
    import os, sys, time
    import runtime
    from runtime.testing import wait_until, warm_children

    def probe(parent):
        runtime.send(parent, ("probe", runtime.self().serial))

    if __name__ == "__main__":
        me = runtime.self()
        want = runtime.options().warm_children
        import learned_mod
        for _ in range(2 * want + 1):  # each in a warm child that imported learned_mod
            wait_until(lambda: len(warm_children()) == want)
            runtime.spawn(learned_mod.configured, me)
            print(runtime.receive(timeout=10)[1])
        wait_until(lambda: len(warm_children()) == want)
        pid = runtime.spawn(learned_mod.purges, me)
        runtime.send(pid, "still there")
        print(runtime.receive(timeout=10)[1])
        # From now on importing learned_mod kills the process that does.
        open(os.environ["LEARNED_MOD_EXIT"], "w").close()
        runtime.spawn(probe, me)
        first = runtime.receive(timeout=10)[1]
        time.sleep(1.0)  # sleep-ok: a window in which to count the root's forks
        runtime.spawn(probe, me)
        print(runtime.receive(timeout=10)[1] - first)
        runtime.shutdown()
"""


def test_what_warm_children_import_ahead_is_what_unpickling_a_target_imports(tmp_path):
    # Found by a review of the first version, which sent the root every module the
    # target had imported by its first idle moment: a target that configures (an
    # environment variable, sys.path) and then imports got modules imported ahead,
    # unconfigured; one that dropped modules from sys.modules got a ValueError out
    # of its own receive; and a module that exits at import made the root fork warm
    # children that died for the node's life (800 in 3 s).
    lines, err = _run_learning(tmp_path, {"LEARNED_MOD_EXIT": str(tmp_path / "exit")},
                               script=LEARNED_EDGES)
    want = 2 * 2 + 1
    assert lines[:want] == ["fast"] * want, (lines, err[-3000:])
    assert lines[want] == "still there", (lines, err[-3000:])
    forks = int(lines[want + 1])
    assert forks < 20, (f"{forks} processes started in a second: warm children that die "
                        f"importing ahead are replaced for ever", err[-3000:])
