"""The harness: interleaved sampling, statistics, figures, the machine, progress.

A *figure* is one of our operations measured next to its *floor* (the fastest
equivalent without the runtime), both sampled in the same run, alternately: the
machine is shared and noisy, so absolute times drift and only ratios are
compared. A figure keeps the median and p99 of both sides, how many samples
each has, and the ratio of the medians, always as a cost: how many times the
floor's cost ours is (ours / floor for times and sizes, floor / ours for rates),
so 1.0x is as cheap as the floor and a target is a ratio not to exceed.

A part (``benchmarks/<part>.py``) runs in a subprocess of its own and reports to
the parent through a :class:`Recorder`: figures, series to plot, notes, and its
progress (a fraction of the part done), which the parent turns into one bar.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import psutil

# What a unit's samples are in, and the factor from the samples to the unit.
UNITS = {"us": 1e6, "ms": 1e3, "s": 1.0, "MiB": 1 / 2**20, "KiB": 1 / 2**10, "req/s": 1.0,
         "calls/s": 1.0}
RATES = {"req/s", "calls/s"}  # higher is better

MIN_SAMPLES = 5  # a deadline never cuts a sampler below this many samples


def percentile(samples: Iterable[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN when there are no samples."""
    data = sorted(samples)
    if not data:
        return math.nan
    k = max(0, min(len(data) - 1, math.ceil(q / 100 * len(data)) - 1))
    return data[k]


def summary(samples: list[float], unit: str) -> dict[str, Any]:
    """Median, p99 (the worst 1%: the 1st percentile for a rate) and n, in ``unit``."""
    scale = UNITS[unit]
    if not samples:
        return {"median": math.nan, "p99": math.nan, "n": 0}
    tail = percentile(samples, 1 if unit in RATES else 99)
    return {"median": statistics.median(samples) * scale, "p99": tail * scale, "n": len(samples)}


def cost_ratio(ours: float, floor: float, unit: str) -> float:
    if unit in RATES:
        ours, floor = floor, ours
    if not floor or math.isnan(ours) or math.isnan(floor):
        return math.nan
    return ours / floor


# ------------------------------------------------------------------ sampling


class Sampler:
    """One side of a comparison. ``sample()`` returns one measurement (usually a
    duration in seconds); ``before_round(k)`` prepares ``k`` samples untimed (fresh
    victims, say) and ``after_round()`` releases what the round left (children it
    kept alive), also untimed."""

    def sample(self) -> Any:
        raise NotImplementedError

    def before_round(self, k: int) -> None:
        pass

    def after_round(self) -> None:
        pass


class Fn(Sampler):
    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn

    def sample(self) -> Any:
        return self.fn()


def interleave(samplers: dict[str, Sampler | Callable[[], Any]], n: int, seconds: float,
               per_round: int = 0, tick: Callable[[float], None] | None = None,
               ) -> dict[str, list[Any]]:
    """Up to ``n`` samples of each sampler, one of each in turn, the order rotated at
    every turn (each side goes first as often as the others): so ours and its floor
    see the same moments of the machine. Bounded: stops after ``seconds`` (with at
    least ``MIN_SAMPLES`` each). ``per_round`` > 0 groups turns into rounds, with
    each sampler's ``before_round``/``after_round`` around them. ``tick(fraction)``
    reports progress."""
    wrapped = {k: s if isinstance(s, Sampler) else Fn(s) for k, s in samplers.items()}
    names = list(wrapped)
    out: dict[str, list[Any]] = {k: [] for k in names}
    deadline = time.monotonic() + seconds
    per_round = per_round or n
    done = 0
    while done < n:
        k = min(per_round, n - done)
        for s in wrapped.values():
            s.before_round(k)
        try:
            for _ in range(k):
                shift = done % len(names)
                for name in names[shift:] + names[:shift]:
                    out[name].append(wrapped[name].sample())
                done += 1
                if time.monotonic() > deadline and done >= MIN_SAMPLES:
                    break
        finally:
            for s in wrapped.values():
                s.after_round()
        if tick:
            tick(min(1.0, max(done / n, (time.monotonic() - deadline + seconds) / seconds)))
        if time.monotonic() > deadline and done >= MIN_SAMPLES:
            break
    return out


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ------------------------------------------------------------------ memory


# What one more idle bucket costs in available memory here, as a first guess; the
# scale part refines it from what free memory actually did.
IDLE_PROCESS_BYTES = 3 * 2**20


def affordable(wanted: int, per_process: int) -> tuple[int, str]:
    """How many more processes of ``per_process`` bytes fit while a quarter of RAM stays
    free; and a note saying why, when fewer than ``wanted``."""
    mem = psutil.virtual_memory()
    spare = mem.available - mem.total // 4
    fit = max(0, int(spare // per_process))
    if fit >= wanted:
        return wanted, ""
    return fit, (f"memory guard: only {fit} more processes fit (wanted {wanted}, at "
                 f"{per_process / 2**20:.1f} MiB each): {mem.available >> 20} MiB available "
                 f"of {mem.total >> 20} MiB, and a quarter of RAM must stay free")


# ------------------------------------------------------------------ the part's side


def _met(ratio: float, target: float | None) -> bool | None:
    return None if target is None or math.isnan(ratio) else bool(ratio <= target)


@dataclass
class Recorder:
    """What a part reports: figures, series (for plots), notes; progress goes to
    ``progress_fd`` as JSON lines, if given."""

    part: str
    quick: bool
    progress_fd: int | None = None
    figures: list[dict[str, Any]] = field(default_factory=list)
    series: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def figure(self, key: str, name: str, ours: list[float], floor: list[float], floor_name: str,
               unit: str = "us", target: float | None = None, note: str = "",
               headline: bool = False, tail_targets: dict[int, float] | None = None,
               ) -> dict[str, Any]:
        """Record ours against its floor (samples in seconds, bytes or req/s). ``key``
        is stable across runs (what --compare matches on); ``headline`` figures make
        the README's table. ``target`` is for the ratio of the medians;
        ``tail_targets`` maps a percentile (90, 99: the worst 10%, 1%) to a target for
        the ratio of ours' and the floor's values there (times and sizes only)."""
        o, f = summary(ours, unit), summary(floor, unit)
        ratio = cost_ratio(o["median"], f["median"], unit)
        if tail_targets and unit in RATES:
            raise ValueError(f"tail targets are for times and sizes, not {unit}")
        tails = []
        for q, tail_target in sorted((tail_targets or {}).items()):
            scale = UNITS[unit]
            ours_q, floor_q = percentile(ours, q) * scale, percentile(floor, q) * scale
            tail_ratio = cost_ratio(ours_q, floor_q, unit)
            tails.append({"q": q, "ours": ours_q, "floor": floor_q, "ratio": tail_ratio,
                          "target": tail_target, "met": _met(tail_ratio, tail_target)})
        fig = {"key": f"{self.part}.{key}", "part": self.part, "name": name, "unit": unit,
               "ours": o, "floor": {"name": floor_name, **f}, "ratio": ratio,
               "target": target, "met": _met(ratio, target), "tails": tails, "note": note,
               "headline": headline}
        self.figures.append(fig)
        return fig

    def note(self, text: str) -> None:
        self.notes.append(text)
        self.progress(None, text)

    def progress(self, fraction: float | None, label: str = "") -> None:
        if self.progress_fd is None:
            return
        line = json.dumps({"fraction": fraction, "label": label}) + "\n"
        try:
            os.write(self.progress_fd, line.encode())
        except OSError:
            pass

    def ticker(self, start: float, end: float, label: str) -> Callable[[float], None]:
        """A ``tick`` for :func:`interleave` mapping its 0..1 onto start..end of the part."""
        self.progress(start, label)
        return lambda x: self.progress(start + (end - start) * x, label)

    def dump(self) -> dict[str, Any]:
        return {"figures": self.figures, "series": self.series, "notes": self.notes}


# ------------------------------------------------------------------ the machine


def machine(pin: int | None) -> dict[str, Any]:
    import platform
    import subprocess

    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    mem = psutil.virtual_memory()
    return {
        "cpu_model": model,
        "cpu_count": os.cpu_count(),
        "cpus_allowed": sorted(os.sched_getaffinity(0)),
        "memory_mib": mem.total >> 20,
        "memory_available_mib_at_start": mem.available >> 20,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "kernel": platform.release(),
        "start_method": os.environ.get("RUNTIME_START_METHOD", "fork"),
        "pinned_cpu": pin,
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
    }
