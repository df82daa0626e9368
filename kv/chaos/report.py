"""The run's report: its record, the text printed at the end, and its JSON."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .options import HOST

__all__ = ["Fault", "Report", "as_json", "format_report"]


@dataclass
class Fault:
    """One fault injected: its kind, a label of its target, and its recovery."""

    kind: str
    target: str
    recovery: float | None  # seconds from the fault until it answered again


@dataclass
class Report:
    """What the run did and found; ``violations`` are ``(check, detail)`` pairs, in the
    order found, and ``checks`` the findings that are not counts, in the order made."""

    seconds: float = 0.0
    clients: int = 0
    seed: int = 0
    port: int = 0
    ops: Counter[str] = field(default_factory=Counter)
    replies: Counter[str] = field(default_factory=Counter)
    connects: int = 0
    refused: int = 0
    values_checked: int = 0
    lookups_checked: int = 0
    buckets_seen_dead: int = 0
    faults: list[Fault] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)
    longest_gap: float = 0.0
    crash_reports: int = 0
    checks: dict[str, str] = field(default_factory=dict)
    violations: list[tuple[str, str]] = field(default_factory=list)

    def violation(self, check: str, detail: str) -> None:
        """Record a violation of ``check`` (lookup, value, protocol, ...)."""
        self.violations.append((check, detail))


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"


def format_report(r: Report, kinds: Iterable[str]) -> str:
    ops = sum(r.ops.values())
    lines = [
        f"kv chaos: {r.seconds:g} s, {r.clients} clients, seed {r.seed}, "
        f"{HOST}:{r.port}",
        "",
        f"operations: {ops:,} ({ops / max(r.seconds, 1e-9):,.0f}/s): "
        + ", ".join(f"{verb} {r.ops[verb]:,}" for verb in ("PUT", "GET", "DELETE", "CREATE")),
        "  replies: " + ", ".join(f"{k} {r.replies[k]:,}" for k in
                                  ("OK", "value", "missing", "NOT FOUND", "ERROR", "closed")),
        f"  connections: {r.connects:,} ({r.refused:,} attempts refused); longest stretch "
        f"without an answer: {_ms(r.longest_gap)}",
        "",
        f"faults injected: {len(r.faults)}",
        f"  {'kind':<24} {'n':>4} {'recovery p50':>13} {'p99':>10} {'max':>10}",
    ]
    for kind in kinds:
        times = [f.recovery for f in r.faults if f.kind == kind and f.recovery is not None]
        n = sum(1 for f in r.faults if f.kind == kind)
        if not times:
            lines.append(f"  {kind:<24} {n:>4} {'-':>13} {'-':>10} {'-':>10}")
            continue
        lines.append(f"  {kind:<24} {n:>4} {_ms(_percentile(times, 0.5)):>13} "
                     f"{_ms(_percentile(times, 0.99)):>10} {_ms(max(times)):>10}")
    lines += [
        "  (recovery: from the fault until the name answers again: for a bucket, its Down and",
        "  a lookup without it; for the registry or the bucket supervisor, a new tree; for the",
        "  others, a new connection to the port is answered)",
    ]
    if r.skipped:
        lines.append("  not injected: "
                     + ", ".join(f"{k} {n}" for k, n in sorted(r.skipped.items())))
    lines += [
        "",
        "checks:",
        f"  values read back and checked: {r.values_checked:,}",
        f"  lookups checked against the buckets known dead: {r.lookups_checked:,} "
        f"({r.buckets_seen_dead:,} buckets seen dead)",
        f"  crash reports in the processes' log: {r.crash_reports}",
    ]
    lines += [f"  {k}: {v}" for k, v in r.checks.items()]
    lines += ["", f"violations: {len(r.violations)}"]
    by_check = Counter(check for check, _ in r.violations)
    for check, n in sorted(by_check.items()):
        details = [d for c, d in r.violations if c == check]
        lines.append(f"  {check}: {n}")
        lines += [f"    - {d}" for d in details[:10]]
        if len(details) > 10:
            lines.append(f"    ... and {len(details) - 10} more")
    return "\n".join(lines)


def as_json(r: Report) -> dict[str, Any]:
    faults: dict[str, dict[str, Any]] = {}
    for f in r.faults:
        entry = faults.setdefault(f.kind, {"n": 0, "recovered": 0, "recovery_s": []})
        entry["n"] += 1
        if f.recovery is not None:
            entry["recovered"] += 1
            entry["recovery_s"].append(round(f.recovery, 6))
    return {"seconds": r.seconds, "clients": r.clients, "seed": r.seed, "port": r.port,
            "ops": dict(r.ops), "replies": dict(r.replies), "connects": r.connects,
            "values_checked": r.values_checked, "lookups_checked": r.lookups_checked,
            "longest_gap_s": r.longest_gap, "faults": faults, "skipped": dict(r.skipped),
            "checks": r.checks, "crash_reports": r.crash_reports,
            "violations": [{"check": c, "detail": d} for c, d in r.violations]}
