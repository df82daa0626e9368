"""No orphans, whichever way a parent dies: every descendant is gone within one
second (psutil), and nothing of the node stays on disk.

The embedding service is a script that starts the kv tree with buckets, a
supervisor with workers that have children of their own, and a process with
two children. It then dies: SIGKILL, ``os._exit``, SIGTERM or SIGKILL to its whole
process group, under the fork and the spawn start methods. In the test's own
node: SIGKILL of a supervisor, and of a server in the middle of a long call.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import psutil
import pytest

import runtime
from runtime import testing
from runtime.testing import assert_receive, tagged, wait_down, wait_until

from . import _actors
from ._helpers import (
    kill_all,
    live_descendants,
    remove_node_dir,
    running,
    start_script,
)

# The contract: "every process it started dies within a second".
WITHIN = 1.0

SERVICE = """
    import os, sys, time
    import kv, runtime
    from runtime import child_spec, testing
    from tests.faults._actors import Worker, parent_of_two

    if __name__ == "__main__":
        kv.start()
        for i in range(3):
            kv.bucket.put(kv.registry.create("kv.registry", f"b{i}"), "k", i)
        runtime.Supervisor.start_link([child_spec.make(("worker", i), Worker.start_link, (i,))
                                       for i in range(2)], strategy="one_for_one")
        runtime.spawn(parent_of_two)
        # the root's children started ahead die with the rest: wait for them too (one:
        # parent_of_two, which never waits in the runtime, holds the other's place)
        testing.wait_until(lambda: len(testing.warm_children()) == 1, what="warm children")
        print(testing.node_dir(), flush=True)
        print("ready", flush=True)
        if sys.stdin.readline().strip() == "os._exit":
            os._exit(3)
        time.sleep(600)  # sleep-ok: the service idles until it is killed
"""
# root; kv.supervisor, kv.bucket_supervisor, kv.registry, 3 buckets, the bucket
# supervisor's zygote and its 2 children started ahead (runtime.keep_warm); a
# supervisor, 2 workers and their 2 children; parent_of_two and its 2 children; a
# warm child; the janitor
TREE = 1 + 3 + 3 + 1 + 2 + 1 + 2 + 2 + 1 + 2 + 1 + 1


WAYS = ["sigkill", "os._exit", "group sigterm", "group sigkill"]


@pytest.mark.parametrize("method", ["fork", "spawn"])
@pytest.mark.parametrize("way", WAYS)
def test_when_the_embedding_service_dies_every_process_goes_within_a_second(way, method):
    proc = start_script(SERVICE, env={"RUNTIME_START_METHOD": method},
                        new_session=way.startswith("group"))
    directory = ""
    family: list[psutil.Process] = []
    try:
        directory = proc.stdout.readline().strip()
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()[-3000:]
        family = wait_until(lambda: (lambda d: d if len(d) >= TREE else None)(
            live_descendants(proc.pid)), what=f"the {TREE} processes of the service")
        assert len(family) == TREE, [p.cmdline() for p in family]
        assert os.path.isdir(directory)
        if way == "sigkill":
            os.kill(proc.pid, signal.SIGKILL)
        elif way == "os._exit":
            proc.stdin.write("os._exit\n")
            proc.stdin.flush()
        elif way == "group sigterm":
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        dead_at = time.monotonic()
        wait_until(lambda: not [p for p in family if running(p)], timeout=WITHIN,
                   what=f"every process of the service to be gone after its {way}")
        took = time.monotonic() - dead_at
        # (after a SIGKILL of the whole group, the node's janitor removes it: it is in a
        # session of its own)
        wait_until(lambda: not os.path.exists(directory), timeout=2.0,
                   what=f"the node directory {directory} to be removed")
        assert took < WITHIN
        print(f"{way} under {method}: {len(family)} processes gone {took * 1000:.0f} ms after "
              "the service")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        kill_all(family)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            stream.close()
        remove_node_dir(directory)


def _node_files() -> set[str]:
    """The node directory's files, its names too, without the warm children's sockets
    (they come and go as spawns take them)."""
    top = testing.node_dir()
    names = os.path.join(top, "names")
    return {*testing.node_files(), *(os.path.join(names, f) for f in os.listdir(names))}


def test_sigkill_of_a_supervisor_takes_its_children_and_theirs_and_their_files():
    runtime.self()
    files_before = _node_files()
    sup = runtime.Supervisor.start_link(
        [runtime.child_spec.make(("worker", i), _actors.Worker.start_link, (i,))
         for i in range(3)], strategy="one_for_one")
    workers = [c.pid for c in runtime.Supervisor.which_children(sup)]
    pids = [runtime.call(w, "pids") for w in workers]
    family = [psutil.Process(p) for pair in pids for p in pair]
    assert len(family) == 6 and all(running(p) for p in family)
    refs = [runtime.monitor(p) for p in [sup, *workers]]
    os.kill(sup.os_pid, signal.SIGKILL)
    killed_at = time.monotonic()
    wait_until(lambda: not [p for p in family if running(p)], timeout=WITHIN,
               what="the supervisor's workers and their children to be gone")
    assert time.monotonic() - killed_at < WITHIN
    assert [wait_down(ref).reason for ref in refs] == ["killed"] * 4
    assert_receive(lambda m: isinstance(m, runtime.Exit) and m.pid == sup)  # (linked to us)
    wait_until(lambda: _node_files() == files_before, timeout=2.0,
               what="the socket files of the supervisor and its descendants to go")


@pytest.mark.parametrize("caller", ["a thread of the embedding process", "a runtime process"])
def test_sigkill_of_a_server_in_a_long_call_fails_the_call_and_takes_its_children(caller):
    me = runtime.self()
    files_before = _node_files()
    server = _actors.LongCall.start(None)
    ended: list = []
    if caller == "a runtime process":
        calling = runtime.spawn(_actors.calls_and_reports, server, me)
        calling_ref = runtime.monitor(calling)
        thread = None
    else:
        def call():
            try:
                ended.append(("returned", runtime.call(server, ("long", me), timeout=30)))
            except runtime.ProcessError as exc:
                ended.append((type(exc).__name__, getattr(exc, "reason", None)))

        thread = threading.Thread(target=call)
        thread.start()
    try:
        _, server_os_pid, kids = assert_receive(tagged("in call"))
        kids = [psutil.Process(p) for p in kids]
        # a sleeper, and a process with two children
        family = wait_until(lambda: (lambda f: f if len(f) == 4 else None)(
            kids + [c for p in kids for c in p.children(recursive=True)]),
            what="the server's children and grandchildren")
        ref = runtime.monitor(server)
        os.kill(server_os_pid, signal.SIGKILL)
        killed_at = time.monotonic()
        if thread is None:
            outcome = assert_receive(tagged("call ended"))[1:]
            assert wait_down(calling_ref).reason == "normal"
        else:
            thread.join(10)
            assert not thread.is_alive()
            outcome = ended[0]
        # raised as soon as the server died, not at the call's 30 s timeout
        assert time.monotonic() - killed_at < 5.0
        assert outcome == ("ExitError", "killed"), outcome
        wait_until(lambda: not [p for p in family if running(p)], timeout=WITHIN,
                   what="the children of the killed server to be gone")
        assert time.monotonic() - killed_at < WITHIN + 0.5
        assert wait_down(ref).reason == "killed"
        wait_until(lambda: _node_files() == files_before, timeout=2.0,
                   what="the socket files of the server and its children to go")
    finally:
        if runtime.is_alive(server):
            runtime.exit(server, "kill")
        if thread is not None:
            thread.join(30)
