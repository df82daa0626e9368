"""The progress line on stderr while the run lasts."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import TextIO

from .clients import Client
from .report import Report

__all__ = ["Progress"]


class Progress(threading.Thread):
    """The progress line on stderr: redrawn in place on a terminal, a line every 5 s
    otherwise. Reads the clients' counters and the report as they grow."""

    def __init__(self, clients: Sequence[Client], report: Report, out: TextIO,
                 deadline: float) -> None:
        super().__init__(name="kv-chaos-progress", daemon=True)
        self.clients = clients
        self.report = report
        self.deadline = deadline
        self.out = out
        self.tty = out.isatty()
        self.done = threading.Event()
        self.started_at = time.monotonic()
        self.last = ""

    def run(self) -> None:
        period = 0.25 if self.tty else 5.0
        while not self.done.wait(period):
            self.show()

    def stop(self) -> None:
        self.done.set()
        self.join(5.0)
        self.show(final=True)

    def show(self, final: bool = False) -> None:
        clients = self.clients
        elapsed = time.monotonic() - self.started_at
        ops = sum(sum(c.ops.values()) for c in clients)
        errors = sum(c.replies["ERROR"] + c.replies["closed"] for c in clients)
        violations = len(self.report.violations) + sum(
            len(c.ledger.violations) + len(c.problems) for c in clients)
        faults = self.report.faults
        last = ""
        if faults and faults[-1].recovery is not None:
            last = f", last {faults[-1].kind} back in {faults[-1].recovery * 1000:.0f} ms"
        total = max(0.0, self.deadline - self.started_at)
        line = (f"kv chaos {min(elapsed, total):5.1f}/{total:.0f} s: {ops:,} ops "
                f"({ops / max(elapsed, 1e-9):,.0f}/s), {len(faults)} faults, "
                f"{sum(1 for f in faults if f.recovery is not None)} recovered{last}; "
                f"{errors} ERROR/closed; violations {violations}")
        if self.tty:
            self.out.write("\r\033[K" + line + ("\n" if final else ""))
        elif line != self.last:
            self.out.write(line + "\n")
        self.last = line
        self.out.flush()
