"""GenServer: a server process with call, cast and info, as in OTP.

A guide in brief::

    class Counter(runtime.GenServer):
        def init(self, start):                  # runs in the new process
            return start                        # the state

        def handle_call(self, request, from_, state):
            if request == "get":
                return runtime.Reply(state, state)
            return super().handle_call(request, from_, state)

        def handle_cast(self, request, state):
            if request == "inc":
                return runtime.NoReply(state + 1)
            return super().handle_cast(request, state)

    pid = Counter.start_link(0, name="counter")   # blocks until init returned
    runtime.cast("counter", "inc")                # returns at once
    runtime.call("counter", "get")                # -> 1

Client and server: ``start_link``, ``call``, ``cast`` and ``stop`` run in the
caller's process; the callbacks run in the server's own OS process, one message
at a time, in the order the messages arrived:

    caller                     server process
    start_link(arg) ---------> init(arg) -> state
                    <--------- (returns the Pid once init returned)
    call(pid, req)  ---------> handle_call(req, from_, state) -> Reply(value, state)
                    <--------- value
    cast(pid, req)  ---------> handle_cast(req, state) -> NoReply(state)
    send(pid, msg)  ---------> handle_info(msg, state) -> NoReply(state)
    stop(pid)       ---------> terminate(reason, state), then the process exits

Callbacks return :class:`Reply` (``handle_call`` only), :class:`NoReply` or
:class:`Stop`. A ``handle_call`` may return ``NoReply`` and answer later with
``reply(from_, value)``, from any callback. Anything else stops the server with
a ``TypeError`` crash.

Exit reasons and ``terminate``: an exception in a callback crashes the server;
``terminate(reason, state)`` runs with the :class:`~runtime.Crash`, then the
process exits with it (linked processes and monitors see it, and it is
logged). ``terminate`` also runs for a ``Stop`` and for ``stop()``. It does
*not* run when the process is killed (``exit(pid, "kill")``, SIGKILL) or when a
linked process's exit kills a server that does not trap exits. A server that
traps exits (``runtime.trap_exit(True)`` in ``init``) receives linked exits as
``Exit`` messages in ``handle_info``, except its parent's, which make it run
``terminate`` and exit with the same reason (that is how supervisors stop it).

Timeouts are in seconds (OTP uses milliseconds). Defaults follow OTP: a call
waits 5 seconds; a request the server does not handle crashes it with a reason
that names the request; an unexpected message to the default ``handle_info``
is logged and ignored.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from . import _checks, _embed, _launch
from . import child_spec as specs
from ._config import DEFAULT_TIMEOUT
from .errors import (
    AlreadyRegisteredError,
    CallTimeout,
    Crash,
    ExitError,
    NoProcError,
    ProcessError,
    StartError,
)
from .messages import Exit
from .pid import From, Pid
from .registry import resolve

__all__ = ["GenServer", "NoReply", "Reply", "Stop", "call", "cast", "reply", "stop"]

log = logging.getLogger("runtime")

_NO_REPLY = object()


@dataclass(frozen=True, slots=True)
class Reply:
    """``handle_call`` result: answer ``value`` and continue with ``state``."""

    value: Any
    state: Any


@dataclass(frozen=True, slots=True)
class NoReply:
    """Callback result: continue with ``state`` (a call is answered later with ``reply``)."""

    state: Any


@dataclass(frozen=True, slots=True)
class Stop:
    """Callback result: run ``terminate(reason, state)`` and exit with ``reason``.

    From ``handle_call``, ``reply`` (if given) is sent to the caller first.
    """

    reason: Any
    state: Any
    reply: Any = _NO_REPLY


def call(dest: Any, request: Any, timeout: float | None = DEFAULT_TIMEOUT) -> Any:
    """Send ``request`` to the GenServer ``dest`` and wait for its reply.

    Blocks until the reply, the server's exit, or ``timeout`` seconds (None waits
    forever; 0 takes only a reply that is already there, so it times out; by
    default ``runtime.configure(call_timeout=)``, 5 s unless set). Safe from any
    thread.

    Raises:
        NoProcError: ``dest`` is dead, or no process has that name.
        ExitError: the server exited before replying (``.reason`` is its reason); this
            is raised as soon as it exits, not at the timeout.
        CallTimeout: no reply in time. A reply that comes later is discarded.
        ProcessError: ``dest`` is the calling process (it would wait for itself).
        TypeError, ValueError: ``timeout`` is not a non-negative number or None.
    """
    timeout = _checks.call_timeout(timeout)
    return _embed.current().call(resolve(dest), request, timeout)


def cast(dest: Any, request: Any) -> None:
    """Send ``request`` to ``handle_cast`` of ``dest``; returns once it is sent (see
    ``send``), never raises for a dead process or an unregistered name (as in OTP,
    the request is then lost)."""
    try:
        pid = resolve(dest)
    except NoProcError:
        return
    _embed.current().send(pid, ("$gen_cast", request))


def reply(from_: From, value: Any) -> None:
    """Answer the call identified by ``from_`` (the argument ``handle_call`` got).

    Returns once sent (see ``send``). If the caller has gone or timed out, the reply
    is dropped."""
    if not isinstance(from_, From):
        raise TypeError(f"reply needs the from_ that handle_call received, got {from_!r}")
    _embed.current().reply(from_, value)


def stop(dest: Any, reason: Any = "normal", timeout: float | None = 5.0) -> None:
    """Stop the GenServer ``dest``: it runs ``terminate(reason, state)`` and exits.

    Blocks until the process has exited, or ``timeout`` seconds (None: forever);
    then, if it is still there, kills it (reason ``"killed"``) and waits for that,
    as a supervisor's shutdown timeout does: when ``stop`` returns or raises, the
    process is gone.

    Raises:
        NoProcError: ``dest`` is not alive.
        ExitError: it exited with another reason (``terminate`` raised, for instance).
        CallTimeout: it did not exit in time, and was killed.
        ProcessError: ``dest`` is the calling process: it cannot wait for its own
            exit (return ``Stop`` from the callback instead).
        TypeError, ValueError: ``timeout`` is not a non-negative number or None.
    """
    timeout = _checks.timeout(timeout)
    pid = resolve(dest)
    node = _embed.current()
    if pid == node.me:
        raise ProcessError(f"{pid!r} cannot stop itself and wait for it: return Stop "
                           "from the callback instead")
    ref = node.monitor(pid, internal=True)
    node.send(pid, ("$gen_stop", reason))
    down = node.wait_down((ref,), timeout)
    if down is None:
        _kill_after_timeout(node, pid, ref)
        raise CallTimeout(pid, ("stop", reason), timeout or 0.0)
    if down.reason == "noproc":
        raise NoProcError(pid)
    if down.reason != reason:
        raise ExitError(pid, down.reason, "stop")


def _kill_after_timeout(node: Any, pid: Pid, ref: Any) -> None:
    """A ``stop`` timed out: kill the process, and wait for its Down (a SIGKILL is not
    refused; a few seconds at most)."""
    node.exit(pid, "kill")
    if node.wait_down((ref,), 10.0) is None:
        node.demonitor(ref, True)


class GenServer:
    """Base class of a server process. Subclass it and override the callbacks.

    A fresh instance is made in the server's own process; its attributes are
    private to that process. Keep the server's state in ``state``.
    """

    # ---------------------------------------------------------------- callbacks

    def init(self, arg: Any) -> Any:
        """Runs in the new process before ``start_link`` returns; returns the state.

        Raising makes ``start_link`` raise :class:`StartError` and the process exit.
        Returning ``Stop(reason, None)`` does the same without a traceback."""
        return arg

    def handle_call(self, request: Any, from_: Any, state: Any) -> Reply | NoReply | Stop:
        """Handle a ``call``. Return ``Reply``, ``NoReply`` (then ``reply`` later) or ``Stop``.

        The default crashes the server: it does not handle ``request``."""
        raise NotImplementedError(f"{type(self).__name__} does not handle the call {request!r}")

    def handle_cast(self, request: Any, state: Any) -> NoReply | Stop:
        """Handle a ``cast``. Return ``NoReply`` or ``Stop``. The default crashes."""
        raise NotImplementedError(f"{type(self).__name__} does not handle the cast {request!r}")

    def handle_info(self, msg: Any, state: Any) -> NoReply | Stop:
        """Handle any other message (``Down``, ``Exit``, plain sends). The default logs and
        ignores it."""
        log.warning("%s %r received an unexpected message: %r",
                    type(self).__name__, _embed.current().me, msg)
        return NoReply(state)

    def terminate(self, reason: Any, state: Any) -> None:
        """Called before the process exits on a ``Stop``, a ``stop()``, a crash in a
        callback, or its parent's exit signal while trapping exits. Not called when
        the process is killed. Its return value is ignored; if it raises, the
        process exits with that crash instead."""

    # ------------------------------------------------------------------ client

    @classmethod
    def start_link(cls, arg: Any = None, name: str | None = None, timeout: float = 5.0) -> Pid:
        """Start the server in a new OS process, linked to the caller.

        Blocks until ``init`` returned (or ``timeout`` seconds, after which the new
        process is killed). The caller's process is the new process's parent when
        it is a runtime process; from the embedding process, the node's root is.

        Raises:
            StartError: ``init`` raised, returned ``Stop``, or timed out.
            AlreadyRegisteredError: ``name`` is taken by a live process.
        """
        return start_server(cls, arg, name, timeout, link=True)

    @classmethod
    def start(cls, arg: Any = None, name: str | None = None, timeout: float = 5.0) -> Pid:
        """Like :meth:`start_link`, without the link."""
        return start_server(cls, arg, name, timeout, link=False)

    @classmethod
    def child_spec(cls, arg: Any = None) -> dict[str, Any]:
        """The default child spec for supervisors: a permanent worker started with
        ``start_link(arg)``. Override to change the defaults (see
        ``runtime.child_spec.make``)."""
        return specs.make(cls, cls.start_link, (arg,))


def start_server(cls: type, arg: Any, name: str | None, timeout: float, link: bool,
                 trap: bool = False) -> Pid:
    """Start ``cls`` as a server process; see ``GenServer.start_link``."""
    if not (isinstance(cls, type) and issubclass(cls, GenServer)):
        raise TypeError(f"{cls!r} is not a GenServer subclass")
    if name is not None:
        _checks.name(name)
    timeout = _checks.timeout(timeout, none=False)  # type: ignore[assignment]
    node = _embed.current()
    ref, starter = node.start_ack()
    try:
        pid = _launch.spawn(node, _server_main, (cls, arg, name, starter, link), trap=trap,
                            shown=arg)
    except BaseException:  # (an argument that cannot be pickled): nothing awaits the ack
        with node.poller.lock:
            node.mailbox.drop_reply(ref)
        raise
    mref = node.monitor(pid, fresh=True, internal=True)
    result = node.wait_ack(ref, mref, time.monotonic() + timeout)
    if result is None:
        node.exit(pid, "kill")
        _wait_down(node, mref, pid)
        raise StartError(cls.__name__, "timeout")
    ok, value = result
    if ok and value[0] == "ok":
        node.demonitor(mref, True)
        if link:
            node.linked_by(pid)
        return pid
    # init failed: wait until the process is gone, so nothing outlives the error.
    if ok:
        _wait_down(node, mref, pid)
    if ok and value[0] == "already_started":
        raise AlreadyRegisteredError(name or "", value[1])
    raise StartError(cls.__name__, value[1] if ok else value)


def _wait_down(node: Any, mref: Any, pid: Pid) -> None:
    if node.wait_down((mref,), 10.0) is None:
        node.demonitor(mref, True)
        log.error("%r did not exit after a failed start", pid)


def _server_main(cls: type, arg: Any, name: str | None, starter: From, link: bool) -> None:
    node = _embed.current()
    if name is not None:
        try:
            node.names.register(name, node.me)
        except AlreadyRegisteredError as exc:
            node.reply(starter, ("already_started", exc.pid))
            return
    server = cls()
    try:
        state = server.init(arg)
    except BaseException as exc:
        reason = Crash.from_exception(exc)
        node.reply(starter, ("error", reason))
        node.exit_process(reason)
    if isinstance(state, Stop):
        node.reply(starter, ("error", state.reason))
        node.exit_process(state.reason)
    if link:
        node.linked_by(starter.caller)
    node.reply(starter, ("ok",))
    loop(server, state, starter.caller)


def loop(server: GenServer, state: Any, parent: Pid | None) -> None:
    """The one message loop of every GenServer (Agent and supervisors included).

    Runs in the server's process until it stops; never returns."""
    node = _embed.current()
    next_message = node.next_message
    reply = node.reply
    handle_call = server.handle_call
    handle_cast = server.handle_cast
    handle_info = server.handle_info
    while True:
        msg = next_message()
        try:
            if msg.__class__ is tuple and msg:
                tag = msg[0]
                if tag == "$gen_call":
                    from_ = msg[1]
                    result = handle_call(msg[2], from_, state)
                    if result.__class__ is Reply:
                        reply(from_, result.value)
                        state = result.state
                        continue
                    if result.__class__ is Stop and result.reply is not _NO_REPLY:
                        reply(from_, result.reply)
                    state = _next_state(result, "handle_call")
                    continue
                if tag == "$gen_cast":
                    state = _next_state(handle_cast(msg[1], state), "handle_cast", False)
                    continue
                if tag == "$gen_stop":
                    _terminate(server, msg[1], state)
            elif (msg.__class__ is Exit and node.traps_exits
                  and (msg.pid == parent or msg.pid == node.parent)):
                # The parent's reason was logged where it arose: do not log it again.
                _terminate(server, msg.reason, state, log_crash=False)
            state = _next_state(handle_info(msg, state), "handle_info", False)
        except _Stopping as stopping:
            _terminate(server, stopping.reason, stopping.state)
        except BaseException as exc:
            _terminate(server, Crash.from_exception(exc), state)


class _Stopping(Exception):
    def __init__(self, reason: Any, state: Any) -> None:
        self.reason = reason
        self.state = state


def _next_state(result: Any, callback: str, reply_ok: bool = True) -> Any:
    cls = result.__class__
    if cls is NoReply:
        return result.state
    if cls is Stop:
        raise _Stopping(result.reason, result.state)
    if cls is Reply and reply_ok:
        return result.state
    expected = "Reply, NoReply or Stop" if reply_ok else "NoReply or Stop"
    raise TypeError(f"{callback} returned {result!r}; expected {expected}")


def _terminate(server: GenServer, reason: Any, state: Any, log_crash: bool = True) -> None:
    node = _embed.current()
    try:
        server.terminate(reason, state)
    except BaseException as exc:
        reason = Crash.from_exception(exc)
        log_crash = True
    node.exit_process(reason, log_crash=log_crash)
