"""What the floors run in their children: light on purpose (no runtime, no kv), so
that a ``multiprocessing`` child started by the spawn or forkserver method imports
nothing the floor would not need.
"""

from __future__ import annotations

import os
import signal
import struct
import sys
import time
from multiprocessing.connection import Connection
from multiprocessing.managers import BaseManager, DictProxy
from typing import Any


def ready_then_wait(ready: Connection, stop: Connection) -> None:
    """Say ready, then wait (as a new server would) until told to stop: a byte on
    ``stop`` (a fork child holds a copy of the pipe's write end, so no EOF comes),
    or its parent gone, checked every second (nothing is left behind)."""
    parent = os.getppid()
    ready.send_bytes(b"x")
    try:
        while not stop.poll(1.0):
            if os.getppid() != parent:
                return
    except (EOFError, OSError):
        pass


def pipe_server(conn: Connection) -> None:
    """The messaging floor: ("call", x) is answered with x, ("cast", x) is not,
    ("sync",) with None, ("put", x) keeps x and answers None, ("get",) answers
    what was kept; None ends."""
    kept = None
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        if msg[0] == "call":
            conn.send(msg[1])
        elif msg[0] == "sync":
            conn.send(None)
        elif msg[0] == "put":
            kept = msg[1]
            conn.send(None)
        elif msg[0] == "get":
            conn.send(kept)


class EchoObject:
    def echo(self, x: Any) -> Any:
        return x


class EchoManager(BaseManager):
    """The stdlib's "state in a server process": a proxy's call is a round trip."""


EchoManager.register("Echo", EchoObject)
EchoManager.register("Dict", dict, DictProxy)


def fork_server() -> None:
    """The fork floor in a fresh small process (``python -c``): a big process's own
    fork slows down as it grows, so the floor is measured where nothing grew.

    Commands on stdin, one byte each, answers on stdout as doubles:
    ``f`` fork + one-byte pipe handshake (the child stays alive), answers the time;
    ``r`` releases those children; ``k`` + uint32 n forks n idle children, then
    SIGKILLs and reaps them all, answers the time per child; EOF ends."""
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    children: list[tuple[int, int]] = []

    def answer(x: float) -> None:
        out.write(struct.pack("d", x))
        out.flush()

    while True:
        cmd = inp.read(1)
        if cmd == b"f":
            r, w = os.pipe()
            stop_r, stop_w = os.pipe()
            t0 = time.perf_counter()
            pid = os.fork()
            if pid == 0:
                os.write(w, b"x")
                for _, other in children:
                    os.close(other)
                os.close(stop_w)
                os.read(stop_r, 1)
                os._exit(0)
            os.read(r, 1)
            answer(time.perf_counter() - t0)
            for fd in (r, w, stop_r):
                os.close(fd)
            children.append((pid, stop_w))
        elif cmd == b"r":
            for _, stop_w in children:
                os.close(stop_w)
            for pid, _ in children:
                os.waitpid(pid, 0)
            children.clear()
            answer(0.0)
        elif cmd == b"k":
            (n,) = struct.unpack("I", inp.read(4))
            pids = []
            for _ in range(n):
                pid = os.fork()
                if pid == 0:
                    signal.pause()
                    os._exit(0)
                pids.append(pid)
            t0 = time.perf_counter()
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            for pid in pids:
                os.waitpid(pid, 0)
            answer((time.perf_counter() - t0) / max(1, n))
        else:
            for _, stop_w in children:
                os.close(stop_w)
            for pid, _ in children:
                os.waitpid(pid, 0)
            return
