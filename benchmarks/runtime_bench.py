"""Runtime core: spawn to ready, call round trip, SIGKILL to Down, each beside its floor.

    python benchmarks/runtime_bench.py           # full run, a minute or two
    python benchmarks/runtime_bench.py --quick   # tiny sizes (what CI smoke-runs)

Every figure is printed next to a raw floor measured in the same run, on the same
machine, by the same process:

- spawn to ready: ``spawn`` of a function that sends one message back, until that
  message is received; floor: ``os.fork`` + a one-byte pipe handshake. Both new
  processes then wait (as a new server would) until the round is over.
- call round trip: ``call`` to a GenServer that replies at once; floor: a
  ``multiprocessing.Pipe`` round trip of a pickled tuple to an echo process.
- SIGKILL to Down: SIGKILL of a started, idle, monitored process until its ``Down``
  is received, while N other monitored processes are alive; floor: SIGKILL of a
  started, idle forked child until its sentinel pipe reads EOF. The two are
  paired: a floor child is killed beside each of ours, so both find the machine
  and its caches in the same state (half of the pairs floor first, half ours
  first: the second death of a pair finds the kernel's exit path warm). Killed
  in a loop of its own, as this script first did, the floor's children died
  5-16% faster than identical victims killed between runtime work; that row is
  still printed. Each death is cleaned up between samples, as the floor reaps
  its child right after its sample: the runtime, which reaps at an idle moment,
  is made to clean up before the next kill. Also back to back, with no idle
  moment: each ``Down`` then pays for cleaning up an earlier death.

The measurements run in a runtime process (a small process, like the floors'),
except the figures marked "from the embedding process". Floor and figure are
measured in alternating rounds, kills in alternating kills (the machine is shared
and noisy: both see the same moments), and the ratio quoted is the median of the
per-round ratios. The whole run happens twice: pinned to one CPU (a wake-up
across CPUs costs ~50 us here and makes round trips bimodal) and unpinned; the
targets are for the pinned run.
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
    affordable_processes,
    out,
    p50,
    pct,
    pin_to_one_cpu,
    row,
    timed,
)

# ------------------------------------------------------------------ helpers in children

def _ready(parent):
    runtime.send(parent, "ready")
    runtime.receive(match=lambda m: m == "stop")


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


def _nursery(parent):
    """Spawns started sleepers on request, so that the requester is not their parent."""
    me = runtime.self()
    while True:
        n = runtime.receive(match=lambda m: isinstance(m, int))
        pids = [runtime.spawn(_started_sleeper, me) for _ in range(n)]
        for _ in range(n):
            runtime.receive(match=lambda m: isinstance(m, tuple) and m[0] == "up")
        runtime.send(parent, ("nursery", pids))


# ---------------------------------------------------------------------------- floors

def floor_fork(n, fork=os.fork):
    """os.fork + a one-byte pipe handshake; the children stay alive (as ours do) until
    the round is measured, then go."""
    samples = []
    children = []
    for _ in range(n):
        r, w = os.pipe()
        stop_r, stop_w = os.pipe()
        t0 = time.perf_counter()
        pid = fork()
        if pid == 0:
            os.write(w, b"x")
            for _, other in children:  # inherited from the parent: would keep siblings up
                os.close(other)
            os.close(stop_w)
            os.read(stop_r, 1)
            os._exit(0)
        os.read(r, 1)
        samples.append(time.perf_counter() - t0)
        os.close(r)
        os.close(w)
        os.close(stop_r)
        children.append((pid, stop_w))
    for pid, stop_w in children:
        os.close(stop_w)
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


def sentinel_child() -> tuple[int, int]:
    """A started, idle forked child, and the read end of its sentinel pipe."""
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
    return pid, r


def kill_to_sentinel(pid: int, r: int) -> float:
    """SIGKILL ``pid`` until its sentinel ``r`` reads EOF; then reap it."""
    poller = select.poll()
    poller.register(r, select.POLLIN)
    t0 = time.perf_counter()
    os.kill(pid, signal.SIGKILL)
    poller.poll()
    sample = time.perf_counter() - t0
    os.close(r)
    os.waitpid(pid, 0)
    return sample


def floor_sentinel(n):
    """SIGKILL of a started, idle forked child until its sentinel pipe reads EOF, ``n``
    times in a loop of its own."""
    children = [sentinel_child() for _ in range(n)]
    return [kill_to_sentinel(pid, r) for pid, r in children]


# ---------------------------------------------------------------------------- ours

def ours_spawn(n):
    """spawn until the new process's first message arrives; the processes stay alive
    (serving, as a new server would) until the round is measured, then go."""
    me = runtime.self()
    samples = []
    pids = []
    for _ in range(n):
        t0 = time.perf_counter()
        pid = runtime.spawn(_ready, me)
        runtime.receive(match=lambda m: m == "ready")
        samples.append(time.perf_counter() - t0)
        pids.append(pid)
    refs = [runtime.monitor(p) for p in pids]
    for pid in pids:
        runtime.send(pid, "stop")
    for ref in refs:
        runtime.receive(match=lambda m, ref=ref: isinstance(m, runtime.Down) and m.ref == ref)
    return samples


def ours_call(n, server):
    runtime.call(server, "ping")
    return timed(lambda: runtime.call(server, "ping"), n)


def _started_sleeper(parent):
    runtime.send(parent, ("up", runtime.self()))
    _sleeper()


class KillRig:
    """``others`` started, idle, monitored processes; rounds of SIGKILL to Down of more
    such processes: our children (sentinels), or a nursery's (pidfds)."""

    def __init__(self, others, child=True, clean_between=True):
        self.me = runtime.self()
        self.child = child
        self.clean_between = clean_between
        self.pids = [runtime.spawn(_started_sleeper, self.me) for _ in range(others)]
        self.wait_up(others)
        if not child:
            self.pids.append(runtime.spawn(_nursery, self.me))
        self.refs = [runtime.monitor(p) for p in self.pids]

    @staticmethod
    def wait_up(n):
        for _ in range(n):
            runtime.receive(match=lambda m: isinstance(m, tuple) and m[0] == "up")

    def round(self, n, paired=True):
        """Kill ``n`` fresh victims one by one: (kill to Down samples, kill to sentinel
        samples, floor samples). Of our children, every other victim is timed on its
        bare sentinel instead (then its Down is received untimed): a second wait on
        the same death would add a wake-up to the Down's time. ``paired``: a floor
        child is killed beside each victim (see the module's docstring)."""
        if self.child:
            victims = [runtime.spawn(_started_sleeper, self.me) for _ in range(n)]
            self.wait_up(n)
        else:
            runtime.send(self.pids[-1], n)
            victims = runtime.receive(match=lambda m: isinstance(m, tuple)
                                      and m[0] == "nursery")[1]
        floor_children = [sentinel_child() for _ in range(n)] if paired else []
        refs = [runtime.monitor(v) for v in victims]
        node = runtime._embed.current()
        samples, raw, floor = [], [], []
        for i, (victim, ref) in enumerate(zip(victims, refs, strict=True)):
            # Half of each kind of sample comes first in its pair, half second: the
            # second one finds the kernel's exit path warm.
            floor_last = paired and (i // 2) % 2 == 1
            if paired and not floor_last:
                floor.append(kill_to_sentinel(*floor_children[i]))
            poller = None
            if self.child and i % 2:
                poller = select.poll()
                poller.register(node.watches.get(victim.serial).fd, select.POLLIN)
            t0 = time.perf_counter()
            os.kill(victim.os_pid, signal.SIGKILL)
            if poller is not None:
                poller.poll()
                raw.append(time.perf_counter() - t0)
            runtime.receive(match=lambda m, ref=ref: isinstance(m, runtime.Down) and m.ref == ref)
            if poller is None:
                samples.append(time.perf_counter() - t0)
            if self.clean_between:
                clean_up_now()
            if floor_last:
                floor.append(kill_to_sentinel(*floor_children[i]))
        return samples, raw, floor

    def close(self):
        for p in self.pids:
            runtime.exit(p, "kill")
        for ref in self.refs:
            runtime.receive(match=lambda m, ref=ref: isinstance(m, runtime.Down) and m.ref == ref)


def clean_up_now():
    """Run the runtime's cleanup of dead children now (reaping, removing socket files),
    which it otherwise leaves for an idle moment (runtime._poller.IDLE_CLEANUP): between
    samples, as the floor reaps its child right after its sample. (Waiting for the
    idle moment instead would let the CPU go idle, which makes the next sample slow
    on this VM for reasons of its own.)"""
    node = runtime._embed.current()
    with node.poller.lock:
        node.poller.run_jobs()


def interleaved(rounds, floor_fn, ours_fn):
    """Alternate floor and ours, ``rounds`` times, so both see the same machine: this
    one is shared and noisy. Returns (ours samples, floor samples, per-round ratios)."""
    ours, floor, ratios = [], [], []
    for _ in range(rounds):
        f = floor_fn()
        o = ours_fn()
        floor += f
        ours += o
        ratios.append(p50(o) / p50(f))
    return ours, floor, ratios


def paired(rounds, rig, n, raws):
    """Rounds of ``rig.round`` with a floor kill beside each of ours: (ours samples,
    floor samples, per-round ratios); the bare sentinels of our victims go to ``raws``."""
    ours, floor, ratios = [], [], []
    for _ in range(rounds):
        o, raw, f = rig.round(n)
        raws.extend(raw)
        floor += f
        ours += o
        ratios.append(p50(o) / p50(f))
    return ours, floor, ratios


# ---------------------------------------------------------------------------- driver

def driver(parent, quick):
    """Runs in a runtime process: every figure and its floor, measured here."""
    rounds = 3 if quick else 7
    n_spawn = 10 if quick else 60
    n_call = 100 if quick else 1000
    n_kill = 4 if quick else 16
    big = 20 if quick else 1000
    results = {}
    results["spawn"] = interleaved(rounds, lambda: floor_fork(n_spawn),
                                   lambda: ours_spawn(n_spawn))
    server = Echo.start_link()
    ctx = multiprocessing.get_context("fork")
    results["call"] = interleaved(rounds, lambda: floor_pipe_rtt(n_call, ctx),
                                  lambda: ours_call(n_call, server))
    runtime.stop(server)
    raws: dict[str, list[float]] = {key: [] for key in ("10", "b2b", "big", "pidfd", "own")}

    def own_loop():
        samples, raw, _ = rig.round(n_kill, paired=False)
        raws["own"].extend(raw)
        return samples

    rig = KillRig(10)
    results["kill10"] = paired(rounds, rig, n_kill, raws["10"])
    results["kill10_own"] = interleaved(rounds, lambda: floor_sentinel(n_kill), own_loop)
    rig.clean_between = False
    results["kill10_b2b"] = paired(rounds, rig, n_kill, raws["b2b"])
    rig.close()
    fit, note = affordable_processes(big + n_kill * rounds + 10)
    big = min(big, max(0, fit - n_kill * rounds - 10))
    rig = KillRig(big)
    results["killbig"] = paired(rounds, rig, n_kill, raws["big"])
    rig.close()
    rig = KillRig(big, child=False)
    results["killpidfd"] = paired(rounds, rig, n_kill, raws["pidfd"])
    rig.close()
    runtime.send(parent, ("results", results, raws, big, note))


def figure(name, result, target="", unit_note=""):
    ours, floor, ratios = result
    out(row(name + " (p50)", p50(ours), p50(floor),
            f"median of per-round ratios {p50(ratios):.2f}x  {target}{unit_note}"))


def measure(quick):
    me = runtime.self()
    runtime.spawn(driver, me, quick)
    _, results, raws, big, note = runtime.receive(
        timeout=900, match=lambda m: isinstance(m, tuple) and m[0] == "results")
    rounds = 3 if quick else 7
    server = Echo.start_link()
    main_call = interleaved(rounds, lambda: floor_pipe_rtt(100 if quick else 1000,
                                                           multiprocessing.get_context("spawn")),
                            lambda: ours_call(100 if quick else 1000, server))
    runtime.stop(server)

    def main_spawn():
        return ours_spawn(10 if quick else 40)

    main_spawn()  # the root imports what the target needs, once
    spawn_floor = results["spawn"][1]
    figure("spawn to ready", results["spawn"], "target <= 1.3x")
    main = main_spawn()
    out(row("spawn to ready from the embedding process (p50)", p50(main), p50(spawn_floor),
            "(one more hop: via the root)"))
    figure("call round trip", results["call"], "target <= 1.5x")
    ours, floor, _ = results["call"]
    out(row("call round trip (p99)", pct(ours, 99), pct(floor, 99)))
    figure("call from the embedding process", main_call)
    ours, floor, _ = main_call
    out(row("call from the embedding process (p99)", pct(ours, 99), pct(floor, 99)))
    figure("SIGKILL to Down, 10 others monitored", results["kill10"], "target <= 1.2x")
    out(row("  victims like these, their sentinel alone (p50)", p50(raws["10"]),
            p50(results["kill10"][1]), "(the rest of the Down's time is the runtime's)"))
    figure("  same, back to back (each Down pays an earlier death's cleanup)",
           results["kill10_b2b"])
    figure("  same, the floor killed in a loop of its own", results["kill10_own"])
    out(row("    victims' sentinel alone, against that floor (p50)", p50(raws["own"]),
            p50(results["kill10_own"][1])))
    figure(f"SIGKILL to Down, {big} others monitored", results["killbig"], "target <= 1.2x",
           (" " + note) if note else "")
    out(row("  victims like these, their sentinel alone (p50)", p50(raws["big"]),
            p50(results["killbig"][1])))
    figure("  same, victims not our children: pidfd", results["killpidfd"])


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
