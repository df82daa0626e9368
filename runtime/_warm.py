"""Internal: a runtime process's children started ahead of its spawns (``keep_warm``).

A process that keeps children warm has a *keeper* (``Node.keeper``), one of two:

- ``OwnWarm``: one child, forked by the process itself whenever it is idle (and
  the previous one was taken). The child sees the process's memory as it was
  then.
- ``Zygotes``: children forked by a *zygote* (see ``_zygote``), a small process
  the keeper starts as a fresh interpreter. A process's fork slows down as the
  process and its children grow: thousands of children share its pages, whose
  mappings the kernel walks while the fork waits (the kernel's own memory
  monitor walks them all the time), and it holds descriptors for each child that
  every new child inherits. A zygote's pages are its own, shared only with the
  children it forked itself, and it holds nothing of the keeper's but the
  modules of the keeper's targets (it imports them, so that its children share
  them): its fork costs what a small process's costs. After ``ZYGOTE_RENEW`` children it is
  replaced by a new one (started ``ZYGOTE_LEAD`` children before, so that it is
  up by then), so that no zygote's pages are shared by more; the old one stops
  keeping children warm, kills those it started ahead that were not taken, and
  exits once the children it forked are gone.

The node asks its keeper, before the process waits for a message (on its main
thread only, as a fork from another thread is not safe), whether it has work to
do while idle (``idle_work``), and each spawn whether a child started ahead can
take the target (``spawn``; None: the spawn forks as usual). A zygote's renewal
that is due is also done in a spawn: a busy process may never be idle. Zygotes
that die one after another before forking anything (a module of the targets
that exits at import in a fresh interpreter, say) make the keeper forget the
modules it had them import, then, after ZYGOTE_FAILS, give zygotes up.
"""

from __future__ import annotations

import logging
from typing import Any

from . import _launch, _wire, _zygote
from ._forkserver import IMPORTS_KEPT
from ._node import Node, target_modules
from .errors import ProcessError
from .pid import Pid

log = logging.getLogger("runtime")

ZYGOTE_RENEW = 400  # children a zygote forks before a new one replaces it
ZYGOTE_LEAD = 40  # how many children before that the new one is started
ZYGOTE_WARM = 2  # children a zygote keeps started ahead
ZYGOTE_FAILS = 3  # zygotes in a row that die before forking anything: no more


def keep_warm(node: Node, on: bool, zygote: bool = False) -> None:
    """See ``runtime.keep_warm``."""
    if node.is_main:
        raise ProcessError("keep_warm is for a runtime process: the embedding process's "
                           "spawns use the root's warm children (configure(warm_children=))")
    old = node.keeper
    if on and old is not None and isinstance(old, Zygotes) == zygote:
        return
    node.keeper = None
    if old is not None:
        old.stop()
    if on:
        node.keeper = Zygotes(node) if zygote else OwnWarm(node)


def _payload(fn: Any, args: tuple[Any, ...]) -> bytes | None:
    """The target pickled for a child started ahead; None if it cannot be pickled
    (a fork inherits it instead)."""
    try:
        return _wire.dumps_code((fn, args), None)
    except Exception:
        return None


class OwnWarm:
    """One child started ahead, forked by the process itself (see the module doc)."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.child: Pid | None = None  # the one started and not handed a target
        self.paused = False  # the last start failed: none until the next spawn

    def idle_work(self) -> bool:
        """Is there work to do while idle: start the next child ahead?"""
        child = self.child
        return not self.paused and (child is None or self.node.watches.get(child.serial) is None)

    def do_idle_work(self) -> None:
        """Start the next child ahead; if that fails (no descriptors or processes left,
        the table full), start none until the next spawn: the process goes on as if
        it kept none."""
        try:
            self.child = _launch.start_child(self.node, warm=True)
        except Exception as exc:
            log.warning("could not start a child ahead (%s); trying again after the next "
                        "spawn", exc)
            self.child = None
            self.paused = True

    def accepts(self, peer: Pid) -> bool:
        """May ``peer`` offer itself for our spawns (lock held)?"""
        return self.child is not None and self.child.serial == peer.serial

    def kept(self) -> list[Pid]:
        """Our children that run none of our targets (not listed among our children)."""
        return [] if self.child is None else [self.child]

    def zygotes(self) -> list[Pid]:
        return []

    def spawn(self, fn: Any, args: tuple[Any, ...], link: bool, trap: bool) -> Pid | None:
        """Run ``fn(*args)`` in the child started ahead, if it is ready and the target
        can be pickled and does not trap exits; its Pid, else None (the spawn forks)."""
        node = self.node
        self.paused = False
        child = self.child
        if trap or child is None or child not in node.warm:
            return None
        payload = _payload(fn, args)
        if payload is None:
            return None
        pid = node.hand_over(payload, link)  # (only our own child offers itself)
        if pid is None:
            return None
        self.child = None
        return pid

    def stop(self) -> None:
        """Stop keeping a child started ahead: the one started is killed."""
        node = self.node
        child, self.child = self.child, None
        if child is not None:
            with node.poller.lock:
                if child in node.warm:
                    node.warm.remove(child)
            node.exit(child, "kill")


class Zygotes:
    """Children forked by a zygote, renewed every ZYGOTE_RENEW (see the module doc)."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.current: Pid | None = None  # the zygote that forks our children
        self.next: Pid | None = None  # its successor, started ahead
        self.retired: list[Pid] = []  # those replaced, until they exit
        # The modules of our targets, newest last: what a new zygote imports first.
        self.modules: dict[str, None] = {}
        self.forks = 0  # children the current one started for us
        self.paused = False  # the last start failed: none until the next spawn
        self.failed = 0  # zygotes in a row that died before forking anything for us

    def idle_work(self) -> bool:
        """Is there work to do while idle: start or switch zygotes?"""
        if self.paused or self.failed >= ZYGOTE_FAILS:
            return False
        current = self.current
        if current is None or not self._alive(current):
            return True
        return self.forks >= ZYGOTE_RENEW or (self.forks >= ZYGOTE_RENEW - ZYGOTE_LEAD
                                               and self.next is None)

    def do_idle_work(self) -> None:
        """Start a zygote if none runs, its successor when it is due, and switch to
        that one once the current one has forked ZYGOTE_RENEW children. A failed
        start (no descriptors or processes left) starts none until the next spawn:
        spawns fork as usual meanwhile."""
        try:
            if self.next is not None and not self._alive(self.next):
                self.next = None
            if self.current is None or not self._alive(self.current):
                if self.current is not None and self.forks == 0:
                    self._died_unused()
                    if self.failed >= ZYGOTE_FAILS:
                        self.current = self.next = None
                        return
                self.current, self.next = self.next or self._start(), None
                self.forks = 0
            elif self.forks >= ZYGOTE_RENEW:
                self._retire(self.current)
                self.current, self.next = self.next or self._start(), None
                self.forks = 0
            elif self.next is None and self.forks >= ZYGOTE_RENEW - ZYGOTE_LEAD:
                self.next = self._start()
        except Exception as exc:
            log.warning("could not start a zygote (%s); trying again after the next "
                        "spawn", exc)
            self.paused = True

    def _died_unused(self) -> None:
        """The current zygote died before it forked anything for us: maybe importing
        the modules of our targets (one that exits at import in a fresh interpreter,
        say). Forget them; after ZYGOTE_FAILS such deaths in a row, start no more
        zygotes: our spawns fork as usual."""
        self.modules.clear()
        self.failed += 1
        if self.failed >= ZYGOTE_FAILS:
            log.warning("%d zygotes in a row died before forking anything; this "
                        "process's spawns fork as usual from now on", self.failed)

    def _alive(self, zygote: Pid) -> bool:
        """Is our child ``zygote`` alive (as far as we have seen: lock held or not)?"""
        return self.node.watches.get(zygote.serial) is not None

    def _start(self) -> Pid:
        target = (_zygote.main, (self.node.me, ZYGOTE_WARM, tuple(self.modules)))
        return _launch.start_child(self.node, target, fresh=True, name="runtime-zygote")

    def _retire(self, zygote: Pid) -> None:
        """Tell ``zygote`` to kill the children it started ahead that we have not
        taken, to fork no more, and to exit once those it forked are gone."""
        self.retired = [pid for pid in self.retired if self._alive(pid)]
        self.retired.append(zygote)
        self.node.post(zygote, ("$retire",))

    def accepts(self, peer: Pid) -> bool:
        """May ``peer`` offer itself for our spawns (lock held)? A zygote's children
        started ahead do (those of a zygote retired a moment ago as well)."""
        return self.node.table.is_ahead(peer.slot)

    def kept(self) -> list[Pid]:
        """Our children that run none of our targets: the zygotes (lock held)."""
        return self.zygotes()

    def zygotes(self) -> list[Pid]:
        """The zygotes alive, the current one first (lock held)."""
        return [pid for pid in (self.current, self.next, *self.retired)
                if pid is not None and self._alive(pid)]

    def spawn(self, fn: Any, args: tuple[Any, ...], link: bool, trap: bool) -> Pid | None:
        """Run ``fn(*args)`` in a zygote's child: one started ahead if one is ready and
        the target does not trap exits, else one the zygote forks now. None if the
        target cannot be pickled or no zygote is up (the spawn forks). Raises
        ProcessError if the zygote died while it was asked: it may have started the
        target, and what it started died with it, so the spawn must not fork it
        again."""
        node = self.node
        self.paused = False
        modules = self.modules
        for name in target_modules(fn, args):
            if name not in modules:
                modules[name] = None
                if len(modules) > IMPORTS_KEPT:
                    del modules[next(iter(modules))]
        if self.idle_work():  # (due now: a busy process may never be idle)
            starting = self.current is None or not self._alive(self.current)
            self.do_idle_work()
            if starting:
                return None  # (it boots while this spawn forks)
        zygote = self.current
        if zygote is None or not self._alive(zygote):
            return None
        payload = _payload(fn, args)
        if payload is None:
            return None
        pid = None if trap else node.hand_over(payload, link)
        if pid is None:
            try:
                pid = _launch.spawn_by(node, zygote, payload, link, trap, "the zygote")
            except _launch.ServerGone:
                return None  # (asked nothing: a fork runs the target, once)
        self.forks += 1
        self.failed = 0
        return pid

    def stop(self) -> None:
        """Retire the zygotes, which kill their children that wait for a target (we
        no longer take any: ``Node.keeper`` is None by now). The children that run
        targets go on; each zygote exits once its are gone."""
        node = self.node
        with node.poller.lock:
            node.warm.clear()
        for zygote in (self.current, self.next):
            if zygote is not None and self._alive(zygote):
                self._retire(zygote)
        self.current = self.next = None
