"""Helpers for tests that use real processes: bounded waits, never sleeps.

- :func:`assert_receive` waits for a message matching a predicate (or equal to a
  value) and fails with what the mailbox held instead.
- :func:`wait_until` polls a predicate against a deadline, for the few effects
  that send no message, and fails with what it was waiting for.
- :func:`node_processes`, :func:`registered_names` and :func:`flush_mailbox`
  help a test suite check that each test leaves nothing behind.

``TIMEOUT`` is long on purpose: it is only reached when something is broken.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from . import _current, _embed, _table
from .messages import Down
from .pid import Pid

__all__ = [
    "TIMEOUT", "assert_receive", "flush_mailbox", "is_zombie", "node_dir", "node_processes",
    "registered_names", "root", "tagged", "wait_down", "wait_until",
]

TIMEOUT = 10.0


def assert_receive(expected: Any, timeout: float = TIMEOUT) -> Any:
    """Receive the first message equal to ``expected`` or, if ``expected`` is callable,
    for which ``expected(msg)`` is true. Returns it; fails after ``timeout`` seconds."""
    match = expected if callable(expected) else (lambda m: m == expected)
    node = _embed.current()
    try:
        return node.receive(timeout, match)
    except TimeoutError:
        held = node.mailbox.peek(10)
        raise AssertionError(
            f"no message matching {expected!r} within {timeout}s; mailbox starts with {held!r}"
        ) from None


def tagged(tag: Any) -> Callable[[Any], bool]:
    """A match for tuples whose first element is ``tag``."""
    return lambda m: m.__class__ is tuple and len(m) > 0 and m[0] == tag


def wait_down(ref: Any, timeout: float = TIMEOUT) -> Down:
    """Receive the Down of monitor ``ref``."""
    result: Down = assert_receive(lambda m: isinstance(m, Down) and m.ref == ref, timeout)
    return result


def wait_until(predicate: Callable[[], Any], timeout: float = TIMEOUT,
               what: str = "") -> Any:
    """Poll ``predicate`` until it returns something true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout}s for {what or predicate!r}")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def root() -> Pid | None:
    """The node's root process, if a node runs in this process."""
    node = _current.get()
    return None if node is None else _embed.root_pid(node)


def node_dir() -> str | None:
    """The directory of this process's node, if it has one."""
    node = _current.get()
    return None if node is None else node.info.dir


def warm_children() -> list[int]:
    """OS pids of the processes the node's root keeps started ahead for spawns
    (``runtime.configure(warm_children=)``) that are ready to be handed a target now,
    oldest first: they are not the node's processes yet. Empty if no node runs here."""
    node = _current.get()
    if node is None or not node.is_main:
        return []
    return [pid.os_pid for pid in node.waiting_warm()]


def warm_serials() -> set[int]:
    """The serials of every process started ahead and not handed a target yet (the
    root's warm children and runtime processes' own: ``runtime.keep_warm``), ready
    or not. Empty if no node runs here."""
    node = _current.get()
    if node is None:
        return set()
    table = node.table
    return {serial for serial, slot, _ in table.live_slots(ahead=True) if table.is_ahead(slot)}


def sock_file(pid: Pid) -> str:
    """The name of ``pid``'s socket file in the node directory (see ``node_files``)."""
    node = _current.get()
    if node is None:
        raise RuntimeError("no node runs in this process")
    return os.path.basename(node.info.sock_path(pid.serial))


def janitor() -> int | None:
    """The OS pid of the node's janitor (it removes the node's directory once the
    embedding process and the root are gone, however they died), if a node runs here."""
    node = _current.get()
    if node is None or not node.is_main:
        return None
    return _embed.janitor(node)


def node_files() -> list[str]:
    """The names of the files in this process's node directory (its sockets, table and
    names), sorted, without the sockets of the processes started ahead (the root's
    warm children, see ``warm_children``, and ``runtime.keep_warm``'s), which come
    and go as spawns take them."""
    node = _current.get()
    if node is None:
        return []
    # The directory first: a warm child forked after we read the table would be
    # listed and not known as warm.
    listed = set(os.listdir(node.info.dir))
    warm = {os.path.basename(node.info.sock_path(serial)) for serial in warm_serials()}
    return sorted(listed - warm)


def node_processes() -> list[int]:
    """OS pids of every live runtime process of this node except the embedding
    process and the node's root."""
    node = _current.get()
    if node is None:
        return []
    skip = {node.me.serial}
    if node.info.root is not None:
        skip.add(node.info.root.serial)
    out = []
    for serial, _slot, os_pid in node.table.live_slots():
        if serial in skip or os_pid == 0:
            continue
        fields = _table.proc_stat(os_pid)
        if fields is not None and fields[0] != b"Z":
            out.append(os_pid)
    return out


def registered_names() -> list[str]:
    """Every name a live process holds."""
    node = _current.get()
    return [] if node is None else [name for name, _ in node.names.registered()]


def flush_mailbox() -> None:
    """Drop every message queued for this process."""
    node = _current.get()
    if node is not None:
        node.mailbox.clear()


def is_zombie(os_pid: int) -> bool:
    """Whether ``os_pid`` is a process that has died and is not reaped yet."""
    fields = _table.proc_stat(os_pid)
    return fields is not None and fields[0] == b"Z"
