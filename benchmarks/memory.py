"""Memory: USS and PSS of an idle bucket, among 1,000 (50 in --quick).

USS is what the process alone holds (freed when it exits); PSS adds its share
of the pages it shares with others (copy-on-write pages of its parent, the
interpreter). Floor: an idle child forked by ``multiprocessing`` (fork) from
the embedding process, as many alive as buckets. Up to 200 of each are read
(psutil), alternately. Also, not a figure: how much the system's available
memory fell per bucket while they were created, and per floor child.
"""

from __future__ import annotations

import multiprocessing
from typing import Any

import psutil

import kv
from benchmarks.floors import idle_child
from benchmarks.harness import IDLE_PROCESS_BYTES, Recorder, affordable, interleave
from kv import registry

REG = "kv.registry"


def run(rec: Recorder) -> None:
    wanted = 50 if rec.quick else 1000
    fit, note = affordable(2 * wanted, IDLE_PROCESS_BYTES)
    n = min(wanted, fit // 2)
    if note:
        rec.note(f"memory: {note}; measured at {n} buckets")
    if n < 2:
        raise RuntimeError("not enough free memory for the memory part")
    kv.start()
    ctx = multiprocessing.get_context("fork")
    children: list[tuple[Any, Any]] = []
    try:
        rec.progress(0.0, f"creating {n} buckets")
        avail0 = psutil.virtual_memory().available
        buckets = [registry.create(REG, f"b{i}").os_pid for i in range(n)]
        avail1 = psutil.virtual_memory().available
        rec.progress(0.4, f"forking {n} idle children")
        children = [idle_child(ctx) for _ in range(n)]
        avail2 = psutil.virtual_memory().available
        rec.note(f"memory: available memory fell by {(avail0 - avail1) / n / 2**20:.2f} MiB per "
                 f"bucket while {n} were created, by {(avail1 - avail2) / n / 2**20:.2f} MiB "
                 f"per idle forked child (other processes on this shared machine move this too)")
        step = max(1, n // 200)
        ours = iter(buckets[::step])
        floor = iter([c[0].pid for c in children][::step])

        def reader(pids: Any) -> Any:
            return lambda: psutil.Process(next(pids)).memory_full_info()

        got = interleave({"ours": reader(ours), "floor": reader(floor)}, len(buckets[::step]),
                         60.0, tick=rec.ticker(0.6, 0.95, "reading USS and PSS"))
        floor_name = "an idle multiprocessing child (fork) of the embedding process"
        rec.figure("uss", f"USS of an idle bucket, {n} alive", [m.uss for m in got["ours"]],
                   [m.uss for m in got["floor"]], floor_name, unit="MiB", headline=True)
        rec.figure("pss", f"PSS of an idle bucket, {n} alive", [m.pss for m in got["ours"]],
                   [m.pss for m in got["floor"]], floor_name, unit="MiB", headline=True)
    finally:
        for _, stop_w in children:
            stop_w.send_bytes(b"s")
            stop_w.close()
        for proc, _ in children:
            proc.join(30)
        rec.progress(0.97, "stopping the tree")
        kv.stop()
    rec.progress(1.0, "done")
