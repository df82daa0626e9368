"""Embedding: the speed targets of issue 13, from the embedding process.

What a service that embeds the runtime does from its own process, each against
its floor, interleaved with it sample by sample in the same run:

1. ``call`` round trip of a small tuple to a trivial GenServer, p50 and p99,
   against a ``multiprocessing.Pipe`` round trip of the same tuple to a
   fork-started echo child. Targets: p50 at most 1.3x, p99 at most 2x (the p99
   target is a tail target of the same figure).
2. An isolated spawn, until the new process's first message, against ``os.fork``
   + a pipe handshake from the same process. Target: at most 0.5x. *Isolated*
   means after an idle moment: before each sample (of both sides), untimed, we
   wait (bounded) until the root has as many warm children as
   ``runtime.options().warm_children``, then sleep ``IDLE_GAP`` seconds, in
   which the last of them finishes starting. That sleep is part of the
   definition of "isolated" (a spawn that comes after a quiet moment), not a
   synchronisation: the bounded wait before it is. As in the spawn part, the new
   processes of both sides stay alive until their round of 10 is over.
3. 200 back-to-back spawns, each child sending one message and exiting, the next
   spawn as soon as the message is in: each spawn's time, p50 and p90, against
   the same fork floor run back to back (its children exit after the handshake
   too, reaped after the burst). Target: at most 1.3x for both. A burst is run
   whole (interleaving the floor's forks into it would let the root refill its
   warm children between our spawns): bursts of ours and of the floor alternate,
   each after an idle moment as in 2.
4. Calls from 8 threads at once, each thread calling its own trivial GenServer,
   against 8 threads each with its own ``multiprocessing.Pipe`` to its own
   forked echo child: total calls/s. Target: at least 0.8x the floor's
   throughput, which as a cost ratio (the floor's rate over ours) is at most
   1.25x.
5. 500 concurrent ``runtime.acall`` from one asyncio loop (in this thread), spread
   over the same 8 GenServers, against the 8 threads of sync calls of 4 (the same
   samples): total calls/s. Target: at least 1.0x, so a cost ratio of at most
   1.0x. (This floor is the runtime's own sync calls, as the issue sets it.)

In 4 and 5 every sample makes as many calls on each side; the threads (and the
500 tasks) are made before the clock starts and released at once.

Pinning: the issue measures these pinned to one CPU, and the harness pins a part
only when ``--pin CPU`` is given. So the harness runs this part (``Job.pinned``)
on one CPU by default, everything it starts inheriting it: ``--pin``'s, else the
first CPU the harness may use; ``--no-pin`` runs it unpinned. The part says in a
note where it ran, and the results record it (``parts[...]["pinned_cpu"]``).
Pinned and unpinned are not both measured in one run: the root and the warm
children take the CPUs they may use when they are forked, so unpinned would
need a second fresh process and twice the time.
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
import time
from collections.abc import Callable, Sequence
from operator import eq
from typing import Any

import runtime
from benchmarks import _rt_targets
from benchmarks.floors import TIMEOUT, ForkPipe, PipeEcho
from benchmarks.harness import Recorder, Sampler, interleave, timed
from benchmarks.spawn import Spawn
from runtime import testing

PAYLOAD = ("get", "user:42", 7)  # the small tuple every call carries
IDLE_GAP = 0.02  # seconds of idling before an isolated sample (see 2 above)
BURST = 200  # spawns back to back
THREADS = 8
CONCURRENT = 500  # acalls in flight from one loop
PRELOAD = "benchmarks._rt_targets"  # what the "embedding (preloaded)" job preloads


def settle() -> None:
    """An idle moment: the root's warm children all started (bounded wait), then
    ``IDLE_GAP`` seconds of nothing, for them to finish starting."""
    want = runtime.options().warm_children
    testing.wait_until(lambda: len(testing.warm_children()) >= want, timeout=TIMEOUT,
                       what=f"the root's {want} warm children")
    time.sleep(IDLE_GAP)


class Isolated(Sampler):
    """``inner``'s samples, each after an idle moment (:func:`settle`), untimed."""

    def __init__(self, inner: Sampler) -> None:
        self.inner = inner

    def before_round(self, k: int) -> None:
        self.inner.before_round(k)

    def sample(self) -> Any:
        settle()
        return self.inner.sample()

    def after_round(self) -> None:
        self.inner.after_round()


def spawn_burst(n: int) -> list[float]:
    """``n`` spawns back to back, each until its one-shot child's message: each one's
    time (the children exit by themselves)."""
    me = runtime.self()
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        runtime.spawn(_rt_targets.hello, me, i)
        runtime.receive(timeout=_rt_targets.TIMEOUT, match=functools.partial(eq, ("hello", i)))
        times.append(time.perf_counter() - t0)
    return times


def fork_burst(n: int) -> list[float]:
    """The floor's burst: ``n`` forks + handshakes back to back, the children exiting
    after theirs; reaped after the burst, untimed."""
    forks = ForkPipe(stay=False)
    try:
        return [forks.sample() for _ in range(n)]
    finally:
        forks.after_round()


def threads_rate(calls: Sequence[Callable[[], Any]], per_thread: int) -> float:
    """One thread per callable, each calling it ``per_thread`` times, all released at
    once: total calls/s, from the release to the last thread's end."""
    start = threading.Barrier(len(calls) + 1)
    errors: list[BaseException] = []

    def work(fn: Callable[[], Any]) -> None:
        try:
            start.wait(TIMEOUT)
            for _ in range(per_thread):
                fn()
        except BaseException as exc:  # raised below, in the part's thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(fn,), daemon=True) for fn in calls]
    for t in threads:
        t.start()
    start.wait(TIMEOUT)
    t0 = time.perf_counter()
    for t in threads:
        t.join(TIMEOUT)
    elapsed = time.perf_counter() - t0
    if errors or any(t.is_alive() for t in threads):
        raise RuntimeError(f"a calling thread failed or hung: {errors[:1]!r}")
    return len(calls) * per_thread / elapsed


async def _acalls(servers: list[runtime.Pid], concurrent: int, per_task: int) -> float:
    async def task(server: runtime.Pid) -> None:
        for _ in range(per_task):
            await runtime.acall(server, PAYLOAD)

    loop = asyncio.get_running_loop()
    tasks = [loop.create_task(task(servers[i % len(servers)])) for i in range(concurrent)]
    t0 = time.perf_counter()  # (the tasks start at the first await below)
    await asyncio.gather(*tasks)
    return concurrent * per_task / (time.perf_counter() - t0)


def measure_call(rec: Recorder, n: int, seconds: float) -> None:
    server = _rt_targets.Echo.start_link()
    pipe = PipeEcho()
    try:
        samplers: dict[str, Any] = {"ours": lambda: timed(lambda: runtime.call(server, PAYLOAD)),
                                    "pipe": lambda: timed(lambda: pipe.call(PAYLOAD))}
        interleave(samplers, 50, 5)  # warm-up
        got = interleave(samplers, n, seconds, tick=rec.ticker(0.0, 0.2, "call round trip"))
    finally:
        pipe.close()
        runtime.stop(server)
    rec.figure("call", "call round trip of a small tuple, from the embedding process",
               got["ours"], got["pipe"], "multiprocessing.Pipe, forked echo child", unit="us",
               target=1.3, tail_targets={99: 2.0}, headline=True)


def measure_spawns(rec: Recorder, n: int, seconds: float, bursts: int, burst_seconds: float,
                   burst: int, preloaded: bool = False) -> None:
    """``preloaded``: the root imported the targets' module (``RUNTIME_PRELOAD``); else
    the warm children import it ahead once a target has (``warm_imports``: from the
    warm-up on), and a child forked at a spawn imports it itself."""
    key, how = (".preloaded", ", its target's module preloaded") if preloaded else ("", "")
    samplers: dict[str, Any] = {"ours": Isolated(Spawn()), "os_fork": Isolated(ForkPipe())}
    interleave(samplers, 2, 30)  # warm-up
    got = interleave(samplers, n, seconds, per_round=10,
                     tick=rec.ticker(0.2, 0.45, "isolated spawn"))
    rec.figure(f"spawn.isolated{key}", "spawn to first message, isolated (warm children "
               f"ready), from the embedding process{how}", got["ours"], got["os_fork"],
               "os.fork + pipe handshake, same process", unit="ms", target=0.5,
               headline=True)

    def ours() -> list[float]:
        settle()
        return spawn_burst(burst)

    def floor() -> list[float]:
        settle()
        return fork_burst(burst)

    runs = interleave({"ours": ours, "os_fork": floor}, bursts, burst_seconds,
                      tick=rec.ticker(0.45, 0.7, f"{burst} spawns back to back"))
    rec.figure(f"spawn.back_to_back{key}", f"spawn to first message, {burst} back to back, "
               f"per spawn, from the embedding process{how}",
               [t for run in runs["ours"] for t in run],
               [t for run in runs["os_fork"] for t in run],
               f"os.fork + pipe handshake, same process, {burst} back to back",
               unit="ms", target=1.3, tail_targets={90: 1.3}, headline=True)


def measure_throughput(rec: Recorder, n: int, seconds: float, calls: int) -> None:
    """``calls`` per sample on each side (a multiple of ``THREADS`` and ``CONCURRENT``)."""
    servers = [_rt_targets.Echo.start_link() for _ in range(THREADS)]
    pipes: list[PipeEcho] = []
    loop = asyncio.new_event_loop()
    try:
        pipes += [PipeEcho() for _ in range(THREADS)]
        per_thread, per_task = calls // THREADS, calls // CONCURRENT
        ours_calls = [functools.partial(runtime.call, s, PAYLOAD) for s in servers]
        pipe_calls = [functools.partial(p.call, PAYLOAD) for p in pipes]
        samplers: dict[str, Any] = {
            "threads": lambda: threads_rate(ours_calls, per_thread),
            "pipes": lambda: threads_rate(pipe_calls, per_thread),
            "acall": lambda: loop.run_until_complete(_acalls(servers, CONCURRENT, per_task)),
        }
        interleave(samplers, 2, 10)  # warm-up
        got = interleave(samplers, n, seconds,
                         tick=rec.ticker(0.7, 1.0, f"{THREADS} threads, {CONCURRENT} acalls"))
    finally:
        loop.close()
        for pipe in pipes:
            pipe.close()
        for server in servers:
            runtime.stop(server)
    rec.figure("threads", f"calls from {THREADS} threads at once, own GenServer each",
               got["threads"], got["pipes"],
               f"{THREADS} threads, own multiprocessing.Pipe to a forked echo child each",
               unit="calls/s", target=1 / 0.8, headline=True)
    rec.figure("acall", f"{CONCURRENT} concurrent runtime.acall from one asyncio loop, over "
               f"{THREADS} GenServers", got["acall"], got["threads"],
               f"{THREADS} threads of sync runtime.call, own GenServer each",
               unit="calls/s", target=1.0, headline=True)
    rec.note("embedding: a rate's target is a cost: throughput at least 0.8x the floor's is "
             "a ratio of at most 1.25x, at least the floor's one of at most 1.0x")


def run(rec: Recorder) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    rec.note(f"embedding: pinned to CPU {cpus[0]}, with every process it started"
             if len(cpus) == 1 else
             f"embedding: not pinned (CPUs {cpus}); the issue's targets are set on one CPU")
    if PRELOAD in os.environ.get("RUNTIME_PRELOAD", "").split(","):
        # (the job that runs the part again with the targets' module preloaded: the
        # spawns only, as nothing else depends on it)
        if rec.quick:
            measure_spawns(rec, 10, 1.5, 1, 3.0, BURST, preloaded=True)
        else:
            measure_spawns(rec, 150, 12.0, 8, 15.0, BURST, preloaded=True)
    elif rec.quick:
        measure_call(rec, 500, 1.0)
        measure_spawns(rec, 10, 1.5, 1, 3.0, BURST)
        measure_throughput(rec, 5, 2.0, 1000)
    else:
        measure_call(rec, 20_000, 6.0)
        measure_spawns(rec, 150, 12.0, 8, 15.0, BURST)
        measure_throughput(rec, 40, 12.0, 2000)
    rec.progress(1.0, "done")
