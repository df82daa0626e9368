"""Internal: a process that forks processes for another one, its *client*.

Two processes are fork servers: the node's root, for the embedding process (which
never forks), and a zygote, for the runtime process that keeps it (see
``_zygote``). Either runs no user code: a target it is given stays pickled until
the new process unpickles it. For its client it

- forks a process on request (``$spawn``), linked to the client if asked; a
  ``$cancel`` for a spawn the client gave up on forks nothing, or kills what it
  forked;
- keeps ``warm_target`` processes started ahead, whenever it has nothing else to
  do: a warm child has closed what it inherited, made its node, connected to the
  client and told it that it waits for a target. A spawn in the client hands one
  its target directly (``Node.hand_over``): one message instead of a round trip
  to the server and a fork. A warm child that was handed its target tells the
  server at its first idle moment (see ``_poller``), and the server starts the
  next one then, not at once: its fork would compete with the child on its way
  to its first message. One that exits first is replaced then; when a spawn
  finds none left, the server replaces every one taken (one that runs only its
  own code would never tell);
- learns what warm children import ahead: a settled child names the modules
  that unpickling its target imported (its function's, its arguments'
  classes'); the server keeps the last ``IMPORTS_KEPT`` of those names
  (``warm_imports``), and each warm child imports them before it offers itself:
  the next target of the same kind finds its modules imported, and the root
  itself imports none. A warm child that dies before it settles makes the server
  forget them all (an import ahead may have killed it). A zygote imports them
  itself instead (``import_here``): its children share them then, rather than
  each importing its own copy, as a process's children share what it imported.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

from . import _launch
from ._node import Node, import_ahead
from .errors import ProcessError, ReceiveTimeout
from .messages import Down
from .pid import From, Pid, Ref

log = logging.getLogger("runtime")

SPAWNS_KEPT = 256  # (see ForkServer.spawned)
IMPORTS_KEPT = 512  # module names a warm child imports ahead, at most (the newest)


class ForkServer:
    """Spawns and warm children for ``client``, in the server's process (``node``)."""

    def __init__(self, node: Node, client: Pid, warm_target: int, warm_imports: bool,
                 default_signals: tuple[int, ...] = (), count_children: bool = False,
                 import_here: bool = False) -> None:
        self.node = node
        self.import_here = import_here  # (see the module docstring)
        # ``count_children``: monitor every child, so that ``children`` holds those
        # alive (by their monitor); else it stays empty.
        self.children: dict[Ref, Pid] | None = {} if count_children else None
        self.client = client
        self.default_signals = default_signals  # (handlers of ours the children drop)
        # Warm children not yet settled (see the module docstring), by their monitor.
        self.warm: dict[Ref, Pid] = {}
        self.warm_target = warm_target
        self.blocked = False  # the last start failed: none until the next spawn
        # What a warm child imports ahead (None: nothing), oldest first: a dict kept
        # in the order names were first seen.
        self.imports: dict[str, None] | None = {} if warm_imports else None
        # The last spawns, by their call's ref: what a "$cancel" that comes late kills.
        self.spawned: dict[int, Pid] = {}

    def wants_warm(self) -> bool:
        """Should a warm child be started now, if there is nothing else to do?"""
        return len(self.warm) < self.warm_target and not self.blocked

    def stop_warming(self) -> None:
        """Start no more warm children (the server is ending)."""
        self.warm_target = 0
        self.warm.clear()

    def stop_waiting(self) -> None:
        """Kill the children that wait for a target and that the client has not taken
        (``count_children`` only: only then are they all known). Each is doomed only
        if not taken meanwhile (``Table.claim_ahead``), so none that got a target is
        killed."""
        table = self.node.table
        for pid in list((self.children or {}).values()):
            if table.doom(pid.serial, pid.slot, "killed", only_ahead=True):
                try:
                    os.kill(pid.os_pid, signal.SIGKILL)  # (our child, not reaped)
                except OSError:
                    pass

    def next_message(self, timeout: float | None) -> Any:
        """The next message of the server's loop, waiting up to ``timeout`` seconds
        (None: for ever); None if there was none, or if a warm child was wanted and
        there was nothing else to do: one was started instead."""
        refill = self.wants_warm()
        try:
            return self.node.receive(0.0 if refill else timeout, None)
        except ReceiveTimeout:
            if refill:
                self.warm_one()
            return None

    def handle(self, msg: Any) -> bool:
        """Act on ``msg`` if it is for the fork server (a ``$spawn`` call, a
        ``$cancel``, a ``$settled``, the Down of a warm child); True if it was."""
        if msg.__class__ is tuple and msg:
            tag = msg[0]
            if tag == "$gen_call" and len(msg) == 3 and msg[2].__class__ is tuple \
                    and len(msg[2]) == 4 and msg[2][0] == "$spawn":
                try:
                    result = self.spawn(msg[2], msg[1])
                except Exception as exc:  # a failed fork must not take the server down
                    result = ("$error", exc)
                self.node.reply(msg[1], result)
                return True
            if tag == "$settled" and len(msg) == 3:
                self.settled(msg)
                return True
            if tag == "$cancel" and len(msg) == 2:  # (its spawn came first)
                self.cancel(msg[1])
                return True
            return False
        return msg.__class__ is Down and self.down(msg)

    def spawn(self, request: tuple[Any, ...], caller: From) -> Any:
        """A ``("$spawn", payload, link, trap)`` call from the client: the new
        process's Pid, or ``("$error", exc)``."""
        _, payload, link, trap = request
        node = self.node
        # The caller gave up on it (no answer in time, or Ctrl-C): fork nothing. A
        # cancel that comes once it is forked kills it (see cancel).
        cancelled = ("$cancel", caller.ref)
        try:
            node.receive(0.0, lambda m: m == cancelled)
            return ("$error", ProcessError("the spawn was cancelled"))
        except ReceiveTimeout:
            pass
        self.blocked = False
        table = node.table
        # (those taken: see the module docstring)
        self._forget_warm(lambda pid: not table.is_ahead(pid.slot))
        pid = _launch.start_child(node, payload=payload, trap=trap,
                                  link_to=self.client if link else None,
                                  default_signals=self.default_signals)
        if self.children is not None:
            self.children[node.monitor(pid)] = pid
        self.spawned[caller.ref] = pid
        if len(self.spawned) > SPAWNS_KEPT:
            del self.spawned[next(iter(self.spawned))]
        return pid

    def cancel(self, ref: int) -> None:
        """``("$cancel", ref)``: the client gave up on the spawn ``ref``, which came
        first (see ``spawn``): kill what it forked."""
        pid = self.spawned.pop(ref, None)
        if pid is not None:
            self.node.exit(pid, "kill")

    def warm_one(self) -> Pid | None:
        """Start one child ahead; if that fails (no descriptors or processes left),
        start no more until the next spawn."""
        node = self.node
        try:
            pid = _launch.start_child(node, warm=True, offer_to=self.client,
                                      default_signals=self.default_signals,
                                      imports=tuple(self.imports or ()))
        except OSError as exc:
            log.warning("could not start a child ahead (%s); trying again at the next "
                        "spawn", exc)
            self.blocked = True
            return None
        ref = node.monitor(pid)
        self.warm[ref] = pid
        if self.children is not None:
            self.children[ref] = pid
        return pid

    def settled(self, msg: tuple[Any, ...]) -> None:
        """``("$settled", pid, names)`` from a warm child that got going."""
        self._forget_warm(lambda pid, settled=msg[1]: pid == settled)
        imports = self.imports
        names = msg[2]
        if imports is None or not isinstance(names, list):
            return
        for name in names:
            if isinstance(name, str) and name not in imports:
                imports[name] = None
                if self.import_here:
                    self.import_modules((name,))
        while len(imports) > IMPORTS_KEPT:
            del imports[next(iter(imports))]

    def import_modules(self, names: Any) -> None:
        """(``import_here``) Import ``names`` here, for the children forked next. A
        module that starts a thread as it is imported ends that, with a warning: a
        process that forks should have one thread (a child inherits the locks the
        others held). The thread stays, as it would in a keeper that forks its
        children itself: the later modules are imported by each child instead."""
        for name in names:
            if not self.import_here:
                return
            if not isinstance(name, str) or name in sys.modules:
                continue
            import_ahead(name)
            if threading.active_count() > 1 or len(os.listdir("/proc/self/task")) > 1:
                self.import_here = False
                log.warning("importing %s started a thread in the zygote; the "
                            "modules of the targets after it are imported by each "
                            "child instead", name)

    def down(self, msg: Down) -> bool:
        """A Down: is it one of our children (a warm one, dead before it settled)?"""
        counted = self.children is not None and self.children.pop(msg.ref, None) is not None
        if self.warm.pop(msg.ref, None) is None:
            return counted
        if self.imports:
            # Maybe importing what it was told to import ahead (a module that exits
            # at import, say). Forget all of it, or every replacement would die the
            # same way.
            self.imports.clear()
        return True

    def _forget_warm(self, which: Callable[..., bool]) -> None:
        """Stop counting the warm children ``which`` accepts: settled or taken."""
        for ref, pid in list(self.warm.items()):
            if which(pid):
                del self.warm[ref]
                if self.children is None:
                    self.node.demonitor(ref, True)
