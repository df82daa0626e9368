"""The load: client threads over raw TCP, each with its own buckets and its
:class:`~kv.chaos.ledger.Ledger`, the pulse of their answers, and the probe that
tells whether the port answers."""

from __future__ import annotations

import random
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass

from .ledger import Ledger
from .options import HOST, Options

__all__ = ["CONNECT_TIMEOUT", "PROBE_BUCKET", "REPLY_TIMEOUT", "Client", "Pulse", "probe"]

CONNECT_TIMEOUT = 5.0
# A request the server has not answered in this long is a hang (the server's own
# calls time out after 5 s and answer ERROR).
REPLY_TIMEOUT = 15.0
PROBE_BUCKET = "chaos.probe"  # never created: a probe's GET is answered NOT FOUND


class Pulse:
    """When a request was last answered, and the longest stretch without one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = time.monotonic()
        self._longest = 0.0

    def beat(self) -> None:
        now = time.monotonic()
        with self._lock:
            gap = now - self._last
            if gap > self._longest:
                self._longest = gap
            self._last = now

    def reset(self) -> None:
        with self._lock:
            self._last = time.monotonic()

    def longest_gap(self, until: float) -> float:
        """The longest stretch without an answer, counting the one still open at
        ``until``."""
        with self._lock:
            return max(self._longest, until - self._last)


@dataclass
class _Op:
    """A request: its verb, bucket, key and value (as many as the verb takes)."""

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


def probe(port: int) -> bool:
    """A new connection to ``port`` on HOST is answered (a GET of a bucket that does
    not exist: NOT FOUND)."""
    try:
        with socket.create_connection((HOST, port), timeout=2.0) as sock:
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
