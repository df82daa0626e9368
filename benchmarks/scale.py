"""Scale: buckets as they accumulate, from the embedding process.

- Growth: ``kv.registry.create`` up to N = 10, 100, 1,000, 5,000, 10,000 live
  buckets (10 and 100 in --quick): the time per create within each step, beside
  the fork floor (``os.fork`` + pipe handshake) measured in a fresh small process
  (a big process's own fork slows as it grows) and in the embedding process,
  sampled between creates. The target: a create within 2x the fork floor.
- The cost of one create, one lookup and one Down (SIGKILL of a bucket until
  the registry no longer names it) at the largest N against the same at 10 live
  buckets: a second, small tree (its own bucket supervisor and registry, 10
  buckets) kept beside the big one and used alternately, so both see the same
  machine. The target: within 1.3x.
- Teardown: stopping a tree, per bucket, at 10 and 100 buckets (fresh trees,
  a few rounds) and at the largest N (``kv.stop()``, once), beside SIGKILL and
  reaping of as many forked children of the small process, per child.

Each idle bucket costs about 3 MiB here. Before each step, free memory is
checked (the cost per bucket refined from what the previous step used); growth
stops before less than a quarter of RAM would remain, and the report says so.
Each step is also bounded in time.
"""

from __future__ import annotations

import random
import statistics
import time
from typing import Any

import psutil

import kv
import runtime
from benchmarks.cleanup import kill_until_gone
from benchmarks.floors import ForkPipe, SmallForker
from benchmarks.harness import IDLE_PROCESS_BYTES, Recorder, affordable, timed
from kv import registry
from kv.registry import Registry

REG = "kv.registry"


def small_tree(prefix: str) -> Any:
    """A tree like kv's (a bucket supervisor and a registry) under other names."""
    children = [runtime.DynamicSupervisor.child_spec(name=f"{prefix}.buckets", zygote=True),
                Registry.child_spec({"name": f"{prefix}.registry",
                                     "bucket_supervisor": f"{prefix}.buckets"})]
    return runtime.Supervisor.start_link(children, strategy="one_for_all", name=f"{prefix}.sup")


def tree_stop(prefix: str, size: int) -> float:
    """A fresh small tree with ``size`` buckets, stopped: seconds per bucket."""
    small_tree(prefix)
    for i in range(size):
        registry.create(f"{prefix}.registry", f"b{i}")
    return timed(lambda: runtime.stop(f"{prefix}.sup", "shutdown", 60)) / size


def teardown_small(rec: Recorder, forker: SmallForker, sizes: tuple[int, ...], rounds: int,
                   series: dict[str, list[float]]) -> None:
    for size in sizes:
        ours, floor = [], []
        for r in range(rounds):  # alternately first
            if r % 2:
                floor.append(forker.kill_per_child(size))
            ours.append(tree_stop(f"bench.td{size}.{r}", size))
            if not r % 2:
                floor.append(forker.kill_per_child(size))
        rec.figure(f"teardown.{size}", f"tree stop with {size} buckets, per bucket", ours,
                   floor, "SIGKILL + reap of as many forked children, per child", unit="ms")
        series["n"].append(size)
        series["ours_ms"].append(statistics.median(ours) * 1e3)
        series["floor_ms"].append(statistics.median(floor) * 1e3)


def run(rec: Recorder) -> None:
    quick = rec.quick
    sizes = (10, 100) if quick else (10, 100, 1000, 5000, 10_000)
    step_seconds = 30.0 if quick else 150.0
    n_cmp = 10 if quick else 60
    forker = SmallForker()
    own_fork = ForkPipe()
    teardown: dict[str, list[float]] = {"n": [], "ours_ms": [], "floor_ms": []}
    series: dict[str, Any] = {"n": [], "create_median_ms": [], "create_p99_ms": [],
                              "floor_median_ms": [], "floor_embedding_median_ms": [],
                              "teardown": teardown}
    rec.series["scale"] = series
    try:
        kv.start()
        rec.progress(0.0, "teardown of small trees")
        teardown_small(rec, forker, (10, 100), 2 if quick else 5, teardown)
        small_tree("bench.small")
        small_names = [f"s{i}" for i in range(10)]
        for name in small_names:
            registry.create("bench.small.registry", name)
        names: list[str] = []
        per_bucket = IDLE_PROCESS_BYTES
        total = sizes[-1]
        for size in sizes:
            want = size - len(names)
            fit, note = affordable(want + n_cmp, per_bucket)
            goal = len(names) + max(0, min(want, fit - n_cmp))
            if note:
                rec.note(f"scale: {note}; growth stopped at {goal} buckets instead of {size}")
            if goal <= len(names):
                break
            avail = psutil.virtual_memory().available
            creates: list[float] = []
            floors: list[float] = []
            own: list[float] = []
            stride = max(1, (goal - len(names)) // 100)
            deadline = time.monotonic() + step_seconds
            step_start = len(names)
            timed_out = False
            while len(names) < goal:
                name = f"b{len(names)}"
                t0 = time.perf_counter()
                registry.create(REG, name)
                creates.append(time.perf_counter() - t0)
                names.append(name)
                if len(names) % stride == 0:
                    if len(floors) % 2:
                        floors.append(forker.fork())
                        own.append(own_fork.sample())
                    else:
                        own.append(own_fork.sample())
                        floors.append(forker.fork())
                    if len(floors) % 10 == 0:
                        forker.release()
                        own_fork.after_round()
                if len(names) % 50 == 0:
                    rec.progress(0.05 + 0.75 * len(names) / total,
                                 f"growing: {len(names)} buckets")
                if time.monotonic() > deadline:
                    timed_out = True
                    break
            forker.release()
            own_fork.after_round()
            grown = len(names) - step_start
            used = (avail - psutil.virtual_memory().available) / max(1, grown)
            per_bucket = max(per_bucket, int(used * 1.2))
            live = len(names)
            rec.figure(f"create.{size}", f"registry.create, step up to {live} buckets",
                       creates, floors, "os.fork + pipe handshake in a fresh small process",
                       unit="ms", target=2.0, headline=size == sizes[-1] or timed_out or bool(note))
            rec.figure(f"create.{size}.embedding", f"registry.create, step up to {live} buckets",
                       creates, own, "os.fork + pipe handshake in the embedding process",
                       unit="ms")
            series["n"].append(live)
            series["create_median_ms"].append(statistics.median(creates) * 1e3)
            series["create_p99_ms"].append(sorted(creates)[int(0.99 * (len(creates) - 1))] * 1e3)
            series["floor_median_ms"].append(statistics.median(floors) * 1e3)
            series["floor_embedding_median_ms"].append(statistics.median(own) * 1e3)
            if timed_out:
                rec.note(f"scale: the step to {size} buckets ran past {step_seconds:.0f} s; "
                         f"growth stopped at {live}")
            if timed_out or note:
                break
        live = len(names)
        rec.progress(0.8, f"create, lookup and Down at {live} against at 10")
        got: dict[str, list[float]] = {k: [] for k in ("create", "lookup", "down")}
        small: dict[str, list[float]] = {k: [] for k in ("create", "lookup", "down")}
        trees = [(REG, names, got), ("bench.small.registry", small_names, small)]
        for i in range(n_cmp):
            for reg, known, out in trees if i % 2 else trees[::-1]:
                name = f"cmp-{i}"
                t0 = time.perf_counter()
                pid = registry.create(reg, name)
                out["create"].append(time.perf_counter() - t0)
                for probe in random.sample(known, 3):
                    out["lookup"].append(timed(lambda reg=reg, p=probe: registry.lookup(reg, p)))
                out["down"].append(kill_until_gone(reg, name, pid))
        at10 = "the same at 10 live buckets (a second tree, alternately)"
        for op, text in (("create", "one registry.create"), ("lookup", "one registry.lookup"),
                         ("down", "one Down (SIGKILL to the name gone)")):
            rec.figure(f"at_n.{op}", f"{text} at {live} live buckets", got[op], small[op], at10,
                       unit="us", target=1.3, headline=True)
        runtime.stop("bench.small.sup")
        rec.progress(0.85, f"teardown of {live} buckets")
        ours = timed(lambda: kv.stop(120)) / max(1, live)
        floor = forker.kill_per_child(live)
        rec.figure("teardown.largest", f"kv.stop() with {live} buckets, per bucket",
                   [ours], [floor], "SIGKILL + reap of as many forked children, per child",
                   unit="ms", headline=True)
        teardown["n"].append(live)
        teardown["ours_ms"].append(ours * 1e3)
        teardown["floor_ms"].append(floor * 1e3)
    finally:
        forker.close()
        own_fork.after_round()
    rec.progress(1.0, "done")
