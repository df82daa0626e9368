"""Shared fixtures: every test must leave no process and no registered name behind."""

from __future__ import annotations

import psutil
import pytest

import kv
import runtime
from runtime import testing
from runtime.testing import wait_down, wait_until

# Processes the tests spawn from this (embedding) process unpickle their targets, which
# live in test modules: the root imports what those modules need once, not each child.
runtime.configure(preload=["pytest", "psutil"])


def _leftover_processes() -> list[psutil.Process]:
    root = testing.root()
    warm = {*testing.warm_children(), testing.janitor()}
    out = []
    for proc in psutil.Process().children(recursive=True):
        if root is not None and proc.pid == root.os_pid or proc.pid in warm:
            continue
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
        except psutil.NoSuchProcess:
            continue
        out.append(proc)
    return out


@pytest.fixture(autouse=True)
def no_leaks():
    """Fail a test that leaves an OS process or a registered name behind; start each
    test with an empty mailbox in the embedding process."""
    yield
    testing.flush_mailbox()
    try:
        wait_until(lambda: not _leftover_processes(), timeout=5.0, what="no leftover processes")
    except AssertionError:
        left = _leftover_processes()
        desc = [(p.pid, " ".join(p.cmdline())[:80]) for p in left]
        for p in left:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        pytest.fail(f"the test left processes behind: {desc}")
    names = testing.registered_names()
    if names:
        for name in names:
            try:
                runtime.unregister(name)
            except runtime.ProcessError:
                pass
        pytest.fail(f"the test left registered names behind: {names}")


@pytest.fixture(scope="session", autouse=True)
def node_shutdown_at_end():
    yield
    runtime.shutdown()


@pytest.fixture
def app():
    """The whole kv tree, stopped after the test."""
    sup = kv.start()
    yield sup
    if runtime.is_alive(sup):
        ref = runtime.monitor(sup)
        kv.stop()
        wait_down(ref)
