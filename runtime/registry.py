"""Registered names: node-wide names for processes (OTP's register/whereis/unregister).

A name is any non-empty string. Each registered name is a symlink in the node's
``names/`` directory whose file name is a hash of the name and whose target is
the process's identity; ``symlink`` is atomic, so two processes racing for one
name cannot both win. A name vanishes with its process: the process removes
its own names when it exits, and a name whose process is dead (killed before it
could) is treated as free by every reader.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from typing import Any

from . import _node
from .errors import AlreadyRegisteredError, NoProcError
from .pid import Pid

__all__ = ["register", "unregister", "whereis"]


def _path(node: _node.Node, name: str) -> str:
    digest = hashlib.blake2b(name.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
    return os.path.join(node.info.dir, "names", digest)


def _check(name: object) -> str:
    if not isinstance(name, str) or not name:
        raise TypeError(f"a registered name must be a non-empty str, got {name!r}")
    return name


def _holder(node: _node.Node, path: str) -> Pid | None:
    """The live process a name file points to, or None."""
    try:
        target = os.readlink(path)
    except OSError:
        return None
    serial, slot, os_pid = (int(x) for x in target.split(":", 3)[:3])
    pid = Pid(node.node_id, serial, slot, os_pid)
    return pid if node.is_alive(pid) else None


def register(name: str, pid: Pid) -> None:
    """Register ``pid`` under ``name`` for the whole node. Never blocks.

    Raises:
        AlreadyRegisteredError: a live process already has the name.
        NoProcError: ``pid`` is not alive.
        TypeError: ``name`` is not a non-empty str.
    """
    _check(name)
    node = _node.current()
    if not isinstance(pid, Pid) or not node.is_alive(pid):
        raise NoProcError(pid, "cannot register a dead process")
    path = _path(node, name)
    label = name.encode("utf-8", "surrogatepass")[:120].hex()  # for people reading the dir
    target = f"{pid.serial}:{pid.slot}:{pid.os_pid}:{label}"
    try:
        os.symlink(target, path)
    except FileExistsError:
        # Taken, or left by a process that was killed: replace it under a lock so
        # that two processes replacing the same stale name cannot both win.
        lock = os.open(os.path.join(node.info.dir, "names"), os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            holder = _holder(node, path)
            if holder is not None:
                raise AlreadyRegisteredError(name, holder) from None
            tmp = f"{path}.{os.getpid()}"
            try:
                os.unlink(tmp)
            except OSError:
                pass
            os.symlink(target, tmp)
            os.rename(tmp, path)
        finally:
            os.close(lock)
    if pid == node.me:
        node.names.add(name)


def whereis(name: str) -> Pid | None:
    """The live process registered under ``name``, or None. Never blocks."""
    _check(name)
    node = _node.current()
    # The symlink is read every time (a name can move to another process), but what
    # it says is parsed once: most lookups are of the same few names.
    cached = node.name_cache.get(name)
    path = cached[0] if cached is not None else _path(node, name)
    try:
        target = os.readlink(path)
    except OSError:
        return None
    if cached is not None and cached[1] == target:
        pid = cached[2]
    else:
        serial, slot, os_pid = (int(x) for x in target.split(":", 3)[:3])
        pid = Pid(node.node_id, serial, slot, os_pid)
        if len(node.name_cache) > 1024:
            node.name_cache.clear()
        node.name_cache[name] = (path, target, pid)
    return pid if node.is_alive(pid) else None


def unregister(name: str) -> None:
    """Remove the name (whichever process holds it). Never blocks.

    Raises:
        NoProcError: no live process has the name.
    """
    _check(name)
    node = _node.current()
    path = _path(node, name)
    holder = _holder(node, path)
    try:
        os.unlink(path)
    except OSError:
        pass
    node.names.discard(name)
    if holder is None:
        raise NoProcError(name, "no process is registered under this name")


def drop_name_of(node: Any, name: str) -> None:
    """Remove ``name`` if it still points to ``node``'s process (at its exit)."""
    path = _path(node, name)
    try:
        target = os.readlink(path)
        if int(target.split(":", 1)[0]) == node.me.serial:
            os.unlink(path)
    except (OSError, ValueError):
        pass
