"""The kv store: create, lookup as buckets accumulate, SIGKILL to name gone, restart, stop.

    python benchmarks/kv_bench.py           # full run: up to 5,000 buckets, a few minutes
    python benchmarks/kv_bench.py --quick   # tiny sizes (what CI smoke-runs)

Everything runs from the embedding process, as a user of ``kv`` would. Each
figure is printed beside a floor measured in the same run:

- create: ``registry.create`` per bucket; floor: ``os.fork`` + pipe handshake.
- lookup at 10 / 1,000 / 5,000 live buckets: p50 and p99 of ``registry.lookup``;
  floor: a ``multiprocessing.Pipe`` round trip. The check: 5,000 vs 10 <= 1.2x.
- SIGKILL of a bucket until ``lookup`` no longer returns it (p50); floor: SIGKILL
  of a forked child until its sentinel reads EOF.
- restart: a supervised GenServer killed, until its replacement answers a call
  (p50); floor: ``os.fork`` + pipe handshake.
- stop: ``kv.stop()`` with 1,000 buckets, per bucket; floor: SIGKILL and reap of
  1,000 forked children, per child.

Each bucket costs ~1.5-2 MiB here. Before growing, the benchmark checks free
memory and stops growing before less than a quarter of RAM would remain, and
says so.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import kv  # noqa: E402
import runtime  # noqa: E402
from benchmarks._common import affordable_processes, ms, out, p50, pct, row  # noqa: E402
from benchmarks.runtime_bench import floor_fork, floor_pipe_rtt, floor_sentinel  # noqa: E402
from kv import registry  # noqa: E402

REG = "kv.registry"


class Probe(runtime.GenServer):
    def init(self, parent):
        runtime.send(parent, ("up", runtime.self()))
        return parent

    def handle_call(self, request, from_, state):
        return runtime.Reply(request, state)


def floor_stop(n):
    children = []
    for _ in range(n):
        pid = os.fork()
        if pid == 0:
            time.sleep(3600)
            os._exit(0)
        children.append(pid)
    t0 = time.perf_counter()
    for pid in children:
        os.kill(pid, signal.SIGKILL)
    for pid in children:
        os.waitpid(pid, 0)
    return (time.perf_counter() - t0) / max(1, n)


def grow_to(target, names, server=REG, prefix="bucket"):
    """Create buckets in ``server`` until ``target`` exist; seconds per create, or None."""
    todo = target - len(names)
    if todo <= 0:
        return None
    t0 = time.perf_counter()
    for _ in range(todo):
        name = f"{prefix}-{len(names)}"
        names.append(name)
        registry.create(server, name)
    return (time.perf_counter() - t0) / todo


def lookup_samples(names, n, server=REG):
    probe = names[: min(len(names), 50)]
    samples = []
    for i in range(n):
        t0 = time.perf_counter()
        registry.lookup(server, probe[i % len(probe)])
        samples.append(time.perf_counter() - t0)
    return samples


def sigkill_to_name_gone(n):
    samples = []
    for i in range(n):
        name = f"victim-{i}"
        b = registry.create(REG, name)
        t0 = time.perf_counter()
        os.kill(b.os_pid, signal.SIGKILL)
        for _ in range(100000):  # bounded: the name goes within a few ms
            if registry.lookup(REG, name) is None:
                break
        samples.append(time.perf_counter() - t0)
    return samples


def restart_to_serving(n):
    me = runtime.self()
    sup = runtime.Supervisor.start_link([(Probe, me)], max_restarts=n + 5, max_seconds=60)
    up = lambda m: isinstance(m, tuple) and m[0] == "up"  # noqa: E731
    child = runtime.receive(10, up)[1]
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        runtime.exit(child, "kill")
        child = runtime.receive(10, up)[1]
        runtime.call(child, "ping")
        samples.append(time.perf_counter() - t0)
    runtime.stop(sup)
    return samples


def main():
    quick = "--quick" in sys.argv
    sizes = [50, 100] if quick else [1000, 5000]
    rounds = 3 if quick else 7
    n_lookup = 100 if quick else 500
    n_kill = 10 if quick else 50
    n_create = 50 if quick else 1000
    out(f"kv benchmark, {'quick' if quick else 'full'} run, {os.cpu_count()} CPUs, unpinned")
    fork_floor = p50(floor_fork(30 if quick else 200))
    sentinel_floor = p50(floor_sentinel(n_kill))
    kv.start()
    # A small registry (10 buckets) beside the big one: lookups on both, in alternating
    # rounds, see the same machine at the same moments.
    small = registry.start_link(name="kv.bench.small")  # by name, as "kv.registry" is
    small = "kv.bench.small"
    small_names: list[str] = []
    grow_to(10, small_names, small, "small")
    names: list[str] = []
    per_create = grow_to(n_create, names)
    out(row(f"registry create of {n_create} buckets, per bucket", per_create, fork_floor,
            "", unit=ms))
    ctx = multiprocessing.get_context("spawn")
    for size in sizes:
        fit, note = affordable_processes(size - len(names))
        target = len(names) + fit
        if note:
            out(f"  memory guard: {note}; measuring at {target} buckets instead of {size}")
        rate = grow_to(target, names)
        if rate is not None:
            out(row(f"  registry create, per bucket, up to {len(names)}", rate, fork_floor,
                    "", unit=ms))
        big_s, small_s, ratios, floor_s = [], [], [], []
        for _ in range(rounds):
            floor_s += floor_pipe_rtt(n_lookup, ctx)
            a = lookup_samples(small_names, n_lookup, small)
            b = lookup_samples(names, n_lookup)
            small_s += a
            big_s += b
            ratios.append(p50(b) / p50(a))
        out(row("lookup at 10 live buckets (p50)", p50(small_s), p50(floor_s)))
        out(row(f"lookup at {len(names)} live buckets (p50)", p50(big_s), p50(floor_s)))
        out(row(f"lookup at {len(names)} live buckets (p99)", pct(big_s, 99), pct(floor_s, 99)))
        out(f"  lookup at {len(names)} / at 10 buckets: {p50(ratios):.2f}x "
            f"(median of {rounds} alternating rounds)   target <= 1.2x")
    runtime.stop(small)
    kills = sigkill_to_name_gone(n_kill)
    out(row("SIGKILL of a bucket -> name gone (p50)", p50(kills), sentinel_floor))
    restarts = restart_to_serving(n_kill)
    out(row("supervisor restart: kill -> serving again (p50)", p50(restarts), fork_floor,
            "", unit=ms))
    total = len(names)
    t0 = time.perf_counter()
    kv.stop()
    per_bucket = (time.perf_counter() - t0) / total
    out(row(f"kv.stop() with {total} buckets, per bucket", per_bucket,
            floor_stop(min(total, 200 if quick else 1000)), "", unit=ms))
    runtime.shutdown()


if __name__ == "__main__":
    main()
