"""python -m benchmarks: the whole suite, each figure beside its floor.

    python -m benchmarks                      # the full suite, a few minutes
    python -m benchmarks --quick              # reduced sizes, under a minute
    python -m benchmarks --only spawn,scale   # some parts (repeatable)
    python -m benchmarks --pin 0              # every part pinned to CPU 0
    python -m benchmarks --no-pin             # not even the parts pinned by default
    python -m benchmarks --compare OLD/results.json
    python -m benchmarks --readme RUN/results.json   # regenerate README's Performance

Writes ``results.json``, ``results.md`` and PNG plots (with the ``bench`` extra:
matplotlib) to ``--out`` (default ``bench-results/<timestamp>``). Progress goes to
stderr; each part's own output to ``<out>/logs/<part>.log``.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from benchmarks import report
from benchmarks.harness import machine

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PART_SLACK = 240.0  # a part running this much longer than its estimate is killed


@dataclass(frozen=True)
class Job:
    part: str
    label: str
    quick_seconds: float  # estimates, for the progress bar and the bound
    full_seconds: float
    env: tuple[tuple[str, str], ...] = ()
    pinned: bool = False  # on one CPU unless --no-pin: its targets are set pinned

    def seconds(self, quick: bool) -> float:
        return self.quick_seconds if quick else self.full_seconds

    def pin(self, args: argparse.Namespace) -> int | None:
        """The CPU this part runs on: ``--pin``'s; for a part measured pinned, the
        first CPU this process may use unless ``--no-pin``; else None (not pinned)."""
        if args.pin is not None:
            return int(args.pin)
        if self.pinned and not args.no_pin:
            return min(os.sched_getaffinity(0))
        return None


PARTS = ("spawn", "messaging", "cleanup", "memory", "scale", "tcp", "embedding")
JOBS = [
    Job("spawn", "spawn (fork)", 5, 30, (("RUNTIME_START_METHOD", "fork"),)),
    Job("spawn", "spawn (spawn)", 8, 40, (("RUNTIME_START_METHOD", "spawn"),)),
    Job("messaging", "messaging", 8, 60),
    Job("cleanup", "cleanup", 7, 50),
    Job("memory", "memory", 4, 25),
    Job("scale", "scale", 5, 200),
    Job("tcp", "tcp", 8, 60),
    Job("embedding", "embedding", 6, 50, pinned=True),
    Job("embedding", "embedding (preloaded)", 3, 30,
        (("RUNTIME_PRELOAD", "benchmarks._rt_targets"),), pinned=True),
]


class Progress:
    """One plain-text bar on stderr: redrawn in place on a terminal, else a line per step."""

    def __init__(self, total: float) -> None:
        self.total = total
        self.done = 0.0
        self.t0 = time.monotonic()
        self.tty = sys.stderr.isatty()
        self.last = ("", -1)
        self.last_draw = 0.0

    def show(self, within: float, label: str, force: bool = False) -> None:
        frac = min(1.0, (self.done + within) / self.total)
        now = time.monotonic()
        key = (label, int(frac * 20))
        if not force and (key == self.last or (self.tty and now - self.last_draw < 0.2)):
            return
        self.last, self.last_draw = key, now
        el = int(now - self.t0)
        bar = "#" * int(frac * 30)
        line = f"[{bar:<30}] {frac * 100:3.0f}% {el // 60}:{el % 60:02d}  {label}"
        if self.tty:
            sys.stderr.write("\r" + line[:120].ljust(120))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def finish(self) -> None:
        if self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


def run_job(job: Job, quick: bool, out: str, pin: int | None, progress: Progress,
            weight: float) -> dict[str, Any]:
    """Run one part in a fresh process; its progress is read from a pipe."""
    name = job.label.replace(" ", "").replace("(", "-").replace(")", "")
    result_path = os.path.join(out, "parts", f"{name}.json")
    log_path = os.path.join(out, "logs", f"{name}.log")
    r, w = os.pipe()
    code = (f"import sys; from benchmarks._part import main; "
            f"sys.exit(main({job.part!r}, {result_path!r}, {quick!r}, {w}, {pin!r}))")
    env = {**os.environ, **dict(job.env)}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                pass_fds=(w,), start_new_session=True)
    os.close(w)
    deadline = time.monotonic() + job.seconds(quick) * 3 + PART_SLACK
    sel = selectors.DefaultSelector()
    sel.register(r, selectors.EVENT_READ)
    buf = b""
    within = 0.0
    killed = False
    progress.show(0, job.label, force=True)
    try:
        while proc.poll() is None:
            if time.monotonic() > deadline:
                killed = True
                os.killpg(proc.pid, signal.SIGKILL)  # the session we started for this part
                proc.wait()
                break
            if sel.select(0.5):
                chunk = os.read(r, 65536)
                if not chunk:  # everyone holding the pipe is gone; wait for the exit
                    sel.unregister(r)
                    proc.wait(max(1.0, deadline - time.monotonic()))
                    break
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    msg = json.loads(line)
                    if msg.get("fraction") is not None:
                        within = max(within, float(msg["fraction"]))
                    progress.show(weight * within, f"{job.label}: {msg.get('label', '')}")
    finally:
        sel.close()
        os.close(r)
    progress.done += weight
    try:
        with open(result_path) as f:
            data: dict[str, Any] = json.load(f)
    except (OSError, ValueError):
        data = {"figures": [], "series": {}, "notes": [], "seconds": None}
        data["error"] = ("killed: it ran past its bound" if killed
                         else f"exited with status {proc.returncode} and no results")
    if data.get("error"):
        data["error"] += f" (see {os.path.relpath(log_path)})"
    return data


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks",
                                 description="The benchmark suite: each figure beside its floor.")
    ap.add_argument("--quick", action="store_true", help="reduced sizes, under a minute")
    ap.add_argument("--out", help="output directory (default: bench-results/<timestamp>)")
    ap.add_argument("--only", action="append", default=[], metavar="NAME",
                    help=f"run only these parts (repeatable or a comma list): {', '.join(PARTS)}")
    pin = ap.add_mutually_exclusive_group()
    pin.add_argument("--pin", type=int, metavar="CPU", help="pin every part to this CPU")
    pin.add_argument("--no-pin", action="store_true",
                     help="pin no part, not even those measured on one CPU by default "
                          "(embedding); the others are not pinned unless --pin")
    ap.add_argument("--compare", metavar="OLD.json",
                    help="print each figure beside an earlier run's, with the change")
    ap.add_argument("--against", metavar="NEW.json",
                    help="with --compare: compare this earlier run instead of running")
    ap.add_argument("--readme", metavar="RESULTS.json",
                    help="regenerate README.md's Performance section from a run, and stop")
    args = ap.parse_args(argv)
    only = [p.strip() for item in args.only for p in item.split(",") if p.strip()]
    unknown = sorted(set(only) - set(PARTS))
    if unknown:
        ap.error(f"unknown part(s) {', '.join(unknown)}; the parts are {', '.join(PARTS)}")
    args.only = only
    if args.pin is not None and args.pin not in os.sched_getaffinity(0):
        ap.error(f"--pin {args.pin}: this process may run on CPUs "
                 f"{sorted(os.sched_getaffinity(0))} only")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.readme:
        print(report.update_readme(args.readme, os.path.join(REPO, "README.md")))
        return 0
    if args.compare and args.against:
        with open(args.compare) as f, open(args.against) as g:
            print(report.compare(json.load(f), json.load(g)))
        return 0
    out = args.out or os.path.join("bench-results", time.strftime("%Y%m%d-%H%M%S"))
    for sub in ("parts", "logs"):
        os.makedirs(os.path.join(out, sub), exist_ok=True)
    jobs = [j for j in JOBS if not args.only or j.part in args.only]
    results: dict[str, Any] = {
        "command": shlex.join(["python", "-m", "benchmarks", *(sys.argv[1:] if argv is None
                                                                 else argv)]),
        "quick": args.quick,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(args.pin),
        "parts": {},
        "figures": [],
        "series": {},
    }
    total = sum(j.seconds(args.quick) for j in jobs)
    progress = Progress(total)
    t0 = time.monotonic()
    for job in jobs:
        pin = job.pin(args)
        data = run_job(job, args.quick, out, pin, progress, job.seconds(args.quick))
        results["parts"][job.label] = {"seconds": data.get("seconds"), "notes": data["notes"],
                                       "error": data.get("error"), "pinned_cpu": pin}
        results["figures"] += data["figures"]
        for key, value in data["series"].items():
            results["series"][key] = value
    progress.show(0, "writing the report", force=True)
    progress.finish()
    results["seconds"] = round(time.monotonic() - t0, 1)
    results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    json_path = os.path.join(out, "results.json")
    with open(json_path, "w") as f:
        json.dump(results, f, indent=1)
    plots, plot_note = report.plots(results, out)
    results["plots"] = plots
    results["plot_note"] = plot_note
    with open(json_path, "w") as f:
        json.dump(results, f, indent=1)
    md = report.markdown(results)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(md)
    print(md)
    if args.compare:
        with open(args.compare) as f:
            print(report.compare(json.load(f), results))
    print(f"results in {out}/ (results.json, results.md{', plots' if plots else ''}); "
          f"{results['seconds']:.0f} s")
    errors = [p for p, d in results["parts"].items() if d["error"]]
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
