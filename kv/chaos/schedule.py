"""The seeded schedule of faults: their kinds, how often each family is drawn, and
the restart budget that spaces the faults on a supervisor's children."""

from __future__ import annotations

import random
import time
from collections.abc import Iterable

from .. import server as kv_server
from .. import supervisor as kv_supervisor

__all__ = ["KINDS", "SUPERVISED_BY", "WEIGHTS", "RestartBudget", "Schedule", "family",
           "supervisor_of"]

# family.how: how is "kill" (SIGKILL), "raise" (an exception inside one of its
# callbacks) or "exit" (an exit signal with reason "chaos", for processes that are
# busy in their own code and take no request: the acceptor and the connections).
KINDS = (
    "bucket.kill", "bucket.raise",
    "registry.kill", "registry.raise",
    "bucket_supervisor.kill", "bucket_supervisor.raise",
    "connection.kill", "connection.exit",
    "acceptor.kill", "acceptor.exit",
    "tasks.kill", "tasks.raise",
)
# After the first round (every kind once), how often each family is drawn.
WEIGHTS = {"bucket": 4.0, "connection": 3.0, "registry": 0.5, "bucket_supervisor": 0.5,
           "acceptor": 1.0, "tasks": 0.5}
# The supervisor whose restart intensity a family's faults use up.
SUPERVISED_BY = {"registry": kv_supervisor.SUPERVISOR,
                 "bucket_supervisor": kv_supervisor.SUPERVISOR,
                 "acceptor": kv_server.SUPERVISOR, "tasks": kv_server.SUPERVISOR}
# Both supervisors run with the defaults: at most 3 restarts in any 5 s. A fault is
# injected only if fewer than 3 of its supervisor's recoveries ended in the last
# 5 s plus this margin (a restart happens before its recovery ends).
MAX_RESTARTS = 3
MAX_SECONDS = 5.0
BUDGET_MARGIN = 0.5


def family(kind: str) -> str:
    """The family of a fault kind: ``"bucket"`` for ``"bucket.kill"``."""
    return kind.split(".")[0]


def supervisor_of(kind: str) -> str | None:
    """The supervisor whose restarts a fault of ``kind`` uses up; None if neither's."""
    return SUPERVISED_BY.get(family(kind))


class Schedule:
    """The seeded sequence of faults: each kind once, in a shuffled first round, then
    kinds drawn by :data:`WEIGHTS`. Each fault is ``(kind, pick, delay)``: ``pick`` is
    a number that chooses the target among those alive (see ``Faults.target``),
    ``delay`` the seconds to wait before it. Draws do not depend on timing.

    The first round starts with the faults that use up a supervisor's restarts,
    alternating between the two supervisors: the fourth on one supervisor must wait
    for the restart intensity's window, so it had better be drawn early."""

    def __init__(self, seed: int, kinds: Iterable[str], interval: float) -> None:
        self.rng = random.Random(seed)
        self.kinds = list(kinds)
        self.interval = interval
        first = self.kinds[:]
        self.rng.shuffle(first)
        queues: dict[str | None, list[str]] = {}
        for kind in first:
            queues.setdefault(supervisor_of(kind), []).append(kind)
        free = queues.pop(None, [])
        self.first = []
        while any(queues.values()):
            for queue in queues.values():
                if queue:
                    self.first.append(queue.pop(0))
        self.first += free
        self.weights = [WEIGHTS[family(k)] for k in self.kinds]

    def next(self) -> tuple[str, int, float]:
        rng = self.rng
        kind = self.first.pop(0) if self.first else rng.choices(self.kinds, self.weights)[0]
        pick = rng.randrange(1 << 30)
        delay = rng.uniform(0.2, 1.8) * self.interval
        return kind, pick, delay


class RestartBudget:
    """When the recoveries from the faults on each supervisor's children ended, and so
    whether one more fault would stay within its restart intensity."""

    def __init__(self) -> None:
        self._ended: dict[str, list[float]] = {}  # supervisor -> when recoveries ended

    def allows(self, kind: str) -> bool:
        """Fewer than MAX_RESTARTS recoveries of ``kind``'s supervisor ended in the last
        MAX_SECONDS + BUDGET_MARGIN (always, for a kind no supervisor counts)."""
        sup = supervisor_of(kind)
        if sup is None:
            return True
        since = time.monotonic() - MAX_SECONDS - BUDGET_MARGIN
        return sum(1 for t in self._ended.get(sup, []) if t > since) < MAX_RESTARTS

    def spent(self, kind: str) -> None:
        """A recovery from a fault of ``kind`` ended now."""
        sup = supervisor_of(kind)
        if sup is not None:
            self._ended.setdefault(sup, []).append(time.monotonic())
