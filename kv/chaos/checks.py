"""The checks at the end of the run: both trees still stand, nothing is left behind
once the clients have closed (processes, zombies, descriptors, files), nothing after
the node's shutdown, and no supervisor gave up (the processes' log)."""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterable
from typing import Any

import runtime
from runtime import DynamicSupervisor, Pid, testing

from .. import server as kv_server
from .. import supervisor as kv_supervisor
from .lookups import Lookups
from .poll import poll
from .report import Report

__all__ = ["Leftovers", "check_after_shutdown", "check_tree", "read_log"]


def check_tree(report: Report, kv_sup: Pid, server_sup: Pid) -> None:
    """Both supervisors are the ones the run started with."""
    for name, pid in ((kv_supervisor.SUPERVISOR, kv_sup), (kv_server.SUPERVISOR, server_sup)):
        if runtime.whereis(name) != pid:
            report.violation("recovery", f"{name} is gone: it reached its restart "
                                         "intensity or was killed")


class Leftovers:
    """The leak check: :meth:`baseline` before the clients start, :meth:`check` after
    they have closed. Long-lived are the processes that are never killed (the
    embedding process, the runtime's root, both supervisors): their descriptors are
    counted at both ends, as are the files in the node's directory that belong to no
    live process."""

    def __init__(self, report: Report, lookups: Lookups, kv_sup: Pid, server_sup: Pid,
                 timeout: float) -> None:
        self.report = report
        self.lookups = lookups
        self.timeout = timeout
        self.kv_sup = kv_sup
        self.server_sup = server_sup
        self.root = runtime.system_info().root
        self.long_lived = {"embedding process": os.getpid(), "runtime root": self.root.os_pid,
                           kv_supervisor.SUPERVISOR: kv_sup.os_pid,
                           kv_server.SUPERVISOR: server_sup.os_pid}
        self.fds: dict[str, int] = {}  # long-lived process -> descriptors at the start
        self.files: set[str] = set()  # the node's directory's extra files at the start

    def baseline(self) -> None:
        """Once no connection is open, count what the run starts with."""
        poll(lambda: _connections() == 0, self.timeout)
        self.fds = {name: _fds(os_pid) for name, os_pid in self.long_lived.items()}
        self.files = _dir_extra()

    def check(self) -> list[Any]:
        """Check what is left after the run; the node's OS processes (psutil), whose
        end :func:`check_after_shutdown` checks."""
        import psutil

        self._check_processes()
        # Our monitors of the live buckets hold a descriptor each: drop them first.
        self.lookups.unwatch()
        self._check_descriptors()
        self._check_files()
        family: list[Any] = psutil.Process().children(recursive=True)
        return family

    def _check_processes(self) -> None:
        """No connection, no bucket without a name, no process outside the tree, no OS
        process the runtime does not know, no zombie."""
        import psutil

        r = self.report
        timeout = self.timeout
        if not poll(lambda: _connections() == 0, timeout):
            r.violation("leak", f"{_connections()} connection processes outlived their "
                                f"clients by {timeout:.0f} s")
        registered = self.lookups.check_all()
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
        sup = runtime.whereis(kv_supervisor.BUCKET_SUPERVISOR)
        sup_info = None if sup is None else runtime.info(sup, timeout=5.0)
        zygotes = set() if sup_info is None or sup_info["zygotes"] is None else \
            set(sup_info["zygotes"])
        expected = {runtime.self(), self.root, self.kv_sup, self.server_sup, *tree, *buckets,
                    *zygotes}

        def extra() -> list[Pid]:
            return [p for p in runtime.processes() if p not in expected]
        left = [] if poll(lambda: not extra(), timeout) else extra()
        if left:
            r.violation("leak", f"processes left behind: {left!r}")
        # (the root's warm children, the children the bucket supervisor's zygote
        # started ahead and the janitor are not the node's processes)
        system = runtime.system_info()
        known = {p.os_pid for p in runtime.processes()} | {*system.warm_children,
                                                              system.janitor}

        def warm_child() -> set[int]:
            zygote_os = {pid.os_pid for pid in zygotes}
            ahead = set()
            for proc in psutil.Process().children(recursive=True):
                try:
                    if proc.ppid() in zygote_os and proc.pid not in known:
                        ahead.add(proc.pid)  # (a runtime process is in known)
                except psutil.Error:
                    pass
            return ahead

        def family() -> tuple[list[int], list[int]]:
            living, zombies = _living(psutil.Process().children(recursive=True))
            ahead = warm_child()
            return [pid for pid in living if pid not in known and pid not in ahead], zombies
        poll(lambda: family() == ([], []), timeout)
        unknown, zombies = family()
        if unknown:
            r.violation("leak", f"OS processes that the runtime does not know: {unknown}")
        if zombies:
            r.violation("leak", f"zombies not reaped: {zombies}")
        r.checks["processes"] = (f"{len(runtime.processes())} at the end (the tree, "
                                 f"{len(buckets)} buckets), none left behind" if
                                 not left and not unknown else "see violations")
        r.checks["zombies"] = str(len(zombies))

    def _check_descriptors(self) -> None:
        """No more open descriptors in a long-lived process than at the start."""
        r = self.report
        for name, os_pid in self.long_lived.items():
            before = self.fds[name]
            poll(functools.partial(_fds_at_most, os_pid, before), self.timeout)
            now = _fds(os_pid)
            r.checks[f"descriptors of {name}"] = f"{before} -> {now}"
            if now > before:
                r.violation("leak", f"{name} (OS pid {os_pid}) has {now - before} more open "
                                    f"descriptors than at the start ({before} -> {now})")

    def _check_files(self) -> None:
        """No more files of no live process in the node's directory than at the start."""
        r = self.report
        files = self.files
        poll(lambda: _dir_extra() <= files, self.timeout)
        stray = _dir_extra() - files
        r.checks["node directory"] = (f"{len(files)} files beside the live processes' at the "
                                      f"start ({', '.join(sorted(files))}), "
                                      f"{len(files) + len(stray)} at the end")
        if stray:
            r.violation("leak", f"the node's directory holds files of no live process: "
                                f"{sorted(stray)} (named by serial)")


def check_after_shutdown(report: Report, family: list[Any], node_dir: str | None) -> None:
    """After the node's shutdown: none of its OS processes ``family`` still running
    (zombies aside: ours to reap), its directory removed."""
    def running() -> list[int]:
        return _living(family)[0]
    poll(lambda: not running(), 5.0)
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


def read_log(report: Report, path: str) -> None:
    """Count the crash reports in the processes' log, and find a supervisor that gave
    up or could not restart a child."""
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


def _living(procs: Iterable[Any]) -> tuple[list[int], list[int]]:
    """The OS pids of ``procs`` (psutil processes) still running, and of the zombies;
    those gone are neither."""
    import psutil

    living, zombies = [], []
    for proc in procs:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                zombies.append(proc.pid)
            else:
                living.append(proc.pid)
        except psutil.Error:
            continue
    return living, zombies


def _connections() -> int:
    """The connection processes alive (-1: the task supervisor does not answer)."""
    try:
        return DynamicSupervisor.count_children(kv_server.TASKS)["active"]
    except runtime.ProcessError:
        return -1


def _dir_extra() -> set[str]:
    """Files in the node's directory other than the live processes' (each has one,
    named by its serial)."""
    live = {str(p.serial) for p in runtime.processes()}
    return set(testing.node_files()) - live


def _fds_at_most(os_pid: int, n: int) -> bool:
    return _fds(os_pid) <= n


def _fds(os_pid: int) -> int:
    """Open descriptors of OS process ``os_pid`` (-1: it cannot be seen)."""
    try:
        return len(os.listdir(f"/proc/{os_pid}/fd"))
    except OSError:
        return -1
