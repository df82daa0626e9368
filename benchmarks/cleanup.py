"""Cleanup latency: how soon a death is known, and how soon it is repaired.

With 10 and with 1,000 other buckets alive (50 in --quick), each monitored by
the embedding process too, which measures:

- SIGKILL of a bucket until the embedding process receives its ``Down``;
- SIGKILL of a bucket until ``kv.registry.lookup`` no longer returns it (a
  lookup in a loop, bounded);
- SIGKILL of a supervised GenServer until its replacement has answered a call
  (crash to restarted-and-serving).

Floors, interleaved kill by kill: SIGKILL of a started, idle ``multiprocessing``
child (fork) until its sentinel fires (the kernel's part of any death notice);
for the restart also that plus a new forked child started until its first
message (what a minimal supervisor would do). Victims are started before each
round of 10 kills, untimed.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import kv
import runtime
from benchmarks import _rt_targets
from benchmarks.floors import MpSentinel
from benchmarks.harness import IDLE_PROCESS_BYTES, Recorder, Sampler, affordable, interleave
from kv import registry

REG = "kv.registry"
TIMEOUT = _rt_targets.TIMEOUT


class Victims(Sampler):
    """Buckets created before each round; a sample kills one."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.count = 0
        self.victims: list[tuple[str, runtime.Pid, Any]] = []

    def before_round(self, k: int) -> None:
        for _ in range(k):
            name = f"{self.prefix}-{self.count}"
            self.count += 1
            pid = registry.create(REG, name)
            self.victims.append((name, pid, runtime.monitor(pid)))

    def after_round(self) -> None:
        for _, pid, ref in self.victims:
            runtime.demonitor(ref, flush=True)
            runtime.exit(pid, "kill")
        self.victims.clear()


class KillToDown(Victims):
    def sample(self) -> float:
        _, pid, ref = self.victims.pop()
        t0 = time.perf_counter()
        os.kill(pid.os_pid, signal.SIGKILL)
        runtime.receive(timeout=TIMEOUT,
                        match=lambda m: isinstance(m, runtime.Down) and m.ref == ref)
        return time.perf_counter() - t0


def kill_until_gone(reg: str, name: str, pid: runtime.Pid) -> float:
    """SIGKILL the bucket ``pid`` until registry ``reg`` no longer names it (bounded)."""
    t0 = time.perf_counter()
    os.kill(pid.os_pid, signal.SIGKILL)
    deadline = time.monotonic() + TIMEOUT
    while registry.lookup(reg, name) is not None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{reg} still names {name} {TIMEOUT} s after its death")
    return time.perf_counter() - t0


class KillToNameGone(Victims):
    def sample(self) -> float:
        name, pid, ref = self.victims.pop()
        elapsed = kill_until_gone(REG, name, pid)
        runtime.demonitor(ref, flush=True)
        return elapsed


class Restart(Sampler):
    """A supervised Probe, killed; until its replacement answered a call."""

    def __init__(self) -> None:
        me = runtime.self()
        self.sup = runtime.Supervisor.start_link([(_rt_targets.Probe, me)],
                                                 max_restarts=1_000_000, max_seconds=1.0)
        self.child = self._up()

    @staticmethod
    def _up() -> runtime.Pid:
        msg = runtime.receive(timeout=TIMEOUT, match=lambda m: isinstance(m, tuple)
                              and m[0] == "up")
        return msg[1]  # type: ignore[no-any-return]

    def sample(self) -> float:
        t0 = time.perf_counter()
        os.kill(self.child.os_pid, signal.SIGKILL)
        self.child = self._up()
        runtime.call(self.child, "ping")
        return time.perf_counter() - t0

    def close(self) -> None:
        runtime.stop(self.sup)


def run(rec: Recorder) -> None:
    sizes = (10, 50) if rec.quick else (10, 1000)
    n, seconds = (10, 3.0) if rec.quick else (60, 12.0)
    kv.start()
    others: list[Any] = []  # monitor refs of the others
    try:
        for i, size in enumerate(sizes):
            fit, note = affordable(size - len(others) + 3 * n, IDLE_PROCESS_BYTES)
            if note:
                rec.note(f"cleanup: {note}; measured with {len(others) + fit} others")
            rec.progress(i / len(sizes), f"starting {size} other buckets")
            goal = min(size, len(others) + fit)
            while len(others) < goal:
                others.append(runtime.monitor(registry.create(REG, f"other-{len(others)}")))
            live = len(others)
            restart = Restart()
            samplers: dict[str, Any] = {
                "down": KillToDown(f"down-{live}"), "gone": KillToNameGone(f"gone-{live}"),
                "restart": restart, "sentinel": MpSentinel(),
                "restart_floor": MpSentinel(restart=True)}
            try:
                got = interleave(samplers, n, seconds, per_round=10, tick=rec.ticker(
                    (i + 0.3) / len(sizes), (i + 1) / len(sizes), f"kills with {live} others"))
            finally:
                restart.close()
            sentinel = "SIGKILL to a multiprocessing child's sentinel"
            rec.figure(f"kill_to_down.{size}", f"SIGKILL to Down, {live} other buckets alive",
                       got["down"], got["sentinel"], sentinel, unit="us",
                       target=1.3, headline=True)
            rec.figure(f"kill_to_name_gone.{size}", f"SIGKILL to the name gone from the "
                       f"registry, {live} others alive", got["gone"], got["sentinel"], sentinel,
                       unit="us", headline=size == sizes[-1])
            rec.figure(f"restart.{size}.sentinel", f"crash (SIGKILL) to restarted and serving, "
                       f"{live} others alive", got["restart"], got["sentinel"], sentinel,
                       unit="us")
            rec.figure(f"restart.{size}.restart", f"crash (SIGKILL) to restarted and serving, "
                       f"{live} others alive", got["restart"], got["restart_floor"],
                       "the sentinel, then a new forked child's first message", unit="us",
                       headline=size == sizes[-1])
    finally:
        for ref in others:
            runtime.demonitor(ref, flush=True)
        rec.progress(0.99, "stopping the tree")
        kv.stop()
    rec.progress(1.0, "done")
