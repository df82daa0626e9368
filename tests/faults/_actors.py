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
    """Sends ``main`` the handshake this process would open a connection to the process
    ``target_serial`` with (what a recording of it would hold), then blocks."""
    from runtime import _embed, _wire

    node = _embed.current()
    runtime.send(main, ("hello", _wire.hello(node.info.key, node.me, target_serial)))
    time.sleep(600)  # sleep-ok: a process that blocks until it is killed
