"""Spawn: from ``spawn`` to the new process's first message back.

Measured from the embedding process and from a runtime process, under the start
method this part's process was given (``RUNTIME_START_METHOD``: the harness runs
the part once per method the runtime supports). Floors, interleaved with ours:

- ``os.fork`` + a one-byte pipe handshake, from the same process as ours;
- ``multiprocessing.Process(...).start()`` with the fork, forkserver and spawn
  methods until the child's first message through a ``Pipe`` (from the embedding
  process only).

Every new process, ours and the floors', stays alive (as a new server would)
until its round of 10 samples is over, then goes, untimed.
"""

from __future__ import annotations

import os
import time
from typing import Any

import runtime
from benchmarks import _rt_targets
from benchmarks.floors import ForkPipe, MpStart
from benchmarks.harness import Recorder, Sampler, interleave


class Spawn(Sampler):
    """``runtime.spawn`` until the first message arrives."""

    def __init__(self) -> None:
        self.me = runtime.self()
        self.pids: list[runtime.Pid] = []

    def sample(self) -> float:
        t0 = time.perf_counter()
        pid = runtime.spawn(_rt_targets.ready, self.me)
        runtime.receive(timeout=_rt_targets.TIMEOUT, match=lambda m: m == "ready")
        elapsed = time.perf_counter() - t0
        self.pids.append(pid)
        return elapsed

    def after_round(self) -> None:
        refs = [runtime.monitor(p) for p in self.pids]
        for pid in self.pids:
            runtime.send(pid, "stop")
        for ref in refs:
            runtime.receive(timeout=_rt_targets.TIMEOUT,
                            match=lambda m, ref=ref: isinstance(m, runtime.Down) and m.ref == ref)
        self.pids.clear()


def _driver(parent: runtime.Pid, n: int, seconds: float) -> None:
    """In a runtime process: ours (its own spawns) against its own os.fork."""
    samplers: dict[str, Any] = {"ours": Spawn(), "os_fork": ForkPipe()}
    interleave(samplers, 2, 30)  # warm-up
    result = interleave(samplers, n, seconds, per_round=10)
    runtime.send(parent, ("spawn-driver", result))


def run(rec: Recorder) -> None:
    method = os.environ.get("RUNTIME_START_METHOD", "fork")
    quick = rec.quick
    n, seconds = (6, 6.0) if quick else (60, 25.0)
    mp_methods = ("fork", "forkserver", "spawn")
    samplers: dict[str, Any] = {"ours": Spawn(), "os_fork": ForkPipe()}
    samplers.update({f"mp_{m}": MpStart(m) for m in mp_methods})
    rec.progress(0.0, f"spawn ({method}): warm-up")
    interleave(samplers, 2, 60)  # the root, the forkserver, the page cache
    got = interleave(samplers, n, seconds, per_round=10,
                     tick=rec.ticker(0.05, 0.6, f"spawn ({method}) from the embedding process"))
    where = "from the embedding process"
    rec.figure(f"{method}.embedding.os_fork", f"spawn to first message {where} ({method})",
               got["ours"], got["os_fork"], "os.fork + pipe handshake, same process", unit="ms",
               headline=method == "fork")
    for m in mp_methods:
        rec.figure(f"{method}.embedding.mp_{m}", f"spawn to first message {where} ({method})",
                   got["ours"], got[f"mp_{m}"], f"multiprocessing.Process, {m}", unit="ms",
                   headline=m == method)

    rec.progress(0.6, f"spawn ({method}) from a runtime process")
    me = runtime.self()
    runtime.spawn(_driver, me, n, seconds)
    _, drv = runtime.receive(timeout=seconds + 120, match=lambda m: isinstance(m, tuple)
                             and m[0] == "spawn-driver")
    rec.figure(f"{method}.runtime.os_fork", f"spawn to first message from a runtime process "
               f"({method})", drv["ours"], drv["os_fork"], "os.fork + pipe handshake, same process",
               unit="ms", target=1.5 if method == "fork" else None, headline=method == "fork")
    rec.progress(1.0, f"spawn ({method}) done")
