"""The run: the kv tree and the server started, the clients' load, the loop that
draws and injects the faults, the findings collected, the checks at the end, and
``run``, the entry point."""

from __future__ import annotations

import json
import os
import random
import sys
import tempfile
import threading
import time
from typing import Any, TextIO

import runtime
from runtime import DynamicSupervisor, Pid

from .. import server as kv_server
from .. import supervisor as kv_supervisor
from .checks import Leftovers, check_after_shutdown, check_tree, read_log
from .clients import CONNECT_TIMEOUT, REPLY_TIMEOUT, Client, Pulse, probe
from .faults import Faults
from .ledger import bucket_names
from .lookups import Lookups
from .options import HOST, Options
from .poll import poll
from .progress import Progress
from .report import Report, as_json, format_report
from .schedule import Schedule, supervisor_of

__all__ = ["Chaos", "run"]


class Chaos:
    """The run: setup, load, faults, checks (see :mod:`kv.chaos`). Lives in the
    embedding process; the clients are threads of it."""

    def __init__(self, options: Options, seed: int, out: TextIO) -> None:
        self.options = options
        self.seed = seed
        self.out = out
        self.report = Report(seconds=options.seconds, clients=options.clients, seed=seed)
        names = [name for i in range(options.clients)
                 for name in bucket_names(i, options.buckets)]
        self.lookups = Lookups(self.report, names, random.Random(seed ^ 0x5EED))
        self.port = 0
        self.clients: list[Client] = []
        self.stop = threading.Event()
        self.pulse = Pulse()
        self.family: list[Any] = []  # our OS descendants at the end of the run

    def run(self) -> None:
        """Start the tree and the server, load and faults, check, stop both."""
        kv_sup = kv_supervisor.start()
        try:
            _, self.port = kv_server.start(HOST, self.options.port)
            self.report.port = self.port
            try:
                self._serve(kv_sup)
            finally:
                if runtime.whereis(kv_server.SUPERVISOR) is not None:
                    kv_server.stop()
        finally:
            if runtime.is_alive(kv_sup):
                kv_supervisor.stop()

    def _serve(self, kv_sup: Pid) -> None:
        opts = self.options
        server_sup = runtime.whereis(kv_server.SUPERVISOR)
        if server_sup is None:
            raise runtime.ProcessError("the server's tree did not start")
        leftovers = Leftovers(self.report, self.lookups, kv_sup, server_sup,
                              opts.recovery_timeout)
        # The first probe and lookups open what the run keeps open (connections to the
        # tree's processes), so that the baseline counts them.
        poll(lambda: probe(self.port), opts.recovery_timeout)
        self.lookups.check(self.lookups.names[0])
        DynamicSupervisor.which_children(kv_supervisor.BUCKET_SUPERVISOR)
        DynamicSupervisor.which_children(kv_server.TASKS)
        leftovers.baseline()

        deadline = time.monotonic() + opts.seconds
        self.clients = [Client(i, self.port, opts, self.seed * 1000 + i, deadline, self.stop,
                               self.pulse) for i in range(opts.clients)]
        self.pulse.reset()
        for client in self.clients:
            client.start()
        progress = Progress(self.clients, self.report, self.out, deadline)
        progress.start()
        try:
            self._faults(deadline)
        except KeyboardInterrupt:
            self.report.checks["interrupted"] = "Ctrl-C: the run was cut short"
        finally:
            self.stop.set()
            stopped = time.monotonic()
            for client in self.clients:
                client.join(REPLY_TIMEOUT + CONNECT_TIMEOUT)
            progress.stop()
        self.report.seconds = round(stopped - (deadline - opts.seconds), 1)
        self._collect(stopped)
        check_tree(self.report, kv_sup, server_sup)
        self.family = leftovers.check()

    def _faults(self, deadline: float) -> None:
        """Draw a fault, wait its delay, inject the oldest drawn fault that its
        supervisor's restart budget allows (see ``Faults.allows``); a fault that must
        wait for it is deferred, at most two per supervisor (a third is dropped)."""
        schedule = Schedule(self.seed, self.options.kinds, self.options.interval)
        faults = Faults(self.report, self.lookups, self.port, self.clients,
                        self.options.recovery_timeout)
        pending: list[tuple[str, int]] = []
        while True:
            kind, pick, delay = schedule.next()
            sup = supervisor_of(kind)
            if sup is not None and sum(1 for k, _ in pending if supervisor_of(k) == sup) >= 2:
                self.report.skipped[f"{kind}, restart budget spent"] += 1
            else:
                pending.append((kind, pick))
            self.lookups.idle(min(deadline, time.monotonic() + delay))
            if time.monotonic() >= deadline:
                return
            ready = next((f for f in pending if faults.allows(f[0])), None)
            if ready is None:
                continue
            pending.remove(ready)
            faults.inject(*ready)
            if runtime.whereis(kv_supervisor.SUPERVISOR) is None or \
                    runtime.whereis(kv_server.SUPERVISOR) is None:
                return  # (reported by check_tree)

    def _collect(self, stopped: float) -> None:
        """The clients' counts and findings into the report; the availability check."""
        r = self.report
        for client in self.clients:
            if client.is_alive():
                r.violation("protocol", f"client {client.index} was still waiting for a reply "
                                        "after the run")
            r.ops.update(client.ops)
            r.replies.update(client.replies)
            r.connects += client.connects
            r.refused += client.refused
            r.values_checked += client.ledger.checked
            for problem in client.ledger.violations:
                r.violation("value", problem)
            for problem in client.problems:
                r.violation("protocol", problem)
        r.longest_gap = self.pulse.longest_gap(stopped)
        if r.longest_gap > self.options.max_gap:
            r.violation("availability", f"no request was answered for {r.longest_gap:.2f} s "
                                        f"(bound {self.options.max_gap:g} s)")
        r.buckets_seen_dead = self.lookups.seen_dead


def run(options: Options) -> int:
    """Run the chaos test (see :mod:`kv.chaos`) and print its report on stdout.

    Must run in a process where the runtime has not started yet, in its main thread:
    the node starts here, with its processes' stderr going to the log, and is shut
    down at the end. Blocks for about ``options.seconds`` plus the checks.

    Returns:
        The exit status: 0 if no violation was found, 1 otherwise.
    """
    seed = options.seed if options.seed is not None else random.SystemRandom().randrange(10**6)
    keep_log = options.log is not None
    if options.log is not None:
        log_path = options.log
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    else:
        log_fd, log_path = tempfile.mkstemp(prefix="kv-chaos-", suffix=".log")
    # The runtime's processes inherit fd 2 from this one (the root is started on first
    # use): point it at the log; progress and Python's own errors keep the terminal.
    saved = os.dup(2)
    terminal = os.fdopen(os.dup(saved), "w", buffering=1)
    previous = sys.stderr
    os.dup2(log_fd, 2)
    os.close(log_fd)
    sys.stderr = terminal
    chaos = Chaos(options, seed, options.progress or terminal)
    node_dir = None
    try:
        try:
            node_dir = runtime.system_info().node_dir  # (the node starts on first use)
            chaos.run()
        finally:
            runtime.shutdown()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        sys.stderr = previous
        terminal.close()
    report = chaos.report
    check_after_shutdown(report, chaos.family, node_dir)
    read_log(report, log_path)
    if not keep_log:
        os.unlink(log_path)
    print(format_report(report, options.kinds), flush=True)
    if keep_log:
        print(f"\nthe processes' log: {log_path}", flush=True)
    if options.json:
        with open(options.json, "w") as out:
            json.dump(as_json(report), out, indent=1)
    return 1 if report.violations else 0
