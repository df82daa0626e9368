"""The faults: how each kind finds its target through the public API, how it is
injected, and how the recovery from it is checked and measured."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any

import runtime
from runtime import Agent, Down, DynamicSupervisor, Pid

from .. import registry
from .. import server as kv_server
from .. import supervisor as kv_supervisor
from .clients import PROBE_BUCKET, Client, probe
from .lookups import Lookups
from .poll import poll
from .report import Fault, Report
from .schedule import RestartBudget

__all__ = ["EXIT_REASON", "Faults"]

EXIT_REASON = "chaos"
# The families whose target is a registered name (a bucket's is its client's name, a
# connection's the process serving a client).
NAMED = {"registry": kv_supervisor.REGISTRY,
         "bucket_supervisor": kv_supervisor.BUCKET_SUPERVISOR,
         "acceptor": kv_server.ACCEPTOR, "tasks": kv_server.TASKS}


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


def _kv_tree() -> tuple[Pid | None, Pid | None]:
    """The registry and the bucket supervisor now (None: not registered)."""
    return (runtime.whereis(kv_supervisor.REGISTRY),
            runtime.whereis(kv_supervisor.BUCKET_SUPERVISOR))


def _tree_answers(old: set[Pid]) -> bool:
    """The kv tree has been replaced (neither process is in ``old``) and answers."""
    reg, sup = _kv_tree()
    if reg is None or sup is None or reg in old or sup in old:
        return False
    try:
        registry.lookup(reg, PROBE_BUCKET)
        DynamicSupervisor.count_children(sup)
    except runtime.ProcessError:
        return False
    return True


class Faults:
    """Injects faults one at a time (:meth:`inject`), each on a target alive at that
    moment, and records in ``report`` each fault and its recovery, or the violation.
    Owns the :class:`~kv.chaos.schedule.RestartBudget` (:meth:`allows`)."""

    def __init__(self, report: Report, lookups: Lookups, port: int,
                 clients: Sequence[Client], recovery_timeout: float) -> None:
        self.report = report
        self.lookups = lookups
        self.port = port
        self.clients = clients
        self.timeout = recovery_timeout
        self._budget = RestartBudget()

    def allows(self, kind: str) -> bool:
        """A fault of ``kind`` now stays within its supervisor's restart intensity."""
        return self._budget.allows(kind)

    # -------------------------------------------------------------- targets

    def target(self, family: str, pick: int) -> tuple[Pid, str] | None:
        """The process a fault of ``family`` hits, and a label; None if there is none."""
        if family == "bucket":
            names = self.lookups.names
            n = len(names)
            for i in range(n):
                name = names[(pick + i) % n]
                pid = self.lookups.check(name)
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
        name = NAMED[family]
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

    # -------------------------------------------------------------- injection

    def inject(self, kind: str, pick: int) -> None:
        family, how = kind.split(".")
        found = self.target(family, pick)
        if found is None:
            self.report.skipped[f"{kind}, no target"] += 1
            return
        victim, label = found
        # The tree's processes before the fault: after it, both must be new (one_for_all).
        old = {victim, *(p for p in _kv_tree() if p is not None)}
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
            down = runtime.receive(self.timeout, lambda m: m.__class__ is Down and m.ref == ref)
        except runtime.ReceiveTimeout:
            runtime.demonitor(ref, flush=True)
            self.report.violation("recovery", f"{kind}: {label} {victim!r} was still alive "
                                              f"{self.timeout:.0f} s later")
            self.report.faults.append(Fault(kind, label, None))
            return
        if down.reason == "noproc" or (family == "connection" and down.reason == "normal"):
            # It ended on its own just before: a connection also ends normally when its
            # client closes, or after an ERROR, which another fault may cause.
            self.report.skipped[f"{kind}, target gone"] += 1
            return
        self._check_reason(kind, label, down.reason)
        if family == "bucket":
            self.lookups.died(victim)
        recovery = self._recover(family, victim, label, t0, old)
        self.report.faults.append(Fault(kind, label, recovery))
        if recovery is None:
            self.report.violation("recovery", f"{kind}: {label} did not answer again within "
                                              f"{self.timeout:.0f} s")
        self._budget.spent(kind)

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

    # -------------------------------------------------------------- recovery

    def _recover(self, family: str, victim: Pid, label: str, t0: float,
                 old: set[Pid]) -> float | None:
        """Seconds from ``t0`` until the name or the port answers again; None if not
        within the recovery timeout."""
        timeout = self.timeout
        if family == "bucket":
            name = label.split(" ", 1)[1]
            self.lookups.check(name)  # (checked: it must not return the victim)
            return time.perf_counter() - t0
        if family in ("registry", "bucket_supervisor"):
            if not poll(lambda: _tree_answers(old), timeout):
                return None
            took = time.perf_counter() - t0
            # one_for_all: every bucket of the old tree must die; then no lookup
            # may return one of them.
            for pid, name in self.lookups.wait_downs(timeout):
                self.report.violation("recovery", f"bucket {name} {pid!r} outlived its tree "
                                                  f"by {timeout:.0f} s")
            self.lookups.check_all()
            return took
        if family in ("acceptor", "tasks"):
            name = NAMED[family]

            def back() -> bool:
                pid = runtime.whereis(name)
                return pid is not None and pid != victim and self._answers()
            return time.perf_counter() - t0 if poll(back, timeout) else None
        return time.perf_counter() - t0 if poll(self._answers, timeout) else None

    def _answers(self) -> bool:
        return probe(self.port)
