"""Helpers shared by the fault tests: scripts run as embedding services, the OS
processes under a pid, bounded waits on OS processes."""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
import textwrap

import psutil

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def start_script(code: str, *args: str, env: dict | None = None,
                 new_session: bool = False) -> subprocess.Popen:
    """Run ``code`` as a Python script with the repository on its path."""
    full_env = dict(os.environ, PYTHONPATH=REPO)
    full_env.update(env or {})
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=full_env, cwd=REPO, start_new_session=new_session,
    )


def running(p: psutil.Process) -> bool:
    """Whether ``p`` still runs (a zombie has exited)."""
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def live_descendants(pid: int) -> list[psutil.Process]:
    return [p for p in descendants(pid) if running(p)]


def wait_os_exit(os_pid: int, timeout: float) -> bool:
    """Wait until OS process ``os_pid`` has exited (a zombie counts); False at the
    timeout."""
    try:
        fd = os.pidfd_open(os_pid)
    except ProcessLookupError:
        return True
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(timeout * 1000))
    finally:
        os.close(fd)


def kill_all(procs: list[psutil.Process]) -> None:
    """SIGKILL what is left of ``procs`` (processes this test started)."""
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def remove_node_dir(directory: str) -> None:
    """Remove a node directory a failed test left (only ever an ``rt-`` directory)."""
    if directory.startswith("/") and os.path.basename(directory).startswith("rt-"):
        shutil.rmtree(directory, ignore_errors=True)


def count_files(top: str) -> int:
    return sum(len(files) + len(dirs) for _, dirs, files in os.walk(top))
