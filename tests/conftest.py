"""Shared fixtures: every test must leave no process and no registered name behind."""

from __future__ import annotations

import os

import psutil
import pytest

import runtime
from runtime import _node
from runtime.testing import wait_until


def _leftover_processes() -> list[psutil.Process]:
    node = _node.current_or_none()
    root = node.root.os_pid if node is not None and node.root is not None else None
    out = []
    for proc in psutil.Process().children(recursive=True):
        if proc.pid == root:
            continue
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
        except psutil.NoSuchProcess:
            continue
        out.append(proc)
    return out


def _leftover_names() -> list[str]:
    node = _node.current_or_none()
    if node is None:
        return []
    names_dir = os.path.join(node.info.dir, "names")
    from runtime.registry import _holder

    out = []
    for entry in os.listdir(names_dir):
        path = os.path.join(names_dir, entry)
        if _holder(node, path) is not None:
            label = os.readlink(path).split(":", 3)[3]
            out.append(bytes.fromhex(label).decode("utf-8", "replace"))
    return out


@pytest.fixture(autouse=True)
def no_leaks():
    """Fail a test that leaves an OS process or a registered name behind; start each
    test with an empty mailbox in the embedding process."""
    yield
    node = _node.current_or_none()
    if node is not None:
        with node.lock:
            node.mailbox.clear()
            node.exits_queued = 0
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
    names = _leftover_names()
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
