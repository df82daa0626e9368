"""The floors: the fastest equivalent of each of our operations with no runtime,
as :class:`~benchmarks.harness.Sampler` objects to interleave with ours."""

from __future__ import annotations

import multiprocessing
import os
import select
import signal
import struct
import subprocess
import sys
import time
from multiprocessing.connection import Connection, wait
from typing import Any

from benchmarks import _targets
from benchmarks.harness import Sampler

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 30.0  # any single wait of a floor; only reached when something is broken


def _wait_for_stop(stop_r: int, parent: int) -> None:
    """In a floor's child: wait for a byte on ``stop_r`` (other children hold copies
    of its write end, so no EOF comes), or for the parent to be gone."""
    while not select.select([stop_r], [], [], 1.0)[0]:
        if os.getppid() != parent:
            return


class ForkPipe(Sampler):
    """``os.fork`` + a one-byte pipe handshake, from this process; the children stay
    alive (as a new server would) until the round is over, or with ``stay=False``
    exit right after the handshake (as a one-shot task would), reaped when the round
    is over."""

    def __init__(self, stay: bool = True) -> None:
        self.stay = stay
        self.children: list[tuple[int, int]] = []  # (pid, the stop pipe's write end or -1)

    def sample(self) -> float:
        r, w = os.pipe()
        stop_r, stop_w = os.pipe() if self.stay else (-1, -1)
        t0 = time.perf_counter()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                os.write(w, b"x")
                if stop_r >= 0:
                    _wait_for_stop(stop_r, os.getppid())
            finally:
                os._exit(0)
        os.read(r, 1)
        elapsed = time.perf_counter() - t0
        for fd in (r, w, stop_r):
            if fd >= 0:
                os.close(fd)
        self.children.append((pid, stop_w))
        return elapsed

    def after_round(self) -> None:
        for _, stop_w in self.children:
            if stop_w >= 0:
                os.write(stop_w, b"s")
                os.close(stop_w)
        for pid, _ in self.children:
            os.waitpid(pid, 0)
        self.children.clear()


class MpStart(Sampler):
    """``multiprocessing.Process(...).start()`` with ``method`` until the child's first
    message arrives through a ``Pipe``; the children stay alive until the round is over."""

    def __init__(self, method: str) -> None:
        self.ctx = multiprocessing.get_context(method)
        self.children: list[tuple[Any, Connection]] = []

    def sample(self) -> float:
        ready_r, ready_w = self.ctx.Pipe(duplex=False)
        stop_r, stop_w = self.ctx.Pipe(duplex=False)
        t0 = time.perf_counter()
        proc = self.ctx.Process(target=_targets.ready_then_wait, args=(ready_w, stop_r))
        proc.start()
        if not ready_r.poll(TIMEOUT):
            raise RuntimeError(f"a {self.ctx.get_start_method()} child did not start")
        ready_r.recv_bytes()
        elapsed = time.perf_counter() - t0
        for c in (ready_r, ready_w, stop_r):
            c.close()
        self.children.append((proc, stop_w))
        return elapsed

    def after_round(self) -> None:
        for _, stop_w in self.children:
            stop_w.send_bytes(b"s")
            stop_w.close()
        for proc, _ in self.children:
            proc.join(TIMEOUT)
            if proc.exitcode is None:
                proc.kill()
                proc.join()
        self.children.clear()


def idle_child(ctx: Any) -> tuple[Any, Connection]:
    ready_r, ready_w = ctx.Pipe(duplex=False)
    stop_r, stop_w = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_targets.ready_then_wait, args=(ready_w, stop_r))
    proc.start()
    if not ready_r.poll(TIMEOUT):
        raise RuntimeError("a forked child did not start")
    ready_r.recv_bytes()
    for c in (ready_r, ready_w, stop_r):
        c.close()
    return proc, stop_w


class MpSentinel(Sampler):
    """SIGKILL of a started, idle ``multiprocessing`` child (fork) until its sentinel
    fires: the kernel's part of any death notice. ``restart``: and then a new child
    started, until its first message (what a minimal supervisor does)."""

    def __init__(self, restart: bool = False) -> None:
        self.ctx = multiprocessing.get_context("fork")
        self.restart = restart
        self.victims: list[tuple[Any, Connection]] = []
        self.spare: list[tuple[Any, Connection]] = []

    def before_round(self, k: int) -> None:
        self.victims = [idle_child(self.ctx) for _ in range(k)]

    def sample(self) -> float:
        proc, stop_w = self.victims.pop()
        t0 = time.perf_counter()
        os.kill(proc.pid, signal.SIGKILL)
        if not wait([proc.sentinel], TIMEOUT):
            raise RuntimeError("a killed child's sentinel did not fire")
        if self.restart:
            self.spare.append(idle_child(self.ctx))
        elapsed = time.perf_counter() - t0
        proc.join()
        stop_w.close()
        return elapsed

    def after_round(self) -> None:
        for proc, stop_w in self.victims + self.spare:
            stop_w.send_bytes(b"s")
            stop_w.close()
            proc.join(TIMEOUT)
        self.victims.clear()
        self.spare.clear()


class SmallForker:
    """The fork floor measured in a fresh small process (``_targets.fork_server``)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from benchmarks._targets import fork_server; fork_server()"],
            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def _ask(self, cmd: bytes) -> float:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(cmd)
        self.proc.stdin.flush()
        data = self.proc.stdout.read(8)
        if len(data) != 8:
            raise RuntimeError("the fork floor's helper process died")
        return float(struct.unpack("d", data)[0])

    def fork(self) -> float:
        """One fork + pipe handshake; the child stays alive until :meth:`release`."""
        return self._ask(b"f")

    def release(self) -> None:
        self._ask(b"r")

    def kill_per_child(self, n: int) -> float:
        """Fork ``n`` idle children, then SIGKILL and reap them all: seconds per child."""
        return self._ask(b"k" + struct.pack("I", n))

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class PipeEcho:
    """A fork-started child answering on a ``multiprocessing.Pipe``: the messaging floor."""

    def __init__(self) -> None:
        ctx = multiprocessing.get_context("fork")
        self.conn, theirs = ctx.Pipe()
        self.proc = ctx.Process(target=_targets.pipe_server, args=(theirs,))
        self.proc.start()
        theirs.close()

    def call(self, x: Any) -> Any:
        self.conn.send(("call", x))
        return self.conn.recv()

    def cast(self, x: Any) -> None:
        self.conn.send(("cast", x))

    def put(self, x: Any) -> None:
        self.conn.send(("put", x))
        self.conn.recv()

    def get(self) -> Any:
        self.conn.send(("get",))
        return self.conn.recv()

    def sync(self) -> None:
        self.conn.send(("sync",))
        self.conn.recv()

    def close(self) -> None:
        self.conn.send(None)
        self.proc.join(TIMEOUT)
        self.conn.close()


def start_manager() -> Any:
    """A ``multiprocessing`` manager (fork) with an echo object and a dict."""
    manager = _targets.EchoManager(ctx=multiprocessing.get_context("fork"))
    manager.start()
    return manager
