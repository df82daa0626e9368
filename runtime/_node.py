"""Internal: the runtime in one OS process, composed of its parts.

Each OS process of a node has one :class:`Node`: its identity (``me``), and its
parts, each owning its state behind a few methods:

- ``poller`` (``_poller``): the lock, the one wait, the epoll and its owners;
- ``mailbox`` (``_mailbox``): messages, replies, the runtime's own Downs;
- ``conns`` (``_conns``): connections, framing, the handshake;
- ``watches`` (``_watches``): monitors, links, children, deaths and their reasons;
- ``names`` (``_names``): the node's registered names;
- ``exits`` (``_exits``): exit signals and the exit path.

The node routes between them: the frames a connection reads, the events a poll
returns (deaths first, each after what the dead process sent), and the
operations the public modules call (``send``, ``call``, ``monitor``, ...). An
operation takes the lock only for short sections; it pickles and unpickles,
connects, and waits outside them.
"""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from types import ModuleType
from typing import Any, Protocol

from . import _table, _wire
from ._conns import Conn, Connections
from ._exits import Exits
from ._mailbox import CallResult, Mailbox, Raw
from ._names import Names
from ._poller import EPOLLOUT, Batch, FdSet, Poller, Reader
from ._watches import NOT_YET, Death, Watch, Watches, readable
from .errors import CallTimeout, ExitError, NoProcError, ProcessError, ReceiveTimeout
from .messages import Down
from .pid import From, Pid, Ref

log = logging.getLogger("runtime")

HAND_OVER_WAIT = 2.0
CALL, REPLY, MSG = _wire.CALL, _wire.REPLY, _wire.MSG  # (the frames of every call)
_ref_of = _wire.REF_FIELD.unpack_from


def _serial(pid: Pid) -> int:
    return pid.serial


def call_outcome(pid: Pid, request: Any, timeout: float | None,
                 result: CallResult | None) -> Any:
    """What a call returns or raises, from how it ended (None: it timed out)."""
    if result is None:
        raise CallTimeout(pid, request, timeout or 0.0)
    if result.ok:
        return _wire.loads(result.value)
    if result.value == "noproc":
        raise NoProcError(pid)
    raise ExitError(pid, result.value)


@dataclass(frozen=True)
class NodeInfo:
    """What every process of a node knows about the node (inherited by children)."""

    dir: str
    key: bytes = field(repr=False)
    node_id: int
    main: Pid
    root: Pid | None
    start_method: str
    warm_imports: bool = True  # (see configure: zygotes follow it too)

    def sock_path(self, serial: int) -> str:
        return f"{self.dir}/{serial}"


class Keeper(Protocol):
    """What keeps a runtime process's children started ahead (see ``_warm``)."""

    def idle_work(self) -> bool: ...
    def do_idle_work(self) -> None: ...
    def accepts(self, peer: Pid) -> bool: ...
    def kept(self) -> list[Pid]: ...
    def zygotes(self) -> list[Pid]: ...
    def spawn(self, fn: Any, args: tuple[Any, ...], link: bool, trap: bool) -> Pid | None: ...
    def stop(self) -> None: ...


def target_modules(fn: Any, args: tuple[Any, ...]) -> list[str]:
    """The modules that unpickling the target ``fn(*args)`` imported by name: those of
    ``fn`` and of the classes and functions among ``args`` (not ``__main__``'s, nor
    modules made at run time, which have no spec). Never raises."""
    names: list[str] = []
    try:
        for obj in (fn, *args):
            if not (isinstance(obj, type) or callable(obj)):
                continue
            name = getattr(obj, "__module__", None)
            if not isinstance(name, str):
                continue
            module = sys.modules.get(name)
            if (isinstance(module, ModuleType) and name not in names
                    and name not in ("__main__", "__mp_main__")
                    and module.__dict__.get("__spec__") is not None):
                names.append(name)
    except Exception:
        pass
    return names


def import_ahead(name: str) -> None:
    """Import ``name`` in a warm child (or a zygote), ahead of a target. A module that fails to
    import leaves nothing behind (a package may have imported submodules before it
    failed, which a later import would find half set up): the target meets the same
    error itself, where it can see it."""
    before = len(sys.modules)
    try:
        importlib.import_module(name)
    except (Exception, SystemExit) as exc:
        added = len(sys.modules) - before
        if added > 0:
            for extra in list(islice(reversed(sys.modules), added)):
                sys.modules.pop(extra, None)
        log.debug("a warm child could not import %s ahead: %r", name, exc)


class Node:
    """The runtime state of one OS process. See the module docstring."""

    def __init__(self, info: NodeInfo, me: Pid, listen: socket.socket, table: _table.Table, *,
                 is_main: bool, parent: Pid | None = None, trap: bool = False) -> None:
        self.info = info
        self.me = me
        self.table = table
        self.is_main = is_main
        self.parent = parent
        self.poller = poller = Poller(self._on_events, self._on_event, self._after_events)
        self.mailbox = Mailbox(poller.lock, poller.wait, poller.notify, me, is_main)
        self.conns = Connections(poller, info.key, me, info.sock_path, listen, self._on_frame,
                                 self._on_closed, table.serial_in)
        self.watches = Watches(poller, table, me, info.sock_path)
        self.names = Names(info.dir, me, self.is_alive)
        self.exits = Exits(me=me, main=info.main, root=info.root, is_main=is_main, table=table,
                           poller=poller, conns=self.conns, watches=self.watches,
                           mailbox=self.mailbox, names=self.names, sock_path=info.sock_path,
                           send=self._send, trap=trap, runtime_fds=self.descriptors)
        self.extra_fds: list[int] = []  # owned, not polled: our sentinel's write end
        self.target: bytes | None = None  # a warm child's, once handed over
        self.warm: list[Pid] = []  # warm children that offered themselves (see hand_over)
        # A runtime process that keeps children started ahead of its spawns: its
        # keeper (see _warm).
        self.keeper: Keeper | None = None
        self.warm_owner: Pid | None = None  # a warm child's: whom it waits for a target from
        self.janitor: int | None = None  # the embedding process's: see _embed.janitor
        self._refs = itertools.count(1)
        self._suspects: list[int] = []  # peers whose connection closed: dying

    # ------------------------------------------------------------- events

    def _on_events(self, batch: Batch, whole: bool) -> None:
        """Handle a poll's events (lock held). Deaths first: what a dead process sent
        comes before its Down all the same (``handle_death`` reads it first; connections
        it made are accepted just before), and a message another process sent once
        it saw the death comes after the Down.

        A connection the dead process made before dying was there when the poll
        returned its death: in a whole batch, it is accepted already, or there was
        none (``accepted``)."""
        conns = self.conns
        deaths = [owner for _, _, owner in batch if owner.__class__ is Watch]
        listener = conns.listener
        if deaths:
            if any(owner is listener for _, _, owner in batch):
                conns.accept_all()
            for w in deaths:
                if self.watches.get(w.pid.serial) is w:
                    self.handle_death(w, accepted=whole)
        owner_of = self.poller.owner
        for fd, mask, owner in batch:
            if owner_of(fd) is not owner:
                continue  # closed, or its number reused, since the poll
            cls = owner.__class__
            if cls is Conn:
                if mask & EPOLLOUT:
                    conns.flush(owner)
                if mask & ~EPOLLOUT:
                    conns.read(owner)
            elif cls is Reader:
                owner.callback()
            elif owner is listener and not deaths:
                # Read what a new connection holds now: what a process sent before we
                # accepted it has arrived (``receive(timeout=0)`` polls once).
                for conn in conns.accept_all():
                    if not conn.closed:
                        conns.read(conn)
        if self._suspects:
            self._check_suspects(deaths, whole)

    def _on_event(self, fd: int, mask: int, owner: Any) -> None:
        """What a poll that returned one event returned (lock held): the common case,
        kept short when it is a connection to read (see ``_on_events``)."""
        if owner.__class__ is Conn and not mask & EPOLLOUT:
            self.conns.read(owner)
            if self._suspects:
                self._check_suspects([], True)
        else:
            self._on_events([(fd, mask, owner)], True)

    def _on_closed(self, peer: Pid) -> None:
        # A peer closes its end only by dying: check it in this batch rather than
        # wait for its watch to wake us again. A warm child that does is none.
        self._suspects.append(peer.serial)
        if self.warm and peer in self.warm:
            self.warm.remove(peer)

    def _check_suspects(self, handled: list[Watch], whole: bool) -> None:
        suspects, self._suspects = self._suspects, []
        for serial in suspects:
            w = self.watches.get(serial)
            if w is not None and w not in handled and (w.child or readable(w.fd)):
                self.handle_death(w, accepted=whole)

    def handle_death(self, w: Watch, accepted: bool = False) -> None:
        """``w``'s process died (lock held): tell everyone who cares, after delivering
        what it sent. ``accepted``: the connections it made are accepted already."""
        pid = w.pid
        status = None
        if w.child:
            status = self.watches.child_status(w)
            if status == NOT_YET:
                return
        elif (self.is_main or self.poller.threaded) and not readable(w.fd):
            # Another thread closed a pidfd and opened this one under its number while
            # the poll's event was on its way: not this process's death.
            return
        self.conns.drain_peer(pid.serial, pid.os_pid, accepted)
        if self.watches.get(pid.serial) is not w:
            return  # what it sent undid the watch (an unlink): no one left to tell
        death = self.watches.died(w, status)
        self.conns.close_peer(pid.serial)
        self._deliver(death)

    def _deliver(self, death: Death) -> None:
        pid, reason = death.pid, death.reason
        mailbox = self.mailbox
        for call in death.calls:
            mailbox.put_reply(call, CallResult(False, reason))
        for ref in death.monitors:
            mailbox.put_down(Down(ref, pid, reason))
        if death.linked:
            self.exits.on_linked_exit(pid, reason)

    def _on_frame(self, peer: Pid, tag: int, body: memoryview) -> None:
        """A frame from ``peer`` (lock held). ``body`` is only valid during the call."""
        if tag == CALL:
            self.mailbox.put(Raw(bytes(body[8:]), From(peer, _ref_of(body)[0])))
        elif tag == REPLY:
            self.mailbox.reply_arrived(_ref_of(body)[0], body)
        elif tag == MSG:
            self.mailbox.put(Raw(bytes(body)))
        elif tag == _wire.LINK:
            self._linked_by(peer)
        elif tag == _wire.UNLINK:
            self.watches.unlink(peer.serial)
        elif tag == _wire.EXIT:
            self.exits.on_exit_signal(peer, bytes(body))
        elif tag == _wire.RUN:
            if peer == self.warm_owner and self.target is None:  # (a warm child)
                if body[0]:  # linked at once: before any frame read after this one
                    self._linked_by(peer)
                self.target = bytes(body[1:])
                self.poller.notify()
        elif tag == _wire.WARM:
            keeper = self.keeper
            if self.is_main or (keeper is not None and keeper.accepts(peer)):
                self.warm.append(peer)  # (see hand_over)
        elif tag == _wire.INFO:
            conn = self.conns.out_to(peer.serial)
            if conn is not None:
                ref = _wire.REF_FIELD.unpack_from(body)[0]
                self.conns.write(conn, _wire.reply(ref, _wire.dumps(self.state())))

    def _linked_by(self, pid: Pid) -> None:
        """``pid`` linked itself to us (lock held)."""
        watches = self.watches
        if watches.is_linked(pid.serial) or pid == self.me:
            return
        if not watches.link(pid, watched=pid != self.info.main):
            # It linked to us and died before we read its request: OTP orders the link
            # before the exit, so we get its exit with the true reason.
            self.exits.on_linked_exit(pid, self.table.reason(pid.serial, pid.slot, pid.os_pid))

    def _after_events(self) -> None:
        if self.exits.requested is not None:
            self.exits.run_requested()

    # ------------------------------------------------------------ messages

    def make_ref(self) -> Ref:
        return Ref(self.me.node, self.me.serial, next(self._refs))

    def send(self, pid: Pid, msg: Any) -> None:
        """Send ``msg`` to ``pid``; blocks while its buffer is full. Dropped if it is dead."""
        if pid == self.me:
            with self.poller.lock:
                self.mailbox.put(msg)
            return
        self._send(pid, _wire.message(_wire.dumps(msg)), None)

    def post(self, pid: Pid, msg: Any) -> None:
        """Queue ``msg`` to ``pid`` behind what we sent it before, and never wait for the
        write (it goes as the connection drains); dropped if we have no connection
        to ``pid``: for a message that follows a request made on one."""
        data = _wire.dumps(msg)
        with self.poller.lock:
            self._post(pid, data)

    def _post(self, pid: Pid, data: bytes) -> None:
        """``post`` a pickled message (lock held)."""
        conn = self.conns.out_to(pid.serial)
        if conn is not None:
            self.conns.write(conn, _wire.message(data))

    def _send(self, pid: Pid, frame: list[bytes], deadline: float | None) -> bool:
        """Write ``frame`` to ``pid``, connecting first if needed; block while its buffer
        is full, until ``deadline`` at most. False if it is gone (the frame is dropped)."""
        lock = self.poller.lock
        conns = self.conns
        with lock:
            conn = conns.out_to(pid.serial)
            if conn is not None:
                mark = conns.write(conn, frame)
        if conn is None:
            if pid.node != self.me.node or self.watches.is_dead(pid.serial):
                return False
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            sock = conns.connect(pid, timeout)
            if sock is None:
                return False
            with lock:
                conn = conns.adopt(sock, pid, hello=True)
                mark = conns.write(conn, frame)
        if conn.sent < mark and not self._wait_written(conn, mark, deadline):
            with lock:
                conns.close(conn)  # part of a frame is on its way: the stream is lost
        return not conn.closed

    def _wait_written(self, conn: Conn, mark: int, deadline: float | None) -> bool:
        """Wait until the frame whose write returned ``mark`` has left ``conn`` (or it
        closed); False if ``deadline`` came first."""
        conns = self.conns
        if conns.written(conn, mark):
            return True
        return self.poller.wait(lambda: True if conns.written(conn, mark) else None,
                                deadline) is not None

    def receive(self, timeout: float | None, match: Any) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        if self.keeper is not None and match is None:
            got = self._before_idle()
            if got is not None:
                return got[0]
        if match is None:
            got = self.mailbox.take(deadline)
        else:
            got = self.mailbox.take_match(match, deadline)
        if got is None:
            raise ReceiveTimeout(f"no matching message within {timeout}s")
        return got[0]

    def next_message(self) -> Any:
        """The next message, however long it takes (the GenServer loop)."""
        if self.keeper is not None:
            got = self._before_idle()
            if got is not None:
                return got[0]
        got = self.mailbox.take(None)
        assert got is not None
        return got[0]

    # --------------------------------------------------------------- calls

    def call(self, pid: Pid, request: Any, timeout: float | None,
             abandoned: Callable[[int], Any] | None = None) -> Any:
        """Send a GenServer call and wait for its reply, the server's death, or the
        timeout. See ``gen_server.call``. ``abandoned(ref)`` runs if the wait ends
        without either (the timeout, or an exception such as Ctrl-C), before that
        ends the call: how a caller tells the server to undo what it may still do."""
        ref = self.start_call(pid, request)
        deadline = None if timeout is None else time.monotonic() + timeout
        result = self._await_call(pid, ref, deadline, abandoned)
        return call_outcome(pid, request, timeout, result)

    def _await_call(self, pid: Pid, ref: int, deadline: float | None,
                    abandoned: Callable[[int], Any] | None = None) -> CallResult | None:
        """Wait until the call ``ref`` to ``pid`` ends (its reply, or ``pid``'s death),
        until ``deadline``; how it ended, None if it did not. The call is forgotten
        either way (a reply that comes later is dropped); ``abandoned``: see ``call``."""
        take_reply = self.mailbox.take_reply
        end_call = self.watches.end_call

        def ended() -> CallResult | None:  # (lock held) the result, and the call forgotten
            result = take_reply(ref)
            if result is not None:
                end_call(pid, ref)
            return result

        result: CallResult | None = None
        try:
            result = self.poller.wait(ended, deadline, ref)
        finally:
            if result is None:
                if abandoned is not None:
                    abandoned(ref)
                self.end_call(pid, ref)
        return result

    def start_call(self, pid: Pid, request: Any) -> int:
        """Send the call ``request`` to ``pid``; its ref. The caller then waits for
        ``call_result(ref)`` (or the server's death, which is a result too), and
        ends with ``end_call``.

        Raises:
            NoProcError: ``pid`` is dead.
            ProcessError: ``pid`` is this process.
        """
        if pid.serial == self.me.serial and pid == self.me:
            raise ProcessError(f"{pid!r} called itself: that would deadlock")
        ref = next(self._refs)
        self._ask(pid, ref, _wire.call(ref, _wire.dumps(request)))
        return ref

    # -------------------------------------------------------- warm children

    def _before_idle(self) -> tuple[Any] | None:
        """In a process that keeps children started ahead (see ``_warm``), before it
        waits for a message: the first message if one is there; else, if its keeper
        has work to do while idle (start the next child ahead, say), do it now, and
        None. Only on the main thread: another thread's wait forks nothing."""
        keeper = self.keeper
        if keeper is None or not keeper.idle_work():
            return None
        if threading.get_ident() != threading.main_thread().ident:
            return None  # (a fork from another thread is not safe: see _launch.spawn)
        got = self.mailbox.take(0.0)
        if got is None:
            keeper.do_idle_work()
        return got

    def hand_over(self, payload: bytes, link: bool) -> Pid | None:
        """Give the cloudpickled target ``payload`` to a warm child that offered itself
        (in the embedding process, the root's: see ``_root``; in a runtime process, its
        keeper's: see ``_warm``) and return its Pid, linked to us if ``link``;
        None if no warm child is waiting. Blocks only while the payload is written: a child that
        takes none of it for ``HAND_OVER_WAIT`` seconds (stopped) is killed, and the
        next one is tried. Interrupted (Ctrl-C), it kills the child it chose: a spawn
        that raises leaves no process running its target."""
        lock = self.poller.lock
        conns = self.conns
        frame = _wire.run(payload, link)
        while True:
            with lock:
                conn = None
                while self.warm and conn is None:
                    pid = min(self.warm, key=_serial)  # the oldest (they offer in any order)
                    self.warm.remove(pid)
                    conn = conns.out_to(pid.serial)
                if conn is None:
                    return None
                # (Claimed atomically: its fork server may kill those not taken.)
                if not self._ready_for_target(pid) \
                        or not self.table.claim_ahead(pid.serial, pid.slot):
                    continue  # it dies (killed while it waited): the next one, or a fork
                # Listed among the node's processes from now on, as started now.
                self.table.started_now(pid.slot)
                mark = conns.write(conn, frame)
                if conn.closed:
                    continue  # it died meanwhile: the next one, or a new process
            try:
                written = self._wait_written(conn, mark, time.monotonic() + HAND_OVER_WAIT)
            except BaseException:
                self._drop_warm(pid, conn)
                raise
            if not written:
                # It takes nothing (stopped?): it must never run this target, as the
                # spawn goes on without it.
                self._drop_warm(pid, conn)
                continue
            if conn.sent >= mark:
                return pid
            # It died before it had its whole target: the next one, or a new process.

    def _ready_for_target(self, pid: Pid) -> bool:
        """Is the warm child ``pid`` alive and not in its exit (lock held)? A child
        killed a moment ago still has its connection open while the kernel tears it
        down: a target written to it would be lost, where a fork would have run it."""
        table = self.table
        return (table.state(pid.serial, pid.slot) == _table.ALIVE
                and _table.zombie_status(pid.os_pid, exiting=True) is None)

    def _drop_warm(self, pid: Pid, conn: Conn) -> None:
        """A warm child that was to get a target must not run it: close the connection
        (the rest of the target stays unsent) and kill it."""
        with self.poller.lock:
            self.conns.close(conn)
        self.exit(pid, "kill")

    def waiting_warm(self) -> list[Pid]:
        """In the embedding process: the warm children waiting for a target, oldest
        first (with what has arrived by now: does not block)."""
        self.poller.pump()
        with self.poller.lock:
            return sorted((pid for pid in self.warm if self.conns.out_to(pid.serial)),
                          key=_serial)

    def wait_for_target(self, owner: Pid, imports: tuple[str, ...] = ()) -> bytes:
        """In a warm child: tell ``owner``, whose spawns we serve, that we wait for a
        target, and wait for it (see ``hand_over``), leaving every message in the
        mailbox as it is. ``owner`` is our parent, or the client of our parent if that
        is a fork server (the root, a zygote: see ``_forkserver``), which we then tell
        at our first idle moment after the target came, so that it starts another
        one ahead then: its fork would compete with us on our way. Before all that,
        import ``imports`` (the modules of the targets before us), and walk the
        import system once (for a name that does not exist), so that importing the
        target's module later finds the directory listings read and the pages it
        writes copied."""
        for name in imports:
            if name not in sys.modules:
                import_ahead(name)
        importlib.util.find_spec("_runtime_warm_child_probe_")
        self.warm_owner = owner
        self._send(owner, _wire.control(_wire.WARM), time.monotonic() + 1.0)
        got: bytes = self.poller.wait(lambda: self.target, None)
        return got

    def target_loaded(self, fn: Any, args: tuple[Any, ...]) -> None:
        """In a warm child, its target unpickled: one forked by a fork server tells it
        at its first idle moment (see ``wait_for_target``)."""
        if self.parent is not None and self.warm_owner != self.parent:
            with self.poller.lock:
                self.poller.defer(partial(self._settled, target_modules(fn, args)))

    def _settled(self, modules: list[str]) -> None:
        """(A cleanup job: it runs at our first idle moment, or as we exit.) Tell our
        parent, a fork server, that we have got going, and which ``modules`` unpickling our
        target imported, for the warm children after us to import ahead."""
        if self.parent is not None:
            self._post(self.parent, _wire.dumps(("$settled", self.me, modules)))

    def _ask(self, pid: Pid, ref: int, frame: list[bytes]) -> None:
        """Expect a reply ``ref`` from ``pid`` and queue ``frame`` to it, never waiting
        for the write: a request that times out stays queued, as the messages before
        it on the connection do (closing it would lose them)."""
        lock = self.poller.lock
        conns = self.conns
        with lock:
            if not self.watches.add_call(pid, ref):
                raise NoProcError(pid)
            self.mailbox.expect_reply(ref)
            conn = conns.out_to(pid.serial)
            if conn is not None:
                conns.write(conn, frame)
        if conn is None:
            try:
                sock = conns.connect(pid)
                if sock is not None:  # (else it died: its watch ends the call)
                    with lock:
                        conns.write(conns.adopt(sock, pid, hello=True), frame)
            except BaseException:
                self.end_call(pid, ref)
                raise

    def call_result(self, ref: int) -> CallResult | None:
        """How the call ``ref`` ended, if it has."""
        with self.poller.lock:
            return self.mailbox.reply_of(ref)

    def end_call(self, pid: Pid, ref: int) -> None:
        """Forget the call ``ref`` to ``pid``: a reply that comes later is dropped."""
        with self.poller.lock:
            self.mailbox.drop_reply(ref)
            self.watches.end_call(pid, ref)

    def reply(self, to: From, value: Any) -> None:
        """Answer the call ``to``; dropped if the caller has gone."""
        data = _wire.dumps(value)
        if to.caller.serial == self.me.serial:  # (a From we made: see start_ack)
            with self.poller.lock:
                self.mailbox.put_reply(to.ref, CallResult(True, data))
            return
        self._send(to.caller, _wire.reply(to.ref, data), None)

    def start_ack(self) -> tuple[int, From]:
        """A call ``ref`` this process awaits from a process it starts, and the From
        that process answers (``start_link``: the answer says ``init`` is done)."""
        ref = next(self._refs)
        with self.poller.lock:
            self.mailbox.expect_reply(ref)
        return ref, From(self.me, ref)

    def wait_ack(self, ref: int, down: Ref, deadline: float) -> CallResult | None:
        """Wait for the answer ``ref`` (see ``start_ack``), or the Down of the runtime
        monitor ``down`` (its reason then, not ok); None at the deadline."""
        mailbox = self.mailbox

        def ready() -> CallResult | None:
            result = mailbox.reply_of(ref)
            if result is not None:
                return result
            got = mailbox.down_of((down,))
            return None if got is None else CallResult(False, got.reason)

        try:
            result: CallResult | None = self.poller.wait(ready, deadline)
        finally:
            with self.poller.lock:
                mailbox.drop_reply(ref)
        if result is not None and result.ok:
            return CallResult(True, _wire.loads(result.value))
        return result

    # ------------------------------------------------------------ monitors

    def monitor(self, pid: Pid, fresh: bool = False, internal: bool = False) -> Ref:
        """Monitor ``pid``. ``fresh``: the caller knows ``pid`` existed (it just spawned
        it), so if it is already dead the Down carries its true reason, not noproc.
        ``internal``: the runtime's own monitor, whose Down goes to ``wait_down``."""
        ref = self.make_ref()
        if pid == self.me:
            return ref  # fires only when we are dead, that is never for us
        with self.poller.lock:
            if internal:
                self.mailbox.expect_down(ref)
            if not self.watches.add_monitor(ref, pid):
                reason = "noproc"
                if fresh and pid.node == self.me.node:
                    reason = self.table.reason(pid.serial, pid.slot, pid.os_pid)
                # What it sent before dying comes before its Down, whichever thread
                # reads it (this one holds the lock: it may).
                self.conns.drain_peer(pid.serial, pid.os_pid)
                self.mailbox.put_down(Down(ref, pid, reason))
        self._after_events()
        return ref

    def monitor_name(self, name: str) -> Ref:
        """A monitor of a name no process has: its Down (noproc) is queued at once."""
        ref = self.make_ref()
        with self.poller.lock:
            self.mailbox.put_down(Down(ref, name, "noproc"))  # type: ignore[arg-type]
        return ref

    def demonitor(self, ref: Ref, flush: bool) -> bool:
        with self.poller.lock:
            self.mailbox.forget_down(ref)
            if self.watches.remove_monitor(ref):
                return True
            if flush:
                self.mailbox.remove_down(ref)
            return False

    def wait_down(self, refs: Any, timeout: float | None) -> Down | None:
        """Wait for the Down of any of the runtime monitors ``refs`` (a container); take
        it and forget that monitor. None on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        down: Down | None = self.poller.wait(lambda: self.mailbox.down_of(refs), deadline)
        return down

    # --------------------------------------------------------------- links

    def link(self, pid: Pid) -> None:
        if pid == self.me:
            return
        with self.poller.lock:
            if self.watches.is_linked(pid.serial):
                return
            if not self.watches.link(pid, watched=pid != self.info.main):
                if not self.exits.trap:
                    raise NoProcError(pid, "link")
                self.exits.on_linked_exit(pid, "noproc")
                return
        self._send(pid, _wire.control(_wire.LINK), None)

    def linked_by(self, pid: Pid) -> None:
        """Record a link ``pid`` made to us (a server we started linked itself to us)."""
        with self.poller.lock:
            self._linked_by(pid)
        self._after_events()

    def unlink(self, pid: Pid) -> None:
        with self.poller.lock:
            removed = self.watches.unlink(pid.serial)
        if removed:
            self._send(pid, _wire.control(_wire.UNLINK), None)

    # ---------------------------------------------------------------- exits

    def trap_exit(self, flag: bool) -> bool:
        with self.poller.lock:
            return self.exits.set_trap(flag)

    @property
    def traps_exits(self) -> bool:
        return self.exits.trap

    def exit(self, pid: Pid, reason: Any) -> None:
        self.exits.exit(pid, reason)

    def exit_process(self, reason: Any, log_crash: bool = True) -> Any:
        """End this runtime process with ``reason`` (see ``Exits.run``); never returns."""
        return self.exits.run(reason, log_crash)

    def is_alive(self, pid: Pid) -> bool:
        if pid == self.me:
            return True
        if pid.node != self.me.node or self.watches.is_dead(pid.serial):
            return False
        with self.poller.lock:  # another thread could close the watch's descriptor
            alive = self.watches.is_alive(pid)
            if alive is False:
                # Dead, its death not handled yet: handle it now, so that what this
                # process does next (a call: NoProcError) agrees with the answer.
                w = self.watches.get(pid.serial)
                if w is not None:
                    self.handle_death(w)
        if alive is not None:
            if alive is False:
                self._after_events()
            return alive
        if self.table.state(pid.serial, pid.slot) == _table.EXITED:
            return False
        # The slot says alive: the OS process is not reaped, maybe a zombie, or in its
        # exit (its parent may have delivered its Down already).
        if _table.zombie_status(pid.os_pid, exiting=True) is not None:
            return False
        # Not a zombie: alive, unless its parent published its exit and reaped it
        # between the two reads (it publishes first: see _table), which this one sees.
        return self.table.state(pid.serial, pid.slot) != _table.EXITED

    # -------------------------------------------------------- introspection

    def state(self) -> dict[str, Any]:
        """What this process's runtime holds about it (lock held): see ``runtime.info``."""
        if self.exits.exiting:
            status = "exiting"
        elif self.poller.waiting:
            status = "waiting"
        else:
            status = "running"
        kept = [] if self.keeper is None else self.keeper.kept()
        return {
            "parent": self.parent,
            "status": status,
            "message_queue_len": self.mailbox.length(),
            "monitors": self.watches.monitored(),
            "links": self.watches.links(),
            "children": [w.pid for w in self.watches.children() if w.pid not in kept],
            "trap_exit": self.exits.trap,
            # (those ready for a target, the next one a spawn takes first)
            "warm_children": [] if self.is_main else sorted(self.warm, key=_serial),
            "warm_child": min(self.warm, key=_serial) if self.warm and not self.is_main
            else None,
            "zygotes": [] if self.keeper is None else self.keeper.zygotes(),
        }

    def processes(self) -> list[Pid]:
        """The node's live processes, from its table (see ``runtime.processes``)."""
        node_id = self.me.node
        live = self.table.live_slots()
        return [pid for pid in (Pid(node_id, serial, slot, os_pid)
                                for serial, slot, os_pid in live if os_pid)
                if self.is_alive(pid)]

    def process_info(self, pid: Pid, timeout: float) -> dict[str, Any] | None:
        """See ``runtime.info``."""
        if not self.is_alive(pid):
            return None
        import psutil  # (a dependency; imported when first asked)

        try:
            mem = psutil.Process(pid.os_pid).memory_full_info()
            memory: dict[str, int] | None = {"rss": mem.rss, "uss": mem.uss}
        except psutil.Error:
            memory = None
        out: dict[str, Any] = {
            "pid": pid, "os_pid": pid.os_pid, "memory": memory,
            "names": sorted(name for name, holder in self.names.registered() if holder == pid),
        }
        state = self.ask_state(pid, timeout)
        if state is None:
            if not self.is_alive(pid):
                return None
            state = dict.fromkeys(("parent", "message_queue_len", "monitors", "links",
                                   "children", "trap_exit", "warm_children", "warm_child",
                                   "zygotes"))
            state["status"] = "running"
        out.update(state)
        return out

    def ask_state(self, pid: Pid, timeout: float) -> dict[str, Any] | None:
        """``pid``'s ``state()``, as its runtime answers it; None if it did not within
        ``timeout`` seconds (it is busy in its own code, or dead)."""
        if pid == self.me:
            with self.poller.lock:
                return self.state()
        ref = next(self._refs)
        try:
            self._ask(pid, ref, _wire.info(ref))
        except NoProcError:
            return None
        result = self._await_call(pid, ref, time.monotonic() + timeout)
        if result is None or not result.ok:
            return None
        state: dict[str, Any] = _wire.loads(result.value)
        return state

    # ------------------------------------------------------- outside loops

    def fileno(self) -> int:
        """The descriptor this process waits on: readable when the runtime has
        something to handle (an event loop can watch it, then call ``pump``)."""
        return self.poller.fileno()

    def pump(self) -> None:
        """Handle whatever is ready now, without blocking."""
        self.poller.pump()

    def add_reader(self, fd: int, callback: Any) -> None:
        """Call ``callback()`` (lock held: runtime code only) whenever ``fd`` is readable."""
        with self.poller.lock:
            self.poller.add(fd, Reader(fd, callback))

    def remove_reader(self, fd: int) -> None:
        with self.poller.lock:
            reader = self.poller.owner(fd)
            if reader.__class__ is Reader:
                self.poller.remove(fd, reader)

    # ------------------------------------------------------------ lifetime

    def descriptors(self) -> FdSet:
        """Every descriptor this node owns: its epoll, what it polls, the sentinels of
        dead children not reaped yet, and ``extra_fds``. Lock held, or in a new child
        (where no other thread runs: the lock may be held for good there)."""
        fds = FdSet()
        fds.bits = bytearray(self.poller.fds.bits)
        for fd in (self.poller.fileno(), *self.watches.unreaped_fds(), *self.extra_fds):
            if fd >= 0:
                fds.add(fd)
        return fds

    def abandon(self) -> None:
        """In a parent, once the child it made this node for has forked: close this
        copy's descriptors (the child has its own). Touches as few objects as it can:
        right after a fork, each page written is copied."""
        self.poller.abandon()
        self.conns.abandon()
        self.watches.abandon()
        for fd in self.extra_fds:
            os.close(fd)
        self.extra_fds.clear()

    def close(self) -> None:
        """Release every descriptor (the embedding process, at shutdown). Threads
        waiting in ``receive`` or ``call`` wake up and raise ProcessError."""

        def close_owner(fd: int, owner: Any) -> None:
            if owner.__class__ is Conn:
                owner.sock.close()
            elif owner is self.conns.listener:
                owner.sock.close()
            elif owner.__class__ is Watch:
                if owner.owns_fd:
                    os.close(fd)
            else:
                try:
                    os.close(fd)
                except OSError:
                    pass

        self.poller.close(close_owner)
