"""``python -m runtime top``: a live tree of a running node's processes.

Run it as the node's owner from another terminal, while a program that embeds the
runtime (``python -m kv serve``, a service of your own) runs::

    python -m runtime top                 # the only live node, refreshed every second
    python -m runtime top --node 12345    # one of several: its directory, or its
                                          # embedding process's OS pid
    python -m runtime top --once          # one snapshot, then exit

Each line is a process, indented under its parent: its Pid, OS pid, registered
names, status (``waiting`` in the runtime, ``running`` its own code, ``exiting``),
message queue length, the number of processes it monitors and of its links, and
its memory (USS, else RSS). A process busy in its own code does not answer within
``--timeout``: it shows as ``running``, with blanks, as ``runtime.info`` does.

``top`` does not join the node: it proves the node's key (which only the node's
owner can read) to each process as an *observer* and asks it for its state (see
``runtime._observe``); it leaves nothing behind, even if killed.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from collections.abc import Sized
from typing import TextIO

from . import _observe
from ._observe import NodeNotFound, ObserveError, Row

__all__ = ["main", "render"]

_COLUMNS = ("PID", "OS PID", "NAME", "STATUS", "MSGQ", "MON", "LINKS", "MEMORY")
_PID_WIDTH = 26
_NAME_WIDTH = 24


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "K", "M", "G"):
        if value < 1024 or unit == "G":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{value:.1f}G"


def _count(values: Sized | int | None) -> str:
    if values is None:
        return "-"
    return str(values if isinstance(values, int) else len(values))


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _lines(rows: list[Row], prefix: str = "", top: bool = True) -> list[str]:
    out = []
    for i, row in enumerate(rows):
        last = i == len(rows) - 1
        branch = "" if top else ("└─ " if last else "├─ ")
        pid = f"<{row.pid.os_pid}.{row.pid.serial}>"
        out.append("  ".join((
            _cut(prefix + branch + pid, _PID_WIDTH).ljust(_PID_WIDTH),
            str(row.os_pid).rjust(7),
            _cut(",".join(row.names) or "-", _NAME_WIDTH).ljust(_NAME_WIDTH),
            row.status.ljust(7),
            _count(row.message_queue_len).rjust(5),
            _count(row.monitors).rjust(4),
            _count(row.links).rjust(5),
            _size(row.memory).rjust(7),
        )))
        deeper = "" if top else prefix + ("   " if last else "│  ")
        out.extend(_lines(row.children, deeper, top=False))
    return out


def render(node_dir: str, rows: list[Row]) -> str:
    """A snapshot as text: a header line, the column titles, a line per process."""
    count = 0
    stack = list(rows)
    while stack:
        row = stack.pop()
        count += 1
        stack.extend(row.children)
    kinds = {row.memory_kind for row in rows}
    memory = "MEMORY" if not kinds else ("USS" if kinds == {"uss"} else "RSS")
    header = "  ".join((
        "PID".ljust(_PID_WIDTH), "OS PID".rjust(7), "NAME".ljust(_NAME_WIDTH),
        "STATUS".ljust(7), "MSGQ".rjust(5), "MON".rjust(4), "LINKS".rjust(5),
        memory.rjust(7),
    ))
    title = (f"node {os.path.basename(node_dir)} ({node_dir}): {count} processes, "
             f"{time.strftime('%H:%M:%S')}")
    return "\n".join([title, header.rstrip(), *(line.rstrip() for line in _lines(rows))])


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {text!r}")
    return value


def parser(prog: str = "python -m runtime top") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="A live tree of a running node's processes (run it as the "
        "node's owner). Nodes are looked for in $RUNTIME_NODE_DIR, else /dev/shm.")
    p.add_argument("--node", metavar="ID",
                   help="the node to show: its directory (a path, or its name rt-...) or "
                        "the OS pid of its embedding process; needed when there are several")
    p.add_argument("--once", action="store_true", help="print one snapshot and exit")
    p.add_argument("--interval", type=_positive_float, default=1.0, metavar="S",
                   help="seconds between refreshes (default: %(default)s)")
    p.add_argument("--timeout", type=_positive_float, default=None, metavar="S",
                   help="how long to wait for each process's answer; a process busy in "
                        "its own code shows as running (default: the interval, at most 0.5)")
    return p


def _describe(node_dir: str) -> str:
    main = _observe.main_os_pid(node_dir)
    what = ""
    if main is not None:
        try:
            with open(f"/proc/{main}/cmdline", "rb") as f:
                what = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            pass
    return f"  {node_dir}  (embedding process {main}: {what or '?'})"


def main(argv: list[str] | None = None, prog: str = "python -m runtime top",
         out: TextIO | None = None) -> int:
    """Run the command; its exit status (0, 1 for no such node, 2 for usage)."""
    args = parser(prog).parse_args(sys.argv[1:] if argv is None else argv)
    out = sys.stdout if out is None else out
    timeout = args.timeout if args.timeout is not None else min(args.interval, 0.5)
    try:
        node_dir = _observe.find_node(args.node)
    except NodeNotFound as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        for candidate in exc.candidates:
            print(_describe(candidate), file=sys.stderr)
        return 2 if exc.candidates else 1
    try:
        observer = _observe.Observer(node_dir)
    except ObserveError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    live = not args.once and out.isatty()
    if live and threading.current_thread() is threading.main_thread():
        # Ended by a terminal or a kill: restore the cursor all the same (below).
        for signo in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(signo, _interrupt)
    try:
        with observer:
            if live:
                out.write("\x1b[?25l")  # hide the cursor while redrawing
            while True:
                text = render(node_dir, observer.snapshot(timeout))
                if not observer.is_live():
                    print(f"{prog}: the node {node_dir} has ended", file=sys.stderr)
                    return 0
                if live:
                    # Home, each line cleared to its end, then the rest of the screen.
                    out.write("\x1b[H" + text.replace("\n", "\x1b[K\n") + "\x1b[K\n\x1b[J")
                else:
                    out.write(text + "\n")
                out.flush()
                if args.once:
                    return 0
                if not live:
                    out.write("\n")
                time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        return 0
    finally:
        if live:
            out.write("\x1b[?25h")
            out.flush()


def _interrupt(signo: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
