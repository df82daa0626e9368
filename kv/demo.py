"""A narrated crash-recovery demo of the kv store: ``python -m kv demo``.

Every bucket, the registry and both supervisors are real OS processes. The demo
kills and crashes them and shows what the runtime reports and how fast the tree
recovers, then stops everything and checks that no process is left behind.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from typing import Any

import runtime
from runtime import Agent, Down, Supervisor

from . import bucket, registry
from .supervisor import BUCKET_SUPERVISOR, REGISTRY, SUPERVISOR, start, stop

BOLD = "\033[1m" if sys.stdout.isatty() else ""
DIM = "\033[2m" if sys.stdout.isatty() else ""
RESET = "\033[0m" if sys.stdout.isatty() else ""


def say(text: str = "") -> None:
    print(text, flush=True)


def step(number: int, title: str) -> None:
    say()
    say(f"{BOLD}{number}. {title}{RESET}")


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def shelve(state: dict[str, Any]) -> dict[str, Any]:
    """Runs inside the "books" bucket and raises: the bucket crashes."""
    shelf: dict[str, Any] = state["the shelf that does not exist"]
    return shelf


def wait_down(ref: Any) -> Down:
    result: Down = runtime.receive(10.0, lambda m: isinstance(m, Down) and m.ref == ref)
    return result


class Demo:
    def __init__(self) -> None:
        self.names: dict[int, str] = {}
        self.recoveries: list[tuple[str, float]] = []

    def label(self, pid: runtime.Pid | None, name: str) -> str:
        if pid is None:
            return f"{name} (not running)"
        self.names[pid.os_pid] = name
        return f"{name} {DIM}(OS pid {pid.os_pid}){RESET}"

    def run(self) -> int:
        say(f"{BOLD}kv crash-recovery demo{RESET}: every process below is a real OS process.")

        step(1, "Start the supervision tree (one_for_all)")
        t0 = time.perf_counter()
        sup = start()
        took = time.perf_counter() - t0
        self.names[os.getpid()] = "embedding process (this script)"
        self.names[runtime.system_info().root.os_pid] = "runtime root"
        say(f"   {self.label(sup, SUPERVISOR)} started in {ms(took)}, with children:")
        for child in Supervisor.which_children(sup):
            say(f"     - {self.label(child.pid, child.id)}, a {child.type}")

        step(2, "Create buckets and store values")
        contents: dict[str, dict[str, Any]] = {
            "shopping": {"milk": 3, "eggs": 12}, "work": {"todo": "demo"},
            "books": {"sicp": "read"}}
        buckets = {}
        for name, values in contents.items():
            b = buckets[name] = registry.create(REGISTRY, name)
            for key, value in values.items():
                bucket.put(b, key, value)
            say(f"   bucket {self.label(b, repr(name))}: "
                + ", ".join(f"{k}={bucket.get(b, k)!r}" for k in values))

        step(3, "SIGKILL the 'work' bucket")
        work = buckets["work"]
        ref = runtime.monitor(work)
        t0 = time.perf_counter()
        os.kill(work.os_pid, signal.SIGKILL)
        down = wait_down(ref)
        t_down = time.perf_counter() - t0
        gone = registry.lookup(REGISTRY, "work")
        t_gone = time.perf_counter() - t0
        say(f"   Down received after {ms(t_down)}: pid={down.pid!r} reason={down.reason!r}")
        say(f"   lookup('work') -> {gone!r} after {ms(t_gone)}: the registry dropped the name")
        self.recoveries += [("SIGKILL of a bucket -> its Down", t_down),
                            ("SIGKILL of a bucket -> name gone from registry", t_gone)]

        step(4, "Crash the 'books' bucket with an exception (its log shows the traceback)")
        books = buckets["books"]
        ref = runtime.monitor(books)
        t0 = time.perf_counter()
        Agent.cast(books, shelve)
        down = wait_down(ref)
        t_down = time.perf_counter() - t0
        sys.stderr.flush()
        reason = down.reason
        say(f"   Down received after {ms(t_down)}: reason is a runtime.Crash:")
        say(f"     exc_type={reason.exc_type!r} message={reason.message!r}")
        frames = [line.strip() for line in reason.traceback.splitlines()
                  if line.strip().startswith("File ")]
        say(f"     its traceback (also in the bucket's log) ends in: {frames[-1]}")
        say(f"   lookup('books') -> {registry.lookup(REGISTRY, 'books')!r}; "
            f"the registry {self.label(runtime.whereis(REGISTRY), REGISTRY)} is still alive: "
            f"{runtime.whereis(REGISTRY) is not None}")
        self.recoveries.append(("exception in a bucket -> its Down", t_down))

        step(5, "Kill the registry: one_for_all restarts the whole tree")
        old_registry = runtime.whereis(REGISTRY)
        old_bucket_sup = runtime.whereis(BUCKET_SUPERVISOR)
        if old_registry is None or old_bucket_sup is None:
            raise RuntimeError("the tree is not running")
        shopping = buckets["shopping"]
        watched = {runtime.monitor(p): name for p, name in
                   ((old_registry, REGISTRY), (old_bucket_sup, BUCKET_SUPERVISOR),
                    (shopping, "bucket 'shopping'"))}
        t0 = time.perf_counter()
        runtime.exit(old_registry, "kill")
        for ref, name in watched.items():
            down = wait_down(ref)
            say(f"   {name} exited: {down.reason!r}")
        children = Supervisor.which_children(sup)  # answered once the restart is done
        new_registry = runtime.whereis(REGISTRY)
        registry.lookup(REGISTRY, "shopping")
        t_back = time.perf_counter() - t0
        self.recoveries.append(("registry killed -> new tree serving", t_back))
        for child in children:
            say(f"   new {self.label(child.pid, child.id)} (restarts: {child.restarts})")
        say(f"   a fresh, empty registry after {ms(t_back)}: "
            f"lookup('shopping') -> {registry.lookup(REGISTRY, 'shopping')!r}")
        say(f"   old processes alive? registry={runtime.is_alive(old_registry)}, "
            f"bucket supervisor={runtime.is_alive(old_bucket_sup)}, "
            f"'shopping'={runtime.is_alive(shopping)}")
        for name in ("shopping", "garden"):
            b = registry.create(REGISTRY, name)
            bucket.put(b, "restarted", True)
            self.label(b, f"bucket {name!r}")
        assert new_registry is not None

        step(6, "Every process, and how fast each recovery was")
        self.table(children)

        step(7, "Stop the tree and the node")
        import psutil

        family = psutil.Process().children(recursive=True)
        t0 = time.perf_counter()
        stop()
        runtime.shutdown()
        took = time.perf_counter() - t0
        left = [p for p in family if _running(p)]
        say(f"   stopped {len(family)} processes in {ms(took)}; "
            f"left behind: {len(left)}{' (none)' if not left else ''}")
        return 1 if left else 0

    def table(self, children: list[Any]) -> None:
        import psutil  # here, not at the top: the crashing bucket imports this module

        restarts = {c.pid.os_pid: c.restarts for c in children if c.pid is not None}
        system = runtime.system_info()
        for os_pid in system.warm_children:
            self.names[os_pid] = "warm child (for the next spawn)"
        sup = runtime.whereis("kv.bucket_supervisor")
        info = None if sup is None else runtime.info(sup)
        for pid in [] if info is None else info["warm_children"]:
            self.names[pid.os_pid] = "warm child (for the next bucket)"
        for pid in [] if info is None else info["zygotes"]:
            self.names[pid.os_pid] = "zygote (forks the buckets)"
            try:  # (one it is starting ahead has not offered itself yet)
                for child in psutil.Process(pid.os_pid).children():
                    self.names.setdefault(child.pid, "warm child (for the next bucket)")
            except psutil.Error:
                pass
        self.names[system.janitor or 0] = "janitor (cleans up the node)"
        rows = []
        me = psutil.Process()
        for proc in [me] + me.children(recursive=True):
            try:
                with proc.oneshot():
                    rss = proc.memory_info().rss
                    uss = proc.memory_full_info().uss
                    parent = proc.ppid()
            except psutil.Error:
                continue
            rows.append((self.names.get(proc.pid, "?"), proc.pid,
                         self.names.get(parent, str(parent)), rss, uss,
                         restarts.get(proc.pid, 0)))
        say(f"   {'process':<32} {'OS pid':>7}  {'parent':<32} {'RSS':>8} {'USS':>8}"
            f" {'restarts':>8}")
        for name, pid, boss, rss, uss, count in rows:
            say(f"   {name:<32} {pid:>7}  {boss:<32} {rss / 2**20:6.1f}MB {uss / 2**20:6.1f}MB"
                f" {count:>8}")
        say()
        say(f"   {'recovery':<50} {'measured':>10}")
        for what, seconds in self.recoveries:
            say(f"   {what:<50} {ms(seconds):>10}")


def _running(proc: Any) -> bool:
    import psutil

    try:
        running: bool = proc.status() != psutil.STATUS_ZOMBIE
        return running
    except psutil.Error:
        return False


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="   [log] %(message)s")
    return Demo().run()
