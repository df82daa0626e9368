"""Process targets and servers for the fault tests, in a module that imports only
the runtime: a process spawned from the embedding process unpickles its target and
imports its module, and a test module would bring pytest and hypothesis with it."""

from __future__ import annotations

import os
import time

import runtime


def sleeper() -> None:
    time.sleep(600)  # sleep-ok: a process that blocks until it is killed


def parent_of_two(report_to: runtime.Pid | None = None) -> None:
    """Starts two sleepers (one linked), reports their OS pids, then blocks."""
    kids = [runtime.spawn(sleeper), runtime.spawn(sleeper, link=True)]
    if report_to is not None:
        runtime.send(report_to, ("kids", runtime.self(), [k.os_pid for k in kids]))
    time.sleep(600)  # sleep-ok: a process that blocks until it is killed


class Worker(runtime.GenServer):
    """A worker that starts a child of its own in ``init`` (a grandchild of its
    supervisor) and answers calls with its OS pid and its child's."""

    def init(self, arg: object) -> object:
        self.child = runtime.spawn(sleeper)
        return arg

    def handle_call(self, request: object, from_: object, state: object) -> runtime.Reply:
        return runtime.Reply((os.getpid(), self.child.os_pid), state)


class LongCall(runtime.GenServer):
    """``("long", tell)``: starts two children, tells ``tell`` its own and their OS pids,
    then works (sleeps) for a minute before it would answer."""

    def handle_call(self, request: object, from_: object, state: object) -> runtime.Reply:
        _, tell = request  # type: ignore[misc]
        kids = [runtime.spawn(sleeper), runtime.spawn(parent_of_two)]
        runtime.send(tell, ("in call", os.getpid(), [k.os_pid for k in kids]))
        time.sleep(60)  # sleep-ok: a call that takes long (killed meanwhile)
        return runtime.Reply("done", state)


def calls_and_reports(server: runtime.Pid, main: runtime.Pid) -> None:
    """A runtime process that makes the long call and reports how it ended."""
    try:
        result = runtime.call(server, ("long", main), timeout=30)
        runtime.send(main, ("call ended", "returned", result))
    except runtime.ProcessError as exc:
        runtime.send(main, ("call ended", type(exc).__name__, getattr(exc, "reason", None)))


def crashes(message: str) -> None:
    raise RuntimeError(message)


def reports_messages(main: runtime.Pid) -> None:
    """Unpickles every message it gets and tells ``main``; ends at "stop"."""
    me = runtime.self()
    runtime.send(main, ("listening", me))
    for _ in range(10_000):
        msg = runtime.receive(timeout=60)
        runtime.send(main, ("received", me, msg if isinstance(msg, str) else repr(msg)))
        if msg == "stop":
            return


def sends_its_hello(main: runtime.Pid, target_serial: int) -> None:
    """Opens a connection to the process ``target_serial`` (if there is one) with a
    handshake and the message "recorded", as the runtime would, and sends ``main``
    that handshake (what a recording of the connection would hold); then blocks."""
    import pickle
    import socket
    import struct

    from runtime import _embed, _wire

    node = _embed.current()
    hello = _wire.hello(node.info.key, node.me, target_serial, 1 << 40)
    payload = pickle.dumps("recorded")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(node.info.sock_path(target_serial))
        sock.sendall(hello + struct.pack("!I", len(payload) + 1) + b"\x00" + payload)
    except OSError:
        pass  # no such process: a recording of a connection never made
    runtime.send(main, ("hello", hello))
    time.sleep(600)  # sleep-ok: a process that blocks until it is killed


class Echo(runtime.GenServer):
    def handle_call(self, request: object, from_: object, state: object) -> runtime.Reply:
        return runtime.Reply(request, state)


class Trapping(Echo):
    """Traps exits and tells ``state`` (a Pid) each message it gets."""

    def init(self, arg: object) -> object:
        runtime.trap_exit(True)
        return arg

    def handle_info(self, msg: object, state: object) -> runtime.NoReply:
        runtime.send(state, ("info", msg))
        return runtime.NoReply(state)


class HangsInInit(runtime.GenServer):
    """Starts a child, tells ``arg`` (a Pid) their OS pids, then never returns."""

    def init(self, arg: object) -> object:
        child = runtime.spawn(sleeper)
        runtime.send(arg, ("in init", os.getpid(), child.os_pid))
        time.sleep(600)  # sleep-ok: an init that never returns
        return arg


class NeverReturns(runtime.GenServer):
    """``("hang", tell)``: tells ``tell`` it is in the callback, which never returns."""

    def handle_call(self, request: object, from_: object, state: object) -> runtime.Reply:
        runtime.send(request[1], ("in callback", runtime.self()))  # type: ignore[index]
        time.sleep(600)  # sleep-ok: a callback that never returns
        return runtime.Reply(None, state)


class CallsItself(runtime.GenServer):
    def handle_call(self, request: object, from_: object, state: object) -> runtime.Reply:
        try:
            runtime.call(runtime.self(), "again", timeout=60)
        except runtime.ProcessError as exc:
            return runtime.Reply((type(exc).__name__, str(exc)), state)
        return runtime.Reply("no error", state)


class BadReply(runtime.GenServer):
    def handle_call(self, request: object, from_: object, state: object) -> runtime.Reply:
        import threading

        return runtime.Reply(threading.Lock(), state)


def big_message_peak(size: int, to: runtime.Pid | None, main: runtime.Pid) -> None:
    """Send ``size`` bytes to ``to`` (or receive them if None), then report to ``main``
    the time it took and how far the peak RSS rose above the RSS before."""
    import resource  # noqa: F401  (the peak comes from /proc: it can be reset there)

    if to is None:
        runtime.send(main, ("ready", runtime.self()))
    before = reset_peak()
    started = time.monotonic()
    if to is None:
        got = runtime.receive(timeout=120)
        length = len(got)
        del got
    else:
        runtime.send(to, filled(size))
        length = size
    runtime.send(main, ("peak", "receiver" if to is None else "sender", length,
                        time.monotonic() - started, peak() - before))
    runtime.receive(timeout=60, match=lambda m: m == "bye")


def reset_peak() -> int:
    """Reset this process's peak RSS to its RSS (``clear_refs``); the RSS, in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


def peak() -> int:
    """This process's peak RSS since the last reset, in bytes."""
    return _status("VmHWM")


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise LookupError(field)


def sends_on_go(main: runtime.Pid, msg: object) -> None:
    runtime.receive(timeout=30, match=lambda m: m == "go")
    runtime.send(main, msg)


def filled(size: int) -> bytes:
    """``size`` bytes on pages of their own (``bytes(size)`` maps the zero page, which
    RSS does not count until written)."""
    return bytes(range(256)) * (size // 256)


class Actor(runtime.GenServer):
    """The property test's process: ``arg = (main, trap)``. Calls: ``("link", pid)``
    (answers "ok", or "noproc" when the link raised NoProcError), ``("exit", pid,
    reason)`` (``runtime.exit``, then "ok"). Casts: "crash"
    (raises). Messages: ``("ping", n)`` is answered with ``("pong", me, n)``; an
    ``Exit`` (it traps) is told to ``main`` as ``("trapped", me, from, reason)``."""

    def init(self, arg: tuple[runtime.Pid, bool]) -> runtime.Pid:
        main, trap = arg
        if trap:
            runtime.trap_exit(True)
        return main

    def handle_call(self, request: object, from_: object, state: object) -> runtime.Reply:
        if isinstance(request, tuple) and request[0] == "link":
            try:
                runtime.link(request[1])
            except runtime.NoProcError:
                return runtime.Reply("noproc", state)
            return runtime.Reply("ok", state)
        if isinstance(request, tuple) and request[0] == "exit":
            runtime.exit(request[1], request[2])
            return runtime.Reply("ok", state)
        return super().handle_call(request, from_, state)  # type: ignore[return-value]

    def handle_cast(self, request: object, state: object) -> runtime.NoReply:
        if request == "crash":
            raise RuntimeError("crash on request")
        return super().handle_cast(request, state)  # type: ignore[return-value]

    def handle_info(self, msg: object, state: object) -> runtime.NoReply:
        me = runtime.self()
        if isinstance(msg, runtime.Exit):
            runtime.send(state, ("trapped", me, msg.pid, msg.reason))
        elif isinstance(msg, tuple) and msg[0] == "ping":
            runtime.send(state, ("pong", me, msg[1]))
        return runtime.NoReply(state)


def replays_its_hello(main: runtime.Pid, target_serial: int, evil: bytes) -> None:
    """Connects to the process ``target_serial`` with a handshake and the message
    "recorded", then replays the same handshake on a second connection with the
    pickle ``evil``; tells ``main`` whether the target closed that second one."""
    import pickle
    import select
    import socket
    import struct

    from runtime import _embed, _wire

    node = _embed.current()
    hello = _wire.hello(node.info.key, node.me, target_serial, 1 << 40)
    first = pickle.dumps("recorded")
    path = node.info.sock_path(target_serial)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as one:
        one.connect(path)
        one.sendall(hello + struct.pack("!I", len(first) + 1) + b"\x00" + first)
        runtime.receive(timeout=10, match=lambda m: m == "seen")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as two:
            two.connect(path)
            two.sendall(hello + struct.pack("!I", len(evil) + 1) + b"\x00" + evil)
            poller = select.poll()
            poller.register(two, select.POLLIN)
            closed = bool(poller.poll(5000)) and two.recv(1) == b""
    runtime.send(main, ("replay closed", closed))
