"""The lookup check: ``kv.registry.lookup`` never returns a bucket whose ``Down`` the
caller has already received."""

from __future__ import annotations

import random
import time
from typing import Any

import runtime
from runtime import Down, Pid

from .. import registry
from .. import supervisor as kv_supervisor
from .report import Report

__all__ = ["Lookups"]


class Lookups:
    """Checked lookups of the clients' bucket names. Every bucket a lookup returns is
    monitored; a lookup that returns one whose ``Down`` this process has received is a
    ``lookup`` violation in ``report``. Lives in the embedding process (the monitors
    and their ``Down`` messages are its)."""

    def __init__(self, report: Report, names: list[str], rng: random.Random) -> None:
        self.report = report
        self.names = names  # every client's buckets
        self._rng = rng  # the bucket names looked up between faults
        self._watched: dict[Any, tuple[Pid, str]] = {}  # monitor ref -> bucket, name
        self._seen: set[Pid] = set()  # buckets monitored
        self._dead: set[Pid] = set()  # buckets whose Down this process received

    @property
    def seen_dead(self) -> int:
        """How many buckets this process has seen die."""
        return len(self._dead)

    def died(self, pid: Pid) -> None:
        """The bucket ``pid`` is known dead (its Down came on another monitor)."""
        self._dead.add(pid)

    def check(self, name: str) -> Pid | None:
        """``kv.registry.lookup(name)``, checked: it must not return a bucket whose
        Down we have received. None also when the registry does not answer."""
        self.wait_downs(0)
        try:
            pid = registry.lookup(kv_supervisor.REGISTRY, name)
        except runtime.ProcessError:
            return None
        self.report.lookups_checked += 1
        if pid is None:
            return None
        if pid in self._dead:
            self.report.violation("lookup", f"lookup({name!r}) returned {pid!r}, whose Down "
                                            "this process had already received")
            return None
        if pid not in self._seen:
            self._seen.add(pid)
            self._watched[runtime.monitor(pid)] = (pid, name)
        return pid

    def check_all(self) -> set[Pid]:
        """:meth:`check` every bucket name; the buckets found."""
        return {pid for pid in map(self.check, self.names) if pid is not None}

    def idle(self, until: float) -> None:
        """Until ``until``: check lookups of random bucket names, 50 a second."""
        while True:
            now = time.monotonic()
            if now >= until:
                return
            self.check(self._rng.choice(self.names))
            time.sleep(min(0.02, max(0.0, until - now)))

    def wait_downs(self, timeout: float) -> list[tuple[Pid, str]]:
        """Wait until every bucket we watch is known dead; those that are not, after
        ``timeout`` (0: take the Downs that have come, wait for none)."""
        deadline = time.monotonic() + timeout
        watched = self._watched
        while watched:
            try:
                down = runtime.receive(max(0.0, deadline - time.monotonic()),
                                       lambda m: m.__class__ is Down and m.ref in watched)
            except runtime.ReceiveTimeout:
                break
            watched.pop(down.ref, None)
            self._dead.add(down.pid)
        return list(watched.values())

    def unwatch(self) -> None:
        """Drop the monitors of the buckets still watched (each holds a descriptor)."""
        for ref in list(self._watched):
            runtime.demonitor(ref, flush=True)
        self._watched.clear()
