"""Messaging: call round trip, cast throughput, Agent get and update.

Payloads of 100 B, 10 KB and 1 MB (``bytes``), from the embedding process and
from a runtime process (to a server it started itself). Floors, interleaved with
ours sample by sample:

- a ``multiprocessing.Pipe`` to a fork-started child: a round trip of the same
  payload for a call, the same one-way sends then one round trip for casts, a
  request answered with the kept payload for ``Agent.get``, the payload sent and
  acknowledged for ``Agent.update``: always the fastest equivalent;
- a ``multiprocessing`` manager (fork), the stdlib's "state in a server
  process": a proxy's ``echo(payload)`` for a call, a proxied dict's ``d["k"]``
  and ``d["k"] = payload`` for ``Agent.get`` and ``Agent.update``. (A manager has
  no one-way send, so casts have the pipe as their only floor.)

A cast sample is a batch of casts followed by one call (so that all were
handled), divided by the batch: the time per cast, whose inverse is the rate.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import runtime
from benchmarks import _rt_targets
from benchmarks.floors import PipeEcho, start_manager
from benchmarks.harness import Recorder, interleave, timed

PAYLOADS = {"100B": 100, "10KB": 10_000, "1MB": 1_000_000}


def sizes(quick: bool) -> dict[str, tuple[int, int]]:
    """Payload -> (samples, casts per batch)."""
    if quick:
        return {"100B": (30, 20), "10KB": (20, 10), "1MB": (5, 2)}
    return {"100B": (600, 100), "10KB": (400, 50), "1MB": (100, 5)}


def measure(quick: bool, tick: Any = None) -> dict[str, dict[str, list[float]]]:
    """Every operation and payload, ours against both floors, from this process."""
    server = _rt_targets.Echo.start_link()
    agent = runtime.Agent.start_link(dict)
    pipe = PipeEcho()
    manager = start_manager()
    try:
        m_echo = manager.Echo()
        m_dict = manager.Dict()
        seconds = 1.5 if quick else 6.0
        out: dict[str, dict[str, list[float]]] = {}
        plan = sizes(quick)
        for i, (label, (n, batch)) in enumerate(plan.items()):
            payload = b"x" * PAYLOADS[label]
            runtime.Agent.update(agent, functools.partial(_rt_targets.put_k, payload))
            pipe.put(payload)
            m_dict["k"] = payload

            def casts(batch: int = batch, payload: bytes = payload) -> float:
                t0 = time.perf_counter()
                for _ in range(batch):
                    runtime.cast(server, payload)
                runtime.call(server, None)
                return (time.perf_counter() - t0) / batch

            def pipe_casts(batch: int = batch, payload: bytes = payload) -> float:
                t0 = time.perf_counter()
                for _ in range(batch):
                    pipe.cast(payload)
                pipe.sync()
                return (time.perf_counter() - t0) / batch

            update = functools.partial(_rt_targets.put_k, payload)
            ops: dict[str, dict[str, Any]] = {
                "call": {"ours": lambda p=payload: timed(lambda: runtime.call(server, p)),
                         "pipe": lambda p=payload: timed(lambda: pipe.call(p)),
                         "manager": lambda p=payload: timed(lambda: m_echo.echo(p))},
                "cast": {"ours": casts, "pipe": pipe_casts},
                "agent_get": {"ours": lambda: timed(lambda: runtime.Agent.get(
                                  agent, _rt_targets.get_k)),
                              "pipe": lambda: timed(pipe.get),
                              "manager": lambda: timed(lambda: m_dict["k"])},
                "agent_update": {"ours": lambda u=update: timed(lambda: runtime.Agent.update(
                                     agent, u)),
                                 "pipe": lambda p=payload: timed(lambda: pipe.put(p)),
                                 "manager": lambda p=payload: timed(
                                     lambda: m_dict.__setitem__("k", p))},
            }
            for j, (op, samplers) in enumerate(ops.items()):
                interleave(samplers, 3, 5)  # warm-up
                out[f"{op}.{label}"] = interleave(samplers, n, seconds)
                if tick:
                    tick((i * len(ops) + j + 1) / (len(plan) * len(ops)))
        return out
    finally:
        manager.shutdown()
        pipe.close()
        runtime.stop(agent)
        runtime.stop(server)


def _driver(parent: runtime.Pid, quick: bool) -> None:
    runtime.send(parent, ("messaging-driver", measure(quick)))


NAMES = {"call": "call round trip", "cast": "cast, per message (batch + one call)",
         "agent_get": "Agent.get", "agent_update": "Agent.update"}


def run(rec: Recorder) -> None:
    where = {"embedding": measure(rec.quick, rec.ticker(0.0, 0.5, "from the embedding process"))}
    rec.progress(0.5, "from a runtime process")
    runtime.spawn(_driver, runtime.self(), rec.quick)
    where["runtime"] = runtime.receive(timeout=600, match=lambda m: isinstance(m, tuple)
                                       and m[0] == "messaging-driver")[1]
    floors = {"pipe": "multiprocessing.Pipe, forked echo child",
              "manager": "multiprocessing manager (fork) proxy"}
    for place, results in where.items():
        text = ("from the embedding process" if place == "embedding"
                else "between runtime processes")
        for key, got in results.items():
            op, label = key.split(".")
            for floor in ("pipe", "manager"):
                if floor not in got:
                    continue
                target = 1.5 if (op, label, floor) == ("call", "100B", "pipe") else None
                rec.figure(f"{place}.{op}.{label}.{floor}", f"{NAMES[op]} {label}, {text}",
                           got["ours"], got[floor], floors[floor], unit="us",
                           target=target if place == "runtime" else None,
                           headline=floor == "pipe" and label == "100B")
    rec.progress(1.0, "done")
