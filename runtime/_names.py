"""Internal: the node's registered names, one symlink each in its ``names/`` directory.

A name's file is named after a hash of the name; its target is the process's
identity (serial, slot, OS pid) and the name itself, hex-encoded, for people
reading the directory. ``symlink`` is atomic, so two processes racing for a
free name cannot both win. Every removal, and every replacement of a name left
by a dead process, is made under an ``flock`` of the directory after reading
whom the name points to, so that a removal never drops a name another process
has just taken. A name whose process is dead (killed before it could remove
its names) is treated as free by every reader.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from .errors import AlreadyRegisteredError, NoProcError
from .pid import Pid

_CACHE_MAX = 1024
# The name as a symlink holds it, for registered(): hex-encoded, at most this many
# bytes of it (a symlink holds at most 4,095; a longer name still works, shown cut).
LABEL_MAX = 1900


class Names:
    """The registered names of the node whose directory is ``node_dir``, as seen by
    the process ``me``. ``is_alive`` says whether a Pid is alive."""

    def __init__(self, node_dir: str, me: Pid, is_alive: Callable[[Pid], bool]) -> None:
        self._dir = os.path.join(node_dir, "names")
        self._me = me
        self._is_alive = is_alive
        self._cache: dict[str, tuple[str, str, Pid]] = {}  # name -> (path, target, pid)
        self._own: set[str] = set()

    def _path(self, name: str) -> str:
        digest = hashlib.blake2b(name.encode("utf-8", "surrogatepass"),
                                 digest_size=16).hexdigest()
        return os.path.join(self._dir, digest)

    def _pid(self, target: str) -> Pid:
        serial, slot, os_pid = (int(x) for x in target.split(":", 3)[:3])
        return Pid(self._me.node, serial, slot, os_pid)

    def _holder(self, path: str) -> Pid | None:
        """The live process the name file ``path`` points to, or None."""
        try:
            pid = self._pid(os.readlink(path))
        except (OSError, ValueError):
            return None
        return pid if self._is_alive(pid) else None

    @contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self._dir, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def register(self, name: str, pid: Pid) -> None:
        """Give ``name`` to ``pid`` (alive: the caller checked).

        Raises:
            AlreadyRegisteredError: a live process has the name.
        """
        path = self._path(name)
        label = name.encode("utf-8", "surrogatepass")[:LABEL_MAX].hex()
        target = f"{pid.serial}:{pid.slot}:{pid.os_pid}:{label}"
        try:
            os.symlink(target, path)
        except FileExistsError:
            with self._locked():
                holder = self._holder(path)
                if holder is not None:
                    raise AlreadyRegisteredError(name, holder) from None
                tmp = f"{path}.{os.getpid()}"
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
                os.symlink(target, tmp)
                os.rename(tmp, path)
        if pid == self._me:
            self._own.add(name)

    def whereis(self, name: str) -> Pid | None:
        """The live process registered under ``name``, or None."""
        # The symlink is read every time (a name can move to another process), but what
        # it says is parsed once: most lookups are of the same few names.
        cached = self._cache.get(name)
        path = cached[0] if cached is not None else self._path(name)
        try:
            target = os.readlink(path)
        except OSError:
            return None
        if cached is not None and cached[1] == target:
            pid = cached[2]
        else:
            try:
                pid = self._pid(target)
            except ValueError:
                return None
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
            self._cache[name] = (path, target, pid)
        return pid if self._is_alive(pid) else None

    def unregister(self, name: str) -> None:
        """Remove ``name``, whichever process holds it.

        Raises:
            NoProcError: no live process has the name.
        """
        path = self._path(name)
        with self._locked():
            holder = self._holder(path)
            try:
                os.unlink(path)
            except OSError:
                pass
        self._own.discard(name)
        if holder is None:
            raise NoProcError(name, "no process is registered under this name")

    def drop_own(self) -> None:
        """Remove the names this process registered for itself, where they still
        point to it (its exit)."""
        if not self._own:
            return
        with self._locked():
            for name in self._own:
                path = self._path(name)
                try:
                    if int(os.readlink(path).split(":", 1)[0]) == self._me.serial:
                        os.unlink(path)
                except (OSError, ValueError):
                    pass
        self._own.clear()

    def own(self) -> list[str]:
        """The names this process registered for itself."""
        return sorted(self._own)

    def held_by(self, pid: Pid) -> list[str]:
        """The names that point to ``pid``, whoever registered them (a scan of the
        directory, for a crash report: it asks no process whether it is alive)."""
        found = set(self._own) if pid == self._me else set()
        try:
            entries = os.listdir(self._dir)
        except OSError:
            return sorted(found)
        for entry in entries:
            try:
                serial, _, _, label = os.readlink(os.path.join(self._dir, entry)).split(":", 3)
                if int(serial) == pid.serial:
                    found.add(bytes.fromhex(label).decode("utf-8", "replace"))
            except (OSError, ValueError):
                continue
        return sorted(found)

    def registered(self) -> list[tuple[str, Pid]]:
        """Every name held by a live process, with its holder."""
        out: list[tuple[str, Pid]] = []
        try:
            entries = os.listdir(self._dir)
        except OSError:
            return out
        for entry in entries:
            path = os.path.join(self._dir, entry)
            holder = self._holder(path)
            if holder is not None:
                label = os.readlink(path).split(":", 3)[3]
                out.append((bytes.fromhex(label).decode("utf-8", "replace"), holder))
        return out
