"""OTP's invariants under random sequences of spawn, send, monitor, demonitor, link,
exit, stop and crash (hypothesis), checked against a model after every step:

- every monitor gets exactly one ``Down`` (none after ``demonitor(flush=True)``),
  with the reason the model says: the one the process exited with, ``"noproc"``
  if it was dead when monitored;
- an exit signal (``exit``, or one process's to another) and an exit along
  links do what OTP says: ``"kill"`` cannot be trapped and
  becomes ``"killed"``; ``"normal"`` kills no one that does not trap; a process
  that traps gets an ``Exit`` instead (except from its parent, the embedding
  process here, whose exit signal makes a GenServer terminate with that reason);
  the embedding process, which always traps, gets an ``Exit`` for every abnormal
  exit of a process linked to it;
- a message to a live process is answered, in order; to a dead one it is dropped;
- no process is left at the end.

The processes are ``tests.faults._actors.Actor`` servers started by the embedding
process. After each step the test waits (bounded) for everything the model
expects, then takes whatever else has arrived: anything unexpected fails.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import runtime
from runtime import testing
from runtime.testing import wait_until

from ._actors import Actor

WAIT = 10.0  # only reached when something is broken
# RUNTIME_FULL_FAULTS=1: many more sequences (a few minutes)
EXAMPLES = 400 if os.environ.get("RUNTIME_FULL_FAULTS") == "1" else 25


@dataclass
class Proc:
    pid: runtime.Pid
    trap: bool
    life: runtime.Ref  # the model's own monitor: its Down says when and why it died
    alive: bool = True
    links: set[int] = field(default_factory=set)
    main_linked: bool = False


def _key(reason: Any) -> Any:
    """A reason as compared: a Crash by its type and message."""
    if isinstance(reason, runtime.Crash):
        return ("crash", reason.exc_type.rsplit(".", 1)[-1], reason.message)
    return reason


CRASH = ("crash", "RuntimeError", "crash on request")


class Model:
    def __init__(self) -> None:
        self.me = runtime.self()
        self.procs: list[Proc] = []
        self.monitors: dict[runtime.Ref, int] = {}  # active monitor -> process index
        self.expected: list[tuple[str, Any]] = []  # what must arrive, in no set order
        self.pings = 0

    # ------------------------------------------------------------ the model's rules

    def die(self, i: int, reason: Any) -> None:
        """Process ``i`` exits with ``reason``: what everyone who cares must see."""
        p = self.procs[i]
        if not p.alive:
            return
        p.alive = False
        self.expected.append(("down", (p.life, _key(reason))))
        for ref, j in list(self.monitors.items()):
            if j == i:
                del self.monitors[ref]
                self.expected.append(("down", (ref, _key(reason))))
        if p.main_linked and reason != "normal":
            self.expected.append(("exit", (p.pid, _key(reason))))
        links, p.links = p.links, set()
        for j in sorted(links):
            q = self.procs[j]
            q.links.discard(i)
            if not q.alive:
                continue
            if q.trap:
                self.expected.append(("trapped", (q.pid, p.pid, _key(reason))))
            elif reason != "normal":
                self.die(j, reason)

    # ------------------------------------------------------------ the steps

    def step(self, op: tuple) -> None:
        kind = op[0]
        if kind == "spawn":
            trap = op[1]
            pid = Actor.start((self.me, trap))
            self.procs.append(Proc(pid, trap, runtime.monitor(pid)))
            return
        if not self.procs:
            return
        i = op[1] % len(self.procs)
        p = self.procs[i]
        if kind == "send":
            self.pings += 1
            runtime.send(p.pid, ("ping", self.pings))
            if p.alive:
                self.expected.append(("pong", (p.pid, self.pings)))
        elif kind == "monitor":
            ref = runtime.monitor(p.pid)
            if p.alive:
                self.monitors[ref] = i
            else:
                self.expected.append(("down", (ref, "noproc")))
        elif kind == "demonitor":
            mine = sorted(self.monitors, key=lambda r: r.n)
            if mine:
                ref = mine[op[1] % len(mine)]
                assert runtime.demonitor(ref, flush=True) is True
                del self.monitors[ref]
        elif kind == "link":
            j = op[2] % len(self.procs)
            q = self.procs[j]
            if not p.alive:
                try:
                    runtime.call(p.pid, ("link", q.pid))
                    raise AssertionError("a call to a dead process returned")
                except runtime.NoProcError:
                    return
            answer = runtime.call(p.pid, ("link", q.pid), timeout=WAIT)
            if i == j or q.alive:
                assert answer == "ok", (op, answer)
                if i != j:
                    p.links.add(j)
                    q.links.add(i)
            elif p.trap:  # linking to a dead process: an Exit(noproc) instead
                assert answer == "ok", (op, answer)
                self.expected.append(("trapped", (p.pid, q.pid, "noproc")))
            else:
                assert answer == "noproc", (op, answer)
        elif kind == "link_main":
            runtime.link(p.pid)
            if p.alive:
                p.main_linked = True
            else:
                self.expected.append(("exit", (p.pid, "noproc")))
        elif kind == "exit":
            reason = op[2]
            runtime.exit(p.pid, reason)
            if reason == "kill":
                self.die(i, "killed")
            elif p.trap or reason != "normal":
                # (trapping: the exit signal comes from its parent, so it terminates)
                self.die(i, reason)
        elif kind == "exit_from":  # process i sends process j an exit signal
            j, reason = op[2] % len(self.procs), op[3]
            q = self.procs[j]
            if not p.alive:
                try:
                    runtime.call(p.pid, ("exit", q.pid, reason))
                    raise AssertionError("a call to a dead process returned")
                except runtime.NoProcError:
                    return
            dies = None
            if q.alive:
                if reason == "kill":
                    dies = "killed"
                elif q.trap:
                    self.expected.append(("trapped", (q.pid, p.pid, _key(reason))))
                elif reason != "normal" or i == j:  # (OTP: exit(self(), normal) exits)
                    dies = reason
            try:
                answer = runtime.call(p.pid, ("exit", q.pid, reason), timeout=WAIT)
                assert not (i == j and dies is not None), f"{op}: answered {answer!r}"
            except runtime.ExitError as exc:  # it exited itself in the call
                assert i == j and _key(exc.reason) == _key(dies), (op, exc.reason)
            if dies is not None:
                self.die(j, dies)
        elif kind == "stop":
            reason = op[2]
            if p.alive:
                runtime.stop(p.pid, reason, timeout=WAIT)
                self.die(i, reason)
            else:
                try:
                    runtime.stop(p.pid, reason, timeout=WAIT)
                    raise AssertionError("stop of a dead process returned")
                except runtime.NoProcError:
                    pass
        elif kind == "crash":
            runtime.cast(p.pid, "crash")
            if p.alive:
                self.die(i, runtime.Crash("RuntimeError", "crash on request", ""))

    # ------------------------------------------------------------ the checks

    @staticmethod
    def _as_expected(msg: Any) -> tuple[str, Any] | None:
        if isinstance(msg, runtime.Down):
            return ("down", (msg.ref, _key(msg.reason)))
        if isinstance(msg, runtime.Exit):
            return ("exit", (msg.pid, _key(msg.reason)))
        if isinstance(msg, tuple) and msg and msg[0] in ("trapped", "pong"):
            if msg[0] == "trapped":
                return ("trapped", (msg[1], msg[2], _key(msg[3])))
            return ("pong", (msg[1], msg[2]))
        return None

    def check(self, after: Any) -> None:
        """Everything expected arrives, and nothing else has."""
        expected = self.expected
        while expected:
            try:
                msg = runtime.receive(timeout=WAIT)
            except runtime.ReceiveTimeout:
                raise AssertionError(f"after {after}: never arrived: {expected}") from None
            got = self._as_expected(msg)
            assert got in expected, f"after {after}: unexpected {msg!r}; expected {expected}"
            expected.remove(got)
        try:
            msg = runtime.receive(timeout=0)
        except runtime.ReceiveTimeout:
            return
        raise AssertionError(f"after {after}: unexpected {msg!r}")

    def end(self) -> None:
        """Kill every live process: each one's Downs come once, "killed"; then nothing
        more comes, and no process is left."""
        for i, p in enumerate(self.procs):
            if p.alive:
                runtime.exit(p.pid, "kill")
                self.die(i, "killed")
        # (a trapping process linked to another it sees killed may tell us before it is
        # killed itself, or not: those reports are not part of the contract here)
        self.expected = [e for e in self.expected if e[0] != "trapped"]
        pending = list(self.expected)
        self.expected = []
        for _ in range(len(pending) * 4 + 10):
            if not pending:
                break
            try:
                msg = runtime.receive(timeout=WAIT)
            except runtime.ReceiveTimeout:
                break
            got = self._as_expected(msg)
            if got is not None and got[0] == "trapped":
                continue
            assert got in pending, f"at the end: unexpected {msg!r}; expected {pending}"
            pending.remove(got)
        assert not pending, f"at the end: never arrived: {pending}"
        # A duplicate Down would be on its way by now; give it a short, bounded chance.
        try:
            while True:
                msg = runtime.receive(timeout=0.05)
                got = self._as_expected(msg)
                assert got is not None and got[0] == "trapped", f"at the end: extra {msg!r}"
        except runtime.ReceiveTimeout:
            pass
        wait_until(lambda: not testing.node_processes(), what="no process left")


INDEX = st.integers(min_value=0, max_value=7)
REASONS = st.sampled_from(["normal", "shutdown", ("custom", 1)])
OPS = st.one_of(
    st.tuples(st.just("spawn"), st.booleans()),
    st.tuples(st.just("send"), INDEX),
    st.tuples(st.just("monitor"), INDEX),
    st.tuples(st.just("demonitor"), INDEX),
    st.tuples(st.just("link"), INDEX, INDEX),
    st.tuples(st.just("link_main"), INDEX),
    st.tuples(st.just("exit"), INDEX, st.sampled_from(["normal", "kill", "shutdown",
                                                         ("custom", 2)])),
    st.tuples(st.just("exit_from"), INDEX, INDEX, st.sampled_from(["normal", "kill", "shutdown",
                                                                   ("custom", 3)])),
    st.tuples(st.just("stop"), INDEX, REASONS),
    st.tuples(st.just("crash"), INDEX),
)


@pytest.mark.timeout(600 if EXAMPLES > 25 else 60)
@settings(max_examples=EXAMPLES, deadline=None, database=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(OPS, min_size=1, max_size=14).map(lambda ops: [("spawn", False), *ops]))
def test_monitors_links_and_exits_keep_otp_s_invariants(ops):
    model = Model()
    try:
        for n, op in enumerate(ops):
            model.step(op)
            model.check(ops[: n + 1])
    finally:
        model.end()
