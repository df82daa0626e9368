"""``python -m kv chaos``: the kv store and its TCP server under load while faults are
injected, and a check of everything the store promises.

It starts the kv tree and the TCP server (as ``python -m kv serve`` does:
``kv.start()``, then ``kv.server.start``), in this process, which is the runtime's
embedding process. Then, for ``seconds``:

- **Clients** (threads, raw TCP on 127.0.0.1, one connection each, reconnecting
  whenever the server closes it) PUT, GET and DELETE keys of buckets of their own,
  one request or a pipelined batch at a time, and keep a :class:`Ledger` of what
  they wrote: every value they read back is checked against it.
- **Faults** are injected one after another at random intervals (the seed fixes
  their kinds, targets and order; see :data:`KINDS`): SIGKILL, an exception raised
  inside a callback, or an exit signal, on buckets, the registry, the bucket
  supervisor, the connection processes, the task supervisor and the acceptor,
  found through the public API (``runtime.whereis``, ``kv.registry.lookup``,
  ``DynamicSupervisor.which_children``, ``runtime.processes``). After each, the
  time until the name or the port answers again is measured. Faults on the
  children of ``kv.supervisor`` and ``kv.server.supervisor`` are spaced so that
  neither reaches its restart intensity (3 restarts in 5 s): a supervisor that
  gives up would be the schedule's doing, not the store's.
- **Lookups** of the clients' bucket names are made between faults, and each
  result is checked against the buckets whose ``Down`` this process has already
  received.

Violations (each is reported, and makes the exit status 1):

- ``lookup``: the registry returned a bucket whose ``Down`` the caller had received;
- ``value``: a GET returned a value that was not written to that bucket since it
  was created (an older incarnation's, another bucket's, another key's, or one
  never written), or lost a write that the server had confirmed;
- ``protocol``: a reply that the protocol does not allow, or none in time;
- ``availability``: a stretch longer than ``max_gap`` with no request answered;
- ``recovery``: a name or the port that does not answer again in time, an exit
  reason other than the fault's, a bucket that outlives its tree;
- ``leak``: after the run, a process or a zombie left behind, more descriptors in
  a long-lived process or more files in the node's directory than at the start,
  or a supervisor that gave up or could not restart a child (from the log).

The processes' own logs (crash reports) go to ``--log`` (default: a temporary file,
read for restart failures and removed), not to the terminal, so that the progress
line stays readable.
"""

from __future__ import annotations

import functools
import json
import os
import random
import re
import signal
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TextIO

import runtime
from runtime import Agent, Down, DynamicSupervisor, Pid, testing

from . import registry
from . import server as kv_server
from . import supervisor as kv_supervisor

__all__ = ["KINDS", "Ledger", "Options", "run"]

HOST = "127.0.0.1"

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
EXIT_REASON = "chaos"
PROBE_BUCKET = "chaos.probe"  # never created: a probe's GET is answered NOT FOUND

CONNECT_TIMEOUT = 5.0
# A request the server has not answered in this long is a hang (the server's own
# calls time out after 5 s and answer ERROR).
REPLY_TIMEOUT = 15.0
MISSING = ""  # what a GET of a missing key reads: an empty line


@dataclass
class Options:
    """What ``python -m kv chaos`` was asked to do (see ``--help``)."""

    seconds: float = 30.0
    clients: int = 8
    seed: int | None = None
    port: int = 0
    buckets: int = 4  # per client
    keys: int = 8  # per bucket
    interval: float = 0.25  # mean seconds between faults
    max_gap: float = 2.0
    recovery_timeout: float = 15.0
    max_ops: int = 10_000_000  # per client
    kinds: tuple[str, ...] = KINDS
    log: str | None = None
    json: str | None = None
    progress: TextIO | None = None  # default: stderr


# ------------------------------------------------------------------ the client's ledger


class Ledger:
    """What one client wrote to its buckets, and what a GET may therefore return.

    Pure bookkeeping, no I/O. The client calls ``sent_*`` before it sends a request,
    and ``ok_*``, ``unsure_*`` (the reply was ``ERROR`` or the connection closed
    first: its effect is unknown) or ``not_found`` after.

    A bucket has a *generation*: the client's count of the incarnations it has
    seen die. ``NOT FOUND`` proves that the bucket it wrote to is gone, so every
    value written before is from a dead incarnation; the client then CREATEs the
    bucket again and writes values of the next generation. A value read back must
    have been written to that bucket and key in the current generation, and be one
    that the writes the server confirmed leave possible (the last confirmed write,
    or any write whose effect is unknown).
    """

    def __init__(self, client: int, buckets: int) -> None:
        self.client = client
        self.names = [f"c{client}.b{j}" for j in range(buckets)]
        self.generation = dict.fromkeys(self.names, 0)
        self.created = dict.fromkeys(self.names, False)
        self.written: dict[str, dict[str, set[str]]] = {n: {} for n in self.names}
        self.possible: dict[str, dict[str, set[str]]] = {n: {} for n in self.names}
        self.unsure: dict[str, dict[str, set[str]]] = {n: {} for n in self.names}
        self.seq = 0
        self.checked = 0
        self.violations: list[str] = []

    def value(self, name: str, key: str) -> str:
        """A value never written before: ``<bucket>.g<generation>.<key>.<n>``."""
        self.seq += 1
        return f"{name}.g{self.generation[name]}.{key}.{self.seq}"

    def sent_put(self, name: str, key: str, value: str) -> None:
        self.written[name].setdefault(key, set()).add(value)

    def ok_put(self, name: str, key: str, value: str) -> None:
        self.possible[name][key] = {value} | self.unsure[name].get(key, set())

    def ok_delete(self, name: str, key: str) -> None:
        self.possible[name][key] = {MISSING} | self.unsure[name].get(key, set())

    def unsure_put(self, name: str, key: str, value: str) -> None:
        self._unsure(name, key, value)

    def unsure_delete(self, name: str, key: str) -> None:
        self._unsure(name, key, MISSING)

    def _unsure(self, name: str, key: str, value: str) -> None:
        self.unsure[name].setdefault(key, set()).add(value)
        self.possible[name].setdefault(key, {MISSING}).add(value)

    def ok_create(self, name: str) -> None:
        self.created[name] = True

    def not_found(self, name: str) -> None:
        """The bucket is gone: what was written to it is gone with it."""
        self.generation[name] += 1
        self.created[name] = False
        self.written[name].clear()
        self.possible[name].clear()
        self.unsure[name].clear()

    def got(self, name: str, key: str, value: str) -> None:
        """A GET of ``key`` on ``name`` returned ``value`` (MISSING: no such key)."""
        self.checked += 1
        possible = self.possible[name].get(key, {MISSING})
        if value != MISSING and value not in self.written[name].get(key, ()):
            self.violations.append(
                f"GET {name} {key} returned {value!r}: {self._whose(name, key, value)}")
        elif value not in possible:
            shown = sorted(repr(v) for v in possible)
            self.violations.append(
                f"GET {name} {key} returned {value!r}, but the writes the server confirmed "
                f"leave only {', '.join(shown)} possible (a lost write)")
        self.possible[name][key] = {value} | self.unsure[name].get(key, set())

    def _whose(self, name: str, key: str, value: str) -> str:
        found = re.fullmatch(r"(c\d+\.b\d+)\.g(\d+)\.(k\d+)\.(\d+)", value)
        if found is None:
            return "a value no client wrote"
        bucket, generation, vkey, _ = found.groups()
        if bucket != name:
            return f"a value written to another bucket ({bucket})"
        if int(generation) < self.generation[name]:
            return (f"a value written to an earlier incarnation of the bucket (generation "
                    f"{generation}; this one is {self.generation[name]})")
        if vkey != key:
            return f"a value written to another key ({vkey})"
        return "a value this client never wrote there"


# ------------------------------------------------------------------ a client


class Pulse:
    """When a request was last answered, and the longest stretch without one."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.last = time.monotonic()
        self.longest = 0.0
        self.longest_at = 0.0

    def beat(self) -> None:
        now = time.monotonic()
        with self.lock:
            gap = now - self.last
            if gap > self.longest:
                self.longest, self.longest_at = gap, self.last
            self.last = now

    def reset(self) -> None:
        with self.lock:
            self.last = time.monotonic()


@dataclass
class _Op:
    verb: str
    name: str
    key: str = ""
    value: str = ""

    def line(self) -> bytes:
        words = [self.verb, self.name] + ([self.key] if self.key else []) + (
            [self.value] if self.verb == "PUT" else [])
        return (" ".join(words) + "\r\n").encode()


class _Closed(Exception):
    """The server closed the connection (or reset it) before answering."""


class Client(threading.Thread):
    """One client: a connection at a time, its own buckets, its :class:`Ledger`."""

    def __init__(self, index: int, port: int, options: Options, seed: int, deadline: float,
                 stop: threading.Event, pulse: Pulse) -> None:
        super().__init__(name=f"kv-chaos-client-{index}", daemon=True)
        self.index = index
        self.port = port
        self.rng = random.Random(seed)
        self.keys = [f"k{i}" for i in range(options.keys)]
        self.max_ops = options.max_ops
        self.deadline = deadline
        self.stop = stop
        self.pulse = pulse
        self.ledger = Ledger(index, options.buckets)
        self.sock: socket.socket | None = None
        self.buf = b""
        self.address: tuple[str, int] | None = None  # our end of the current connection
        self.ops: Counter[str] = Counter()  # requests sent, by verb
        self.replies: Counter[str] = Counter()  # OK, value, NOT FOUND, ERROR, closed
        self.connects = 0
        self.refused = 0
        self.problems: list[str] = []  # protocol violations

    def run(self) -> None:
        try:
            self._loop()
        except Exception as exc:  # a bug of chaos itself: say so rather than hide it
            self.problems.append(f"client {self.index} failed: {exc!r}")
        finally:
            self._close()

    def _loop(self) -> None:
        delay = 0.005
        sent = 0
        while not self.stop.is_set() and sent < self.max_ops and time.monotonic() < self.deadline:
            if self.sock is None:
                if not self._connect():
                    self.stop.wait(delay)  # (the acceptor restarts: back off a little)
                    delay = min(delay * 2, 0.1)
                    continue
                delay = 0.005
            batch = self._batch()
            sent += len(batch)
            self._exchange(batch)

    def _connect(self) -> bool:
        try:
            sock = socket.create_connection((HOST, self.port), timeout=CONNECT_TIMEOUT)
        except OSError:
            self.refused += 1
            return False
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(REPLY_TIMEOUT)
        self.sock, self.buf = sock, b""
        self.address = sock.getsockname()[:2]
        self.connects += 1
        return True

    def _close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock, self.address = None, None

    def _batch(self) -> list[_Op]:
        rng = self.rng
        names = self.ledger.names
        if rng.random() < 0.7:
            size = 1
        else:
            size = rng.randint(2, 8)
        # Pipelined batches touch one or two buckets, so that the server's runs of
        # requests on one bucket (one call) are exercised.
        chosen = rng.sample(names, min(len(names), 1 if size == 1 else 2))
        for name in chosen:
            if not self.ledger.created[name]:
                return [_Op("CREATE", name)]
        batch = []
        for _ in range(size):
            name = rng.choice(chosen)
            key = rng.choice(self.keys)
            roll = rng.random()
            if roll < 0.45:
                op = _Op("PUT", name, key, self.ledger.value(name, key))
                self.ledger.sent_put(name, key, op.value)
            elif roll < 0.9:
                op = _Op("GET", name, key)
            else:
                op = _Op("DELETE", name, key)
            batch.append(op)
        return batch

    def _exchange(self, batch: list[_Op]) -> None:
        assert self.sock is not None
        for op in batch:
            self.ops[op.verb] += 1
        answered = 0
        try:
            self.sock.sendall(b"".join(op.line() for op in batch))
            for op in batch:
                first = self._line()
                if first == b"ERROR":
                    self.replies["ERROR"] += 1
                    break
                self.pulse.beat()
                answered += 1
                self._answered(op, first)
        except TimeoutError:
            self.problems.append(f"client {self.index}: no reply within {REPLY_TIMEOUT:.0f} s "
                                 f"to {batch[answered].line()!r}")
        except (_Closed, OSError):
            self.replies["closed"] += 1
        if answered == len(batch):
            return
        # ERROR, a close or a hang: the server closes the connection; what the
        # unanswered requests did is unknown.
        for op in batch[answered:]:
            if op.verb == "PUT":
                self.ledger.unsure_put(op.name, op.key, op.value)
            elif op.verb == "DELETE":
                self.ledger.unsure_delete(op.name, op.key)
        self._close()

    def _answered(self, op: _Op, first: bytes) -> None:
        ledger = self.ledger
        if first == b"NOT FOUND" and op.verb != "CREATE":
            self.replies["NOT FOUND"] += 1
            ledger.not_found(op.name)
            return
        if op.verb == "GET":
            second = self._line()
            if second != b"OK":
                self._unexpected(op, first + b"\r\n" + second)
                return
            self.replies["value" if first else "missing"] += 1
            ledger.got(op.name, op.key, first.decode("utf-8", "surrogateescape"))
            return
        if first != b"OK":
            self._unexpected(op, first)
            return
        self.replies["OK"] += 1
        if op.verb == "PUT":
            ledger.ok_put(op.name, op.key, op.value)
        elif op.verb == "DELETE":
            ledger.ok_delete(op.name, op.key)
        else:
            ledger.ok_create(op.name)

    def _unexpected(self, op: _Op, reply: bytes) -> None:
        self.problems.append(f"client {self.index}: {op.line()!r} was answered {reply!r}")
        raise _Closed  # (the rest of the stream cannot be trusted)

    def _line(self) -> bytes:
        assert self.sock is not None
        while b"\r\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise _Closed
            self.buf += data
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line


# ------------------------------------------------------------------ the schedule


class Schedule:
    """The seeded sequence of faults: each kind once, in a shuffled first round, then
    kinds drawn by :data:`WEIGHTS`. Each fault is ``(kind, pick, delay)``: ``pick`` is
    a number that chooses the target among those alive (see ``Chaos.target``),
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
            queues.setdefault(SUPERVISED_BY.get(kind.split(".")[0]), []).append(kind)
        free = queues.pop(None, [])
        self.first = []
        while any(queues.values()):
            for queue in queues.values():
                if queue:
                    self.first.append(queue.pop(0))
        self.first += free
        self.weights = [WEIGHTS[k.split(".")[0]] for k in self.kinds]

    def next(self) -> tuple[str, int, float]:
        rng = self.rng
        kind = self.first.pop(0) if self.first else rng.choices(self.kinds, self.weights)[0]
        pick = rng.randrange(1 << 30)
        delay = rng.uniform(0.2, 1.8) * self.interval
        return kind, pick, delay


# ------------------------------------------------------------------ the driver


@dataclass
class Fault:
    kind: str
    target: str
    recovery: float | None  # seconds from the fault until it answered again


@dataclass
class Report:
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
        self.violations.append((check, detail))


def _sigkill(pid: Pid) -> bool:
    """SIGKILL the runtime process ``pid`` through a pidfd (a recycled OS pid is never
    hit). False if it was dead already."""
    try:
        fd = os.pidfd_open(pid.os_pid)
    except OSError:
        return False
    try:
        if not runtime.is_alive(pid):  # (alive after the open: the pidfd is its)
            return False
        signal.pidfd_send_signal(fd, signal.SIGKILL)
        return True
    finally:
        os.close(fd)


# An Agent update function that raises (KeyError) inside the bucket: it crashes. A
# lambda that uses no global travels by value, so the bucket imports nothing for it.
_explode: Callable[[Any], Any] = lambda state: state["chaos: no such key"]  # noqa: E731


def _poll(predicate: Callable[[], Any], timeout: float) -> Any:
    """Poll ``predicate`` until it is true (its value) or ``timeout`` (None). Only for
    what no message tells: a name registered again, a port that answers."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(delay)
        delay = min(delay * 2, 0.02)


class Chaos:
    """The run: setup, load, faults, checks (see the module doc). Lives in the
    embedding process; the clients are threads of it."""

    def __init__(self, options: Options, seed: int, out: TextIO) -> None:
        self.options = options
        self.seed = seed
        self.out = out
        self.report = Report(seconds=options.seconds, clients=options.clients, seed=seed)
        self.rng = random.Random(seed ^ 0x5EED)  # the lookups between faults
        self.port = 0
        self.clients: list[Client] = []
        self.names: list[str] = []
        self.stop = threading.Event()
        self.pulse = Pulse()
        self.watched: dict[Any, tuple[Pid, str]] = {}  # monitor ref -> bucket, name
        self.seen: set[Pid] = set()  # buckets monitored
        self.dead: set[Pid] = set()  # buckets whose Down this process received
        self.recovered: dict[str, list[float]] = {}  # supervisor -> when recoveries ended
        self.injected: Counter[str] = Counter()
        self.family: list[Any] = []  # our OS descendants at the end of the run

    # -------------------------------------------------------------- the lookup check

    def drain_downs(self) -> None:
        watched = self.watched
        while True:
            try:
                down = runtime.receive(0, lambda m: m.__class__ is Down and m.ref in watched)
            except runtime.ReceiveTimeout:
                return
            self.watched.pop(down.ref, None)
            self.dead.add(down.pid)

    def lookup(self, name: str) -> Pid | None:
        """``kv.registry.lookup(name)``, checked: it must not return a bucket whose
        Down we have received. None also when the registry does not answer."""
        self.drain_downs()
        try:
            pid = registry.lookup(kv_supervisor.REGISTRY, name)
        except runtime.ProcessError:
            return None
        self.report.lookups_checked += 1
        if pid is None:
            return None
        if pid in self.dead:
            self.report.violation("lookup", f"lookup({name!r}) returned {pid!r}, whose Down "
                                            "this process had already received")
            return None
        if pid not in self.seen:
            self.seen.add(pid)
            self.watched[runtime.monitor(pid)] = (pid, name)
        return pid

    def wait_bucket_downs(self, timeout: float) -> list[tuple[Pid, str]]:
        """Wait until every bucket we watch is known dead; those that are not, after
        ``timeout``."""
        deadline = time.monotonic() + timeout
        watched = self.watched
        while watched:
            try:
                down = runtime.receive(max(0.0, deadline - time.monotonic()),
                                       lambda m: m.__class__ is Down and m.ref in watched)
            except runtime.ReceiveTimeout:
                break
            self.watched.pop(down.ref, None)
            self.dead.add(down.pid)
        return list(self.watched.values())

    def idle(self, until: float) -> None:
        """Until ``until``: check lookups of random bucket names, 50 a second."""
        while True:
            now = time.monotonic()
            if now >= until:
                return
            self.lookup(self.rng.choice(self.names))
            time.sleep(min(0.02, max(0.0, until - now)))

    # -------------------------------------------------------------- targets

    def target(self, family: str, pick: int) -> tuple[Pid, str] | None:
        """The process a fault of ``family`` hits, and a label; None if there is none."""
        if family == "bucket":
            n = len(self.names)
            for i in range(n):
                name = self.names[(pick + i) % n]
                pid = self.lookup(name)
                if pid is not None:
                    return pid, f"bucket {name}"
            return None
        if family == "connection":
            try:
                pids = [c.pid for c in DynamicSupervisor.which_children(kv_server.TASKS)
                        if c.pid is not None]
            except runtime.ProcessError:
                return None
            return self._connection_of(pick % len(self.clients), pids)
        name = {"registry": kv_supervisor.REGISTRY,
                "bucket_supervisor": kv_supervisor.BUCKET_SUPERVISOR,
                "acceptor": kv_server.ACCEPTOR, "tasks": kv_server.TASKS}[family]
        pid = runtime.whereis(name)
        return None if pid is None else (pid, name)

    def _connection_of(self, client: int, pids: list[Pid]) -> tuple[Pid, str] | None:
        """The connection process serving ``client`` (its socket's peer is the
        client's end), or else the first live one after it."""
        import psutil

        if not pids:
            return None
        by_address = {}
        for pid in pids:
            try:
                for conn in psutil.Process(pid.os_pid).net_connections("tcp"):
                    if conn.raddr:
                        by_address[(conn.raddr.ip, conn.raddr.port)] = pid
            except psutil.Error:
                continue
        n = len(self.clients)
        for i in range(n):
            address = self.clients[(client + i) % n].address
            if address is not None and address in by_address:
                return by_address[address], f"connection of client {(client + i) % n}"
        pids.sort(key=lambda p: p.serial)
        return pids[client % len(pids)], "a probe's connection"

    # -------------------------------------------------------------- faults

    def budget_ok(self, family: str) -> bool:
        sup = SUPERVISED_BY.get(family)
        if sup is None:
            return True
        since = time.monotonic() - MAX_SECONDS - BUDGET_MARGIN
        return sum(1 for t in self.recovered.get(sup, []) if t > since) < MAX_RESTARTS

    def inject(self, kind: str, pick: int) -> None:
        family, how = kind.split(".")
        found = self.target(family, pick)
        if found is None:
            self.report.skipped[f"{kind}, no target"] += 1
            return
        victim, label = found
        # The tree's processes before the fault: after it, both must be new (one_for_all).
        old = {victim, *(p for p in map(runtime.whereis, (kv_supervisor.REGISTRY,
                                                          kv_supervisor.BUCKET_SUPERVISOR))
                         if p is not None)}
        ref = runtime.monitor(victim)
        t0 = time.perf_counter()
        if how == "kill":
            done = _sigkill(victim)
        elif how == "exit":
            runtime.exit(victim, EXIT_REASON)
            done = True
        else:
            done = self._raise_in(victim, family)
        if not done:
            runtime.demonitor(ref, flush=True)
            self.report.skipped[f"{kind}, target gone"] += 1
            return
        try:
            down = runtime.receive(self.options.recovery_timeout,
                                   lambda m: m.__class__ is Down and m.ref == ref)
        except runtime.ReceiveTimeout:
            runtime.demonitor(ref, flush=True)
            self.report.violation("recovery", f"{kind}: {label} {victim!r} was still alive "
                                              f"{self.options.recovery_timeout:.0f} s later")
            self.report.faults.append(Fault(kind, label, None))
            return
        if down.reason == "noproc":  # (it ended on its own just before)
            self.report.skipped[f"{kind}, target gone"] += 1
            return
        self.injected[kind] += 1
        self._check_reason(kind, label, down.reason)
        if family == "bucket":
            self.dead.add(victim)
        recovery = self._recover(family, victim, label, t0, old)
        self.report.faults.append(Fault(kind, label, recovery))
        if recovery is None:
            self.report.violation("recovery", f"{kind}: {label} did not answer again within "
                                              f"{self.options.recovery_timeout:.0f} s")
        sup = SUPERVISED_BY.get(family)
        if sup is not None:
            self.recovered.setdefault(sup, []).append(time.monotonic())

    def _raise_in(self, victim: Pid, family: str) -> bool:
        """Make ``victim`` raise inside a callback; False if it was dead already."""
        try:
            if family == "bucket":
                Agent.update(victim, _explode)
            else:  # a request no handle_call knows: the server crashes (as OTP's)
                runtime.call(victim, ("chaos", "a request that makes the server raise"))
        except runtime.NoProcError:
            return False
        except runtime.ExitError:
            return True
        except runtime.ProcessError:
            return True  # (CallTimeout: its Down tells)
        return True  # (it answered: no crash; its Down will not come, and that is a finding)

    def _check_reason(self, kind: str, label: str, reason: Any) -> None:
        how = kind.split(".")[1]
        if how == "kill":
            ok = reason == "killed"
        elif how == "exit":
            ok = reason == EXIT_REASON
        else:
            ok = isinstance(reason, runtime.Crash)
        if not ok:
            self.report.violation("recovery", f"{kind}: {label} exited with {reason!r}")

    def _recover(self, family: str, victim: Pid, label: str, t0: float,
                 old: set[Pid]) -> float | None:
        """Seconds from ``t0`` until the name or the port answers again; None if not
        within the recovery timeout."""
        timeout = self.options.recovery_timeout
        if family == "bucket":
            name = label.split(" ", 1)[1]
            self.lookup(name)  # (checked: it must not return the victim)
            return time.perf_counter() - t0
        if family in ("registry", "bucket_supervisor"):
            if not _poll(lambda: self._tree_answers(old), timeout):
                return None
            took = time.perf_counter() - t0
            # one_for_all: every bucket of the old tree must die; then no lookup
            # may return one of them.
            for pid, name in self.wait_bucket_downs(timeout):
                self.report.violation("recovery", f"bucket {name} {pid!r} outlived its tree "
                                                  f"by {timeout:.0f} s")
            for name in self.names:
                self.lookup(name)
            return took
        if family in ("acceptor", "tasks"):
            name = kv_server.ACCEPTOR if family == "acceptor" else kv_server.TASKS

            def back() -> bool:
                pid = runtime.whereis(name)
                return pid is not None and pid != victim and self.probe()
            return time.perf_counter() - t0 if _poll(back, timeout) else None
        return time.perf_counter() - t0 if _poll(self.probe, timeout) else None

    def _tree_answers(self, old: set[Pid]) -> bool:
        reg = runtime.whereis(kv_supervisor.REGISTRY)
        sup = runtime.whereis(kv_supervisor.BUCKET_SUPERVISOR)
        if reg is None or sup is None or reg in old or sup in old:
            return False
        try:
            registry.lookup(reg, PROBE_BUCKET)
            DynamicSupervisor.count_children(sup)
        except runtime.ProcessError:
            return False
        return True

    def probe(self) -> bool:
        """A new connection to the port is answered (a GET of a bucket that does not
        exist: NOT FOUND)."""
        try:
            with socket.create_connection((HOST, self.port), timeout=2.0) as sock:
                sock.settimeout(2.0)
                sock.sendall(f"GET {PROBE_BUCKET} k\r\n".encode())
                data = b""
                while not data.endswith(b"\r\n"):
                    chunk = sock.recv(100)
                    if not chunk:
                        return False
                    data += chunk
                return data == b"NOT FOUND\r\n"
        except OSError:
            return False

    # -------------------------------------------------------------- the run

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
        root = runtime.system_info().root
        if server_sup is None:
            raise runtime.ProcessError("the server's tree did not start")
        long_lived = {"embedding process": os.getpid(), "runtime root": root.os_pid,
                      kv_supervisor.SUPERVISOR: kv_sup.os_pid,
                      kv_server.SUPERVISOR: server_sup.os_pid}
        # The first probe and lookups open what the run keeps open (connections to the
        # tree's processes), so that the baseline counts them.
        _poll(self.probe, opts.recovery_timeout)
        self.names = [f"c{i}.b{j}" for i in range(opts.clients) for j in range(opts.buckets)]
        self.lookup(self.names[0])
        DynamicSupervisor.which_children(kv_supervisor.BUCKET_SUPERVISOR)
        DynamicSupervisor.which_children(kv_server.TASKS)
        _poll(lambda: self._connections() == 0, opts.recovery_timeout)
        fds = {name: _fds(os_pid) for name, os_pid in long_lived.items()}
        files = self._dir_extra()

        deadline = time.monotonic() + opts.seconds
        self.clients = [Client(i, self.port, opts, self.seed * 1000 + i, deadline, self.stop,
                               self.pulse) for i in range(opts.clients)]
        self.pulse.reset()
        for client in self.clients:
            client.start()
        progress = _Progress(self, deadline)
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
        self._check_tree(kv_sup, server_sup)
        self._check_leftovers(kv_sup, server_sup, root, long_lived, fds, files)

    def _faults(self, deadline: float) -> None:
        """Draw a fault, wait its delay, inject the oldest drawn fault that its
        supervisor's restart budget allows (see ``budget_ok``); a fault that must wait
        for it is deferred, at most two per supervisor (a third is dropped)."""
        schedule = Schedule(self.seed, self.options.kinds, self.options.interval)
        pending: list[tuple[str, int]] = []
        while True:
            kind, pick, delay = schedule.next()
            sup = SUPERVISED_BY.get(kind.split(".")[0])
            if sup is not None and sum(
                    1 for k, _ in pending if SUPERVISED_BY.get(k.split(".")[0]) == sup) >= 2:
                self.report.skipped[f"{kind}, restart budget spent"] += 1
            else:
                pending.append((kind, pick))
            self.idle(min(deadline, time.monotonic() + delay))
            if time.monotonic() >= deadline:
                return
            ready = next((f for f in pending if self.budget_ok(f[0].split(".")[0])), None)
            if ready is None:
                continue
            pending.remove(ready)
            self.inject(*ready)
            if runtime.whereis(kv_supervisor.SUPERVISOR) is None or \
                    runtime.whereis(kv_server.SUPERVISOR) is None:
                return  # (reported by _check_tree)

    def _connections(self) -> int:
        try:
            return DynamicSupervisor.count_children(kv_server.TASKS)["active"]
        except runtime.ProcessError:
            return -1

    def _dir_extra(self) -> set[str]:
        """Files in the node's directory other than the live processes' (each has one,
        named by its serial)."""
        live = {str(p.serial) for p in runtime.processes()}
        return set(testing.node_files()) - live

    def _collect(self, stopped: float) -> None:
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
        with self.pulse.lock:
            last, r.longest_gap = self.pulse.last, self.pulse.longest
        if stopped - last > r.longest_gap:
            r.longest_gap = stopped - last
        if r.longest_gap > self.options.max_gap:
            r.violation("availability", f"no request was answered for {r.longest_gap:.2f} s "
                                        f"(bound {self.options.max_gap:g} s)")
        r.buckets_seen_dead = len(self.dead)

    def _check_tree(self, kv_sup: Pid, server_sup: Pid) -> None:
        for name, pid in ((kv_supervisor.SUPERVISOR, kv_sup), (kv_server.SUPERVISOR, server_sup)):
            if runtime.whereis(name) != pid:
                self.report.violation("recovery", f"{name} is gone: it reached its restart "
                                                  "intensity or was killed")

    def _check_leftovers(self, kv_sup: Pid, server_sup: Pid, root: Pid,
                         long_lived: dict[str, int], fds: dict[str, int], files: set[str]) -> None:
        import psutil

        r = self.report
        timeout = self.options.recovery_timeout
        if not _poll(lambda: self._connections() == 0, timeout):
            r.violation("leak", f"{self._connections()} connection processes outlived their "
                                f"clients by {timeout:.0f} s")
        registered = {pid for pid in map(self.lookup, self.names) if pid is not None}
        try:
            buckets = {c.pid for c in DynamicSupervisor.which_children(
                kv_supervisor.BUCKET_SUPERVISOR) if c.pid is not None}
        except runtime.ProcessError:
            buckets = set()
        for pid in buckets - registered:
            r.violation("leak", f"bucket {pid!r} is alive but no name leads to it")
        tree = {runtime.whereis(n) for n in (kv_supervisor.REGISTRY,
                                             kv_supervisor.BUCKET_SUPERVISOR,
                                             kv_server.TASKS, kv_server.ACCEPTOR)}
        expected = {runtime.self(), root, kv_sup, server_sup, *tree, *buckets}

        def extra() -> list[Pid]:
            return [p for p in runtime.processes() if p not in expected]
        left = [] if _poll(lambda: not extra(), timeout) else extra()
        if left:
            r.violation("leak", f"processes left behind: {left!r}")
        # (the root's warm children and the janitor are not the node's processes)
        system = runtime.system_info()
        known = {p.os_pid for p in runtime.processes()} | {*system.warm_children,
                                                              system.janitor}

        def family() -> tuple[list[int], list[int]]:
            unknown, zombies = [], []
            for proc in psutil.Process().children(recursive=True):
                try:
                    if proc.status() == psutil.STATUS_ZOMBIE:
                        zombies.append(proc.pid)
                    elif proc.pid not in known:
                        unknown.append(proc.pid)
                except psutil.Error:
                    continue
            return unknown, zombies
        _poll(lambda: family() == ([], []), timeout)
        unknown, zombies = family()
        if unknown:
            r.violation("leak", f"OS processes that the runtime does not know: {unknown}")
        if zombies:
            r.violation("leak", f"zombies not reaped: {zombies}")
        r.checks["processes"] = (f"{len(runtime.processes())} at the end (the tree, "
                                 f"{len(buckets)} buckets), none left behind" if
                                 not left and not unknown else "see violations")
        r.checks["zombies"] = str(len(zombies))
        # Our monitors of the live buckets hold a descriptor each: drop them first.
        for ref in list(self.watched):
            runtime.demonitor(ref, flush=True)
        self.watched.clear()
        for name, os_pid in long_lived.items():
            before = fds[name]
            _poll(functools.partial(_fds_at_most, os_pid, before), timeout)
            now = _fds(os_pid)
            r.checks[f"descriptors of {name}"] = f"{before} -> {now}"
            if now > before:
                r.violation("leak", f"{name} (OS pid {os_pid}) has {now - before} more open "
                                    f"descriptors than at the start ({before} -> {now})")
        _poll(lambda: self._dir_extra() <= files, timeout)
        stray = self._dir_extra() - files
        r.checks["node directory"] = (f"{len(files)} files beside the live processes' at the "
                                      f"start ({', '.join(sorted(files))}), "
                                      f"{len(files) + len(stray)} at the end")
        if stray:
            r.violation("leak", f"the node's directory holds files of no live process: "
                                f"{sorted(stray)} (named by serial)")
        self.family = psutil.Process().children(recursive=True)


def _fds_at_most(os_pid: int, n: int) -> bool:
    return _fds(os_pid) <= n


def _fds(os_pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{os_pid}/fd"))
    except OSError:
        return -1


class _Progress(threading.Thread):
    """The progress line on stderr: redrawn in place on a terminal, a line every 5 s
    otherwise."""

    def __init__(self, chaos: Chaos, deadline: float) -> None:
        super().__init__(name="kv-chaos-progress", daemon=True)
        self.chaos = chaos
        self.deadline = deadline
        self.out = chaos.out
        self.tty = self.out.isatty()
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
        chaos = self.chaos
        elapsed = time.monotonic() - self.started_at
        ops = sum(sum(c.ops.values()) for c in chaos.clients)
        errors = sum(c.replies["ERROR"] + c.replies["closed"] for c in chaos.clients)
        violations = len(chaos.report.violations) + sum(
            len(c.ledger.violations) + len(c.problems) for c in chaos.clients)
        faults = chaos.report.faults
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


# ------------------------------------------------------------------ the report


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"


def format_report(r: Report, kinds: Iterable[str]) -> str:
    ops = sum(r.ops.values())
    lines = [
        f"kv chaos: {r.seconds:g} s, {r.clients} clients, seed {r.seed}, "
        f"127.0.0.1:{r.port}",
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


def _as_json(r: Report) -> dict[str, Any]:
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


# ------------------------------------------------------------------ entry point


def run(options: Options) -> int:
    """Run the chaos test (see the module doc) and print its report on stdout.

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
    _check_after_shutdown(report, chaos.family, node_dir)
    _read_log(report, log_path)
    if not keep_log:
        os.unlink(log_path)
    print(format_report(report, options.kinds), flush=True)
    if keep_log:
        print(f"\nthe processes' log: {log_path}", flush=True)
    if options.json:
        with open(options.json, "w") as out:
            json.dump(_as_json(report), out, indent=1)
    return 1 if report.violations else 0


def _check_after_shutdown(report: Report, family: list[Any], node_dir: str | None) -> None:
    import psutil

    def running() -> list[int]:
        alive = []
        for proc in family:
            try:
                if proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc.pid)
            except psutil.Error:
                continue
        return alive
    _poll(lambda: not running(), 5.0)
    left = running()
    if left:
        report.violation("leak", f"processes still running after the node's shutdown: {left}")
    if node_dir is not None and os.path.exists(node_dir):
        report.violation("leak", f"the node's directory {node_dir} is still there after "
                                 "its shutdown")
    report.checks["after shutdown"] = (f"{len(family)} processes of the node gone, its "
                                       "directory removed" if not left and not (
                                           node_dir and os.path.exists(node_dir))
                                       else "see violations")


def _read_log(report: Report, path: str) -> None:
    try:
        with open(path, errors="replace") as log:
            text = log.read()
    except OSError:
        return
    report.crash_reports = len(re.findall(r"^process .* crashed: ", text, re.M))
    for pattern, what in ((r"reached its restart intensity", "a supervisor gave up"),
                          (r"could not restart child", "a supervisor could not restart a "
                                                       "child")):
        n = len(re.findall(pattern, text))
        if n:
            report.violation("recovery", f"{what} ({n} times; see the log)")
