"""Shared helpers for the benchmarks: percentiles, memory guard, pinning, printing."""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable

import psutil

IDLE_PROCESS_BYTES = 2 * 1024 * 1024  # what one idle runtime process costs here, about


def pct(samples: list[float], q: float) -> float:
    data = sorted(samples)
    if not data:
        return float("nan")
    k = min(len(data) - 1, max(0, int(round(q / 100 * (len(data) - 1)))))
    return data[k]


def p50(samples: list[float]) -> float:
    return statistics.median(samples)


def timed(fn: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def affordable_processes(wanted: int, per_process: int = IDLE_PROCESS_BYTES) -> tuple[int, str]:
    """How many more processes fit while keeping a quarter of RAM free; and a note if capped."""
    mem = psutil.virtual_memory()
    spare = mem.available - mem.total // 4
    fit = max(0, spare // per_process)
    if fit >= wanted:
        return wanted, ""
    return int(fit), (f"capped at {fit} (wanted {wanted}): only {mem.available >> 20} MiB "
                      f"available and a quarter of RAM must stay free")


def pin_to_one_cpu() -> int:
    cpu = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    return cpu


def us(seconds: float) -> str:
    return f"{seconds * 1e6:9.1f} us"


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:9.2f} ms"


def row(name: str, ours: float, floor: float | None, extra: str = "", unit=us) -> str:
    if floor:
        ratio = ours / floor
        return f"  {name:<44} {unit(ours)}   floor {unit(floor)}   ratio {ratio:5.2f}x {extra}"
    return f"  {name:<44} {unit(ours)}   {extra}"


def out(line: str = "") -> None:
    print(line, flush=True)
    sys.stdout.flush()
