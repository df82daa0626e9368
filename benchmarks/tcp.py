"""The kv TCP server under load, against a bare in-process floor, in the same run.

Three servers speak the same protocol on 127.0.0.1:

- ours: ``python -m kv serve --port 0`` (every bucket an OS process, one process
  per connection);
- the floor: a bare single-process Python server (a ``selectors`` loop, the
  buckets plain dicts inside it, the same ``kv.command.parse``, ``TCP_NODELAY``
  and one write per batch): what this machine and Python can do at all when no
  bucket is a process;
- the bound: the shape of ours without the runtime: a bare forked process per
  connection, and per bucket a bare forked process holding a dict, the hop
  between them one round trip on a socketpair (pickled once each way; a batch of
  requests on one bucket in one round trip). For this load only: each
  connection's buckets are its own. What any server costs here once every
  connection and every bucket is a process.

The load client: one OS process per connection, raw sockets. Each connection
creates its own bucket, then runs a PUT phase and a GET phase that checks every
value, ``n`` requests each, with 1 or 8 requests in flight (pipelining: it
writes that many lines, then reads that many replies). All connections start
each phase together; a phase's rate is all its requests over the time from the
first start to the last end. Every socket has a timeout and every wait a bound.

For each shape (1 and 8 connections; 1 and 8 in flight) the three servers are
loaded in turn, each round in another order (the harness's interleave); a
figure's samples are the rounds' rates. The issue's targets: one in flight at
0.6x the floor's rate or better (a cost ratio of 1.67x), and on 8 connections
with pipelining at least twice the floor's one-in-flight rate (0.5x).
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import re
import selectors
import signal
import socket
import subprocess
import sys
import time
from typing import Any

from benchmarks.harness import Recorder, interleave
from kv.command import (
    NOT_FOUND,
    OK,
    UNKNOWN_COMMAND,
    Create,
    Delete,
    Get,
    Put,
    UnknownCommand,
    encode,
    op,
    parse,
    reply,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 30.0  # any single wait; only reached when something is broken
SHAPES = [(1, 1), (8, 1), (1, 8), (8, 8)]  # (connections, in flight)


# ------------------------------------------------------------------ the floor


def floor_server(listener: socket.socket) -> None:
    """The floor: serve the protocol from this one process, buckets as dicts."""
    buckets: dict[str, dict[str, str]] = {}
    pending: dict[socket.socket, bytes] = {}
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    while True:
        for key, _ in sel.select():
            sock = key.fileobj
            if sock is listener:
                conn, _ = listener.accept()
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sel.register(conn, selectors.EVENT_READ)
                pending[conn] = b""
                continue
            assert isinstance(sock, socket.socket)
            try:
                data = sock.recv(256 * 1024)
            except OSError:
                data = b""
            if not data:
                sel.unregister(sock)
                del pending[sock]
                sock.close()
                continue
            data = pending[sock] + data
            end = data.rfind(b"\n")
            if end < 0:
                pending[sock] = data
                continue
            pending[sock] = data[end + 1:]
            replies = []
            for line in data[:end].split(b"\n"):
                try:
                    command = parse(line)
                except UnknownCommand:
                    replies.append(UNKNOWN_COMMAND)
                    continue
                if command.__class__ is Create:
                    buckets.setdefault(command.bucket, {})
                    replies.append(OK)
                    continue
                bucket = buckets.get(command.bucket)
                if bucket is None:
                    replies.append(NOT_FOUND)
                elif command.__class__ is Get:
                    value = bucket.get(command.key)
                    replies.append(b"\r\nOK\r\n" if value is None
                                   else encode(value) + b"\r\nOK\r\n")
                elif command.__class__ is Put:
                    bucket[command.key] = command.value  # type: ignore[union-attr]
                    replies.append(OK)
                elif command.__class__ is Delete:
                    bucket.pop(command.key, None)
                    replies.append(OK)
            sock.sendall(b"".join(replies))


# ------------------------------------------------------------------ the bound


def bound_bucket(channel: socket.socket) -> None:
    """A bucket of the bound: a dict in a process of its own, one round trip per batch."""
    state: dict[str, str] = {}
    while True:
        data = channel.recv(1 << 20)
        if not data:
            os._exit(0)
        results = []
        for operation in pickle.loads(data):
            verb = operation[0]
            if verb == "get":
                results.append(state.get(operation[1]))
            elif verb == "put":
                state[operation[1]] = operation[2]
                results.append(None)
            else:
                results.append(state.pop(operation[1], None))
        channel.sendall(pickle.dumps(results))


def _bound_flush(channels: dict[str, socket.socket], batch: list, replies: list[bytes]) -> None:
    """Run ``batch`` (requests on one bucket) in one round trip; append the replies."""
    if batch:
        channel = channels.get(batch[0].bucket)
        if channel is None:
            replies.extend([NOT_FOUND] * len(batch))
        else:
            channel.sendall(pickle.dumps(tuple(op(c) for c in batch)))
            results = pickle.loads(channel.recv(1 << 20))
            replies.extend(reply(c, r) for c, r in zip(batch, results, strict=True))
        batch.clear()


def bound_connection(conn: socket.socket) -> None:
    """A connection of the bound: its own process; its buckets are forked processes."""
    channels: dict[str, socket.socket] = {}
    pending = b""
    while True:
        data = conn.recv(256 * 1024)
        if not data:
            os._exit(0)
        data = pending + data
        end = data.rfind(b"\n")
        if end < 0:
            pending = data
            continue
        pending = data[end + 1:]
        replies: list[bytes] = []
        batch: list = []
        for line in data[:end].split(b"\n"):
            try:
                command = parse(line)
            except UnknownCommand:
                _bound_flush(channels, batch, replies)
                replies.append(UNKNOWN_COMMAND)
                continue
            if command.__class__ is Create:
                _bound_flush(channels, batch, replies)
                if command.bucket not in channels:
                    ours, theirs = socket.socketpair()
                    if os.fork() == 0:
                        ours.close()
                        conn.close()
                        bound_bucket(theirs)
                    theirs.close()
                    channels[command.bucket] = ours
                replies.append(OK)
                continue
            if batch and batch[0].bucket != command.bucket:
                _bound_flush(channels, batch, replies)
            batch.append(command)
        _bound_flush(channels, batch, replies)
        conn.sendall(b"".join(replies))


def bound_server(listener: socket.socket) -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # (the kernel reaps every child)
    while True:
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if os.fork() == 0:
            listener.close()
            bound_connection(conn)
        conn.close()


def start_in_process(target) -> tuple[multiprocessing.process.BaseProcess, int]:
    listener = socket.create_server(("127.0.0.1", 0), backlog=128)
    port = listener.getsockname()[1]
    proc = multiprocessing.get_context("fork").Process(target=target, args=(listener,),
                                                       daemon=True)
    proc.start()
    listener.close()
    return proc, port


# ------------------------------------------------------------------ ours


def start_ours() -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen([sys.executable, "-m", "kv", "serve", "--port", "0"],
                            cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    found = re.search(r"accepting connections on [^ ]+:(\d+)", line)
    if not found:
        proc.kill()
        raise RuntimeError(f"the server did not start: {line!r}")
    return proc, int(found.group(1))


def stop_ours(proc: subprocess.Popen[str]) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return -1


# ------------------------------------------------------------------ the load


class Lines:
    """Reads reply lines from a socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lines: list[bytes] = []
        self.rest = b""

    def next(self) -> bytes:
        while not self.lines:
            data = self.sock.recv(256 * 1024)
            if not data:
                raise ConnectionError("the server closed the connection")
            data = self.rest + data
            *lines, self.rest = data.split(b"\r\n")
            self.lines = lines[::-1]
        return self.lines.pop()


def client(port: int, index: int, inflight: int, n: int, barrier, results) -> None:
    """One connection: CREATE its bucket, then a PUT phase and a GET phase."""
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        lines = Lines(sock)
        name = f"bench-{index}"
        sock.sendall(f"CREATE {name}\r\n".encode())
        if lines.next() != b"OK":
            raise AssertionError("CREATE failed")
        puts = [b"".join(f"PUT {name} k{j} v{j}-{index}\r\n".encode()
                         for j in range(i, min(n, i + inflight))) for i in range(0, n, inflight)]
        gets = [b"".join(f"GET {name} k{j}\r\n".encode()
                         for j in range(i, min(n, i + inflight))) for i in range(0, n, inflight)]
        expected = [f"v{j}-{index}".encode() for j in range(n)]
        barrier.wait(TIMEOUT)
        t0 = time.perf_counter()
        for i, batch in enumerate(puts):
            sock.sendall(batch)
            for _ in range(min(inflight, n - i * inflight)):
                if lines.next() != b"OK":
                    raise AssertionError("PUT failed")
        t1 = time.perf_counter()
        barrier.wait(TIMEOUT)
        t2 = time.perf_counter()
        j = 0
        for i, batch in enumerate(gets):
            sock.sendall(batch)
            for _ in range(min(inflight, n - i * inflight)):
                value = lines.next()
                if value != expected[j] or lines.next() != b"OK":
                    raise AssertionError(f"GET k{j} returned {value!r}")
                j += 1
        t3 = time.perf_counter()
        sock.close()
        results.put((index, t0, t1, t2, t3, None))
    except BaseException as exc:  # reported to the parent, which fails the run
        barrier.abort()
        results.put((index, 0, 0, 0, 0, repr(exc)))


def load(port: int, connections: int, inflight: int, n: int) -> tuple[float, float]:
    """PUT and GET requests per second of ``connections`` clients."""
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(connections)
    results = ctx.Queue()
    procs = [ctx.Process(target=client, args=(port, i, inflight, n, barrier, results))
             for i in range(connections)]
    for p in procs:
        p.start()
    got = [results.get(timeout=TIMEOUT * 3) for _ in procs]
    for p in procs:
        p.join(TIMEOUT)
    errors = [g[5] for g in got if g[5]]
    if errors:
        raise RuntimeError(f"a client failed: {errors[0]}")
    total = n * connections
    put = total / (max(g[2] for g in got) - min(g[1] for g in got))
    get = total / (max(g[4] for g in got) - min(g[3] for g in got))
    return put, get


# ------------------------------------------------------------------ the run


def run(rec: Recorder) -> None:
    rounds, n = (2, 100) if rec.quick else (5, 2000)
    floor_proc, floor_port = start_in_process(floor_server)
    bound_proc, bound_port = start_in_process(bound_server)
    ours_proc, ours_port = start_ours()
    ports = {"floor": floor_port, "bound": bound_port, "ours": ours_port}
    got: dict[tuple[int, int], dict[str, list[Any]]] = {}
    try:
        for i, shape in enumerate(SHAPES):
            samplers = {who: (lambda port=port, shape=shape: load(port, *shape, n))
                        for who, port in ports.items()}
            tick = rec.ticker(i / len(SHAPES), (i + 1) / len(SHAPES),
                              f"{shape[0]} connection(s) x {shape[1]} in flight")
            got[shape] = interleave(samplers, rounds, 300, tick=tick)
    finally:
        code = stop_ours(ours_proc)
        for proc in (floor_proc, bound_proc):
            proc.terminate()
            proc.join(TIMEOUT)
    if code != 0:
        raise RuntimeError(f"the server exited with status {code}")
    names = {"floor": "the bare one-process server, same shape",
             "bound": "a bare process per connection and per bucket, same shape"}
    for (conns, inflight), rates in got.items():
        how = f"{conns} connection{'s' if conns > 1 else ''}, {inflight} in flight"
        for k, phase in enumerate(("put", "get")):
            ours = [r[k] for r in rates["ours"]]
            for other in ("floor", "bound"):
                target = round(1 / 0.6, 2) if inflight == 1 and other == "floor" else None
                rec.figure(f"{conns}x{inflight}.{phase}.{other}", f"TCP {phase.upper()}, {how}",
                           ours, [r[k] for r in rates[other]], names[other], unit="req/s",
                           target=target, headline=other == "floor" and phase == "get")
            if conns == 8 and inflight > 1:
                rec.figure(f"{conns}x{inflight}.{phase}.floor_x1", f"TCP {phase.upper()}, {how}",
                           ours, [r[k] for r in got[(conns, 1)]["floor"]],
                           "the bare one-process server, 1 in flight", unit="req/s",
                           target=0.5, headline=phase == "get")
