"""Runtime core: spawn to ready, call round trip, SIGKILL to Down, each beside its floor.

    python benchmarks/runtime_bench.py           # full run, a minute or two
    python benchmarks/runtime_bench.py --quick   # tiny sizes (what CI smoke-runs)

Every figure is printed next to a raw floor measured in the same run, on the same
machine, by the same process:

- spawn to ready: ``spawn`` of a function that sends one message back, until that
  message is received; floor: ``os.fork`` + a one-byte pipe handshake.
- call round trip: ``call`` to a GenServer that replies at once; floor: a
  ``multiprocessing.Pipe`` round trip of a pickled tuple to an echo process.
- SIGKILL to Down: SIGKILL of a started, idle, monitored process until its ``Down``
  is received, while N other monitored processes are alive; floor: SIGKILL of a
  started, idle forked child until its sentinel pipe reads EOF.

The measurements run in a runtime process (a small process, like the floors'),
except the figures marked "from the embedding process". The whole run happens
twice: pinned to one CPU (a wake-up across CPUs costs ~50 us here and makes round
trips bimodal) and unpinned; ratios are quoted from the pinned run.
"""

from __future__ import annotations

import multiprocessing
import os
import select
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import runtime  # noqa: E402
from benchmarks._common import (  # noqa: E402
    affordable_processes, out, p50, pct, pin_to_one_cpu, row, timed,
)


# ------------------------------------------------------------------ helpers in children

def _ready(parent):
    runtime.send(parent, "ready")


def _sleeper():
    time.sleep(3600)


class Echo(runtime.GenServer):
    def handle_call(self, request, from_, state):
        return runtime.Reply(request, state)


def _pipe_echo(conn):
    while True:
        msg = conn.recv()
        if msg is None:
            return
        conn.send(msg)


def _nursery(parent, n):
    """Spawn ``n`` started sleepers, send their pids to ``parent``, then sleep."""
    me = runtime.self()
    pids = [runtime.spawn(_started_sleeper, me) for _ in range(n)]
    for _ in range(n):
        runtime.receive(match=lambda m: isinstance(m, tuple) and m[0] == "up")
    runtime.send(parent, ("nursery", pids))
    _sleeper()


# ---------------------------------------------------------------------------- floors

def floor_fork(n):
    samples = []
    for _ in range(n):
        r, w = os.pipe()
        t0 = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            os.write(w, b"x")
            os._exit(0)
        os.read(r, 1)
        samples.append(time.perf_counter() - t0)
        os.close(r)
        os.close(w)
        os.waitpid(pid, 0)
    return samples


def floor_pipe_rtt(n, ctx):
    a, b = multiprocessing.Pipe()
    proc = ctx.Process(target=_pipe_echo, args=(b,))
    proc.start()
    msg = ("$gen_call", (1, 2), "ping")
    a.send(msg)
    a.recv()
    samples = timed(lambda: (a.send(msg), a.recv()), n)
    a.send(None)
    proc.join()
    return samples


def floor_sentinel(n):
    """SIGKILL of a started, idle forked child until its sentinel pipe reads EOF."""
    children = []
    for _ in range(n):
        r, w = os.pipe()
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            os.write(ready_w, b"x")
            time.sleep(3600)
            os._exit(0)
        os.close(w)
        os.read(ready_r, 1)
        os.close(ready_r)
        os.close(ready_w)
        children.append((pid, r))
    samples = []
    for pid, r in children:
        t0 = time.perf_counter()
        os.kill(pid, signal.SIGKILL)
        select.select([r], [], [])
        samples.append(time.perf_counter() - t0)
        os.close(r)
        os.waitpid(pid, 0)
    return samples


# ---------------------------------------------------------------------------- ours

def ours_spawn(n):
    me = runtime.self()
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        pid = runtime.spawn(_ready, me)
        runtime.receive(match=lambda m: m == "ready")
        samples.append(time.perf_counter() - t0)
        ref = runtime.monitor(pid)
        runtime.receive(match=lambda m: isinstance(m, runtime.Down) and m.ref == ref)
    return samples


def ours_call(n, server):
    runtime.call(server, "ping")
    return timed(lambda: runtime.call(server, "ping"), n)


def _started_sleeper(parent):
    runtime.send(parent, ("up", runtime.self()))
    _sleeper()


def ours_sigkill_to_down(n, others, child=True):
    """SIGKILL a started, idle, monitored process while ``others`` more are monitored.
    ``child``: the victims are our children (sentinels); otherwise a nursery's (pidfds)."""
    me = runtime.self()
    up = lambda m: isinstance(m, tuple) and m[0] == "up"  # noqa: E731
    pids = [runtime.spawn(_started_sleeper, me) for _ in range(others)]
    nursery = None
    if child:
        victims = [runtime.spawn(_started_sleeper, me) for _ in range(n)]
    else:
        nursery = runtime.spawn(_nursery, me, n)
        victims = runtime.receive(match=lambda m: isinstance(m, tuple) and m[0] == "nursery")[1]
        pids.append(nursery)
    for _ in range(others + (n if child else 0)):
        runtime.receive(match=up)
    refs = [runtime.monitor(p) for p in pids]
    victim_refs = [runtime.monitor(v) for v in victims]
    samples = []
    raw = []  # the same victims, their death seen on the sentinel alone
    node = runtime._node.current()
    for victim, ref in zip(victims, victim_refs):
        fd = node.watches[victim.serial].fd
        t0 = time.perf_counter()
        os.kill(victim.os_pid, signal.SIGKILL)
        if child:
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            poller.poll()
            raw.append(time.perf_counter() - t0)
        runtime.receive(match=lambda m: isinstance(m, runtime.Down) and m.ref == ref)
        samples.append(time.perf_counter() - t0)
    for p in pids:
        runtime.exit(p, "kill")
    for ref in refs:
        runtime.receive(match=lambda m: isinstance(m, runtime.Down) and m.ref == ref)
    return samples, raw


# ---------------------------------------------------------------------------- driver

def driver(parent, quick):
    """Runs in a runtime process: every figure and its floor, measured here."""
    n_spawn = 30 if quick else 300
    n_call = 200 if quick else 5000
    n_kill = 10 if quick else 60
    big = 20 if quick else 1000
    results = {}
    results["spawn"] = (ours_spawn(n_spawn), floor_fork(n_spawn))
    server = Echo.start_link()
    ctx = multiprocessing.get_context("fork")
    results["call"] = (ours_call(n_call, server), floor_pipe_rtt(n_call, ctx))
    floor = floor_sentinel(n_kill)
    results["kill10"] = (*ours_sigkill_to_down(n_kill, 10), floor)
    fit, note = affordable_processes(big + n_kill + 10)
    big = min(big, max(0, fit - n_kill - 10))
    results["killbig"] = (*ours_sigkill_to_down(n_kill, big), floor, big, note)
    results["killbig_pidfd"] = (ours_sigkill_to_down(n_kill, big, child=False)[0], floor, big)
    runtime.stop(server)
    runtime.send(parent, ("results", results))


def measure(quick):
    n_call = 200 if quick else 5000
    me = runtime.self()
    runtime.spawn(driver, me, quick)
    results = runtime.receive(timeout=600, match=lambda m: isinstance(m, tuple)
                              and m[0] == "results")[1]
    server = Echo.start_link()
    main_call = ours_call(n_call, server)
    main_floor = floor_pipe_rtt(n_call, multiprocessing.get_context("spawn"))
    runtime.stop(server)
    t0 = time.perf_counter()
    pid = runtime.spawn(_ready, me)
    runtime.receive(match=lambda m: m == "ready")
    first_spawn = time.perf_counter() - t0
    main_spawn = []
    for _ in range(30 if quick else 200):
        t0 = time.perf_counter()
        runtime.spawn(_ready, me)
        runtime.receive(match=lambda m: m == "ready")
        main_spawn.append(time.perf_counter() - t0)
    del pid, first_spawn

    ours, floor = results["spawn"]
    out(row("spawn to ready (p50)", p50(ours), p50(floor), "target <= 1.3x"))
    out(row("spawn to ready from the embedding process (p50)", p50(main_spawn), p50(floor),
            "(one more hop: via the root)"))
    ours, floor = results["call"]
    out(row("call round trip (p50)", p50(ours), p50(floor), "target <= 1.5x"))
    out(row("call round trip (p99)", pct(ours, 99), pct(floor, 99)))
    out(row("call from the embedding process (p50)", p50(main_call), p50(main_floor)))
    out(row("call from the embedding process (p99)", pct(main_call, 99), pct(main_floor, 99)))
    ours, raw, floor = results["kill10"]
    out(row("SIGKILL to Down, 10 others monitored (p50)", p50(ours), p50(floor),
            "target <= 1.2x"))
    out(row("  same victims, their sentinel alone (p50)", p50(raw), p50(floor),
            "(a runtime process takes longer to die)"))
    ours, raw, floor, big, note = results["killbig"]
    out(row(f"SIGKILL to Down, {big} others monitored (p50)", p50(ours), p50(floor),
            "target <= 1.2x " + note))
    out(row("  same victims, their sentinel alone (p50)", p50(raw), p50(floor)))
    ours, floor, big = results["killbig_pidfd"]
    out(row("  same, victim not our child: pidfd (p50)", p50(ours), p50(floor)))


def main():
    quick = "--quick" in sys.argv
    if "--measure" in sys.argv:
        if "--pinned" in sys.argv:
            out(f"pinned to CPU {pin_to_one_cpu()}")
        else:
            out(f"unpinned, CPUs {sorted(os.sched_getaffinity(0))}")
        measure(quick)
        runtime.shutdown()
        return
    out(f"runtime benchmark, {'quick' if quick else 'full'} run, "
        f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    for mode in ("--pinned", "--unpinned"):
        args = [sys.executable, os.path.abspath(__file__), "--measure", mode]
        if quick:
            args.append("--quick")
        subprocess.run(args, check=True)


if __name__ == "__main__":
    main()
