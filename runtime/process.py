"""Processes: spawn, self, send, receive, exit, is_alive, and the node's lifetime.

Every runtime process is a real OS process. The process that imports the
runtime (the embedding process, "main") joins the node on first use: it gets a
``Pid`` and a mailbox, and it always traps exits, so a crash never kills it.

Which process runs what: ``spawn(fn, *args)`` runs ``fn`` in a new process. From a
runtime process, the new process is forked from the caller and is its child
(the OS tree mirrors who started whom). The embedding process never forks (it
may have threads): its spawns are forked by the node's root process, a small
process started once with ``multiprocessing``'s spawn method.

A process that returns exits with reason ``"normal"``; one that raises exits
with a :class:`~runtime.Crash` carrying the traceback, which is logged.
When a process exits, the processes it started die too.
"""

from __future__ import annotations

import _thread
import threading
from collections.abc import Callable
from typing import Any

from . import _launch, _node, _wire
from .errors import NoProcError, ProcessError
from .gen_server import resolve
from .pid import Pid, Ref

__all__ = [
    "configure",
    "demonitor",
    "exit",
    "is_alive",
    "link",
    "monitor",
    "receive",
    "self",
    "send",
    "shutdown",
    "spawn",
    "spawn_monitor",
    "trap_exit",
    "unlink",
]

_START_METHODS = ("fork", "spawn")
_config: dict[str, Any] = {"start_method": None}
_MAIN_THREAD = threading.main_thread().ident  # the same in a forked child


def configure(*, start_method: str | None = None) -> None:
    """Set node options; call before the first use of the runtime in this program.

    Args:
        start_method: ``"fork"`` (default; runtime processes fork their children,
            the fastest) or ``"spawn"`` (every process is a fresh interpreter, as
            on macOS). The environment variable ``RUNTIME_START_METHOD`` sets the
            default.

    Raises:
        ValueError: unknown start method.
        ProcessError: the node has already started.
    """
    if start_method is not None and start_method not in _START_METHODS:
        raise ValueError(f"start_method must be one of {_START_METHODS}, got {start_method!r}")
    if _node.current_or_none() is not None:
        raise ProcessError("configure() must be called before the runtime is first used")
    _config["start_method"] = start_method


def spawn(fn: Callable[..., Any], *args: Any, link: bool = False) -> Pid:
    """Run ``fn(*args)`` in a new OS process and return its Pid.

    Returns as soon as the process exists (messages sent to it are queued); does
    not wait for ``fn`` to start. From the embedding process ``fn`` and ``args``
    are cloudpickled, so lambdas and closures work; from a runtime process
    nothing is pickled (the child is forked), except under the spawn start method.

    Args:
        link: link the new process to the caller (atomically, before it runs).

    Raises:
        TypeError: ``fn`` is not callable, or cannot be pickled when it must be.
        ProcessError: called from a thread other than a runtime process's main thread.
    """
    if not callable(fn):
        raise TypeError(f"spawn needs a callable, got {fn!r}")
    return spawn_for(_node.current(), fn, args, link=link)


def spawn_monitor(fn: Callable[..., Any], *args: Any) -> tuple[Pid, Ref]:
    """Spawn ``fn(*args)`` and monitor it at once (OTP's ``spawn_monitor``).

    Unlike ``spawn`` followed by ``monitor``, the Down carries the process's true
    exit reason even if it exited before the monitor was set up.
    Blocks, raises and pickles as ``spawn``."""
    if not callable(fn):
        raise TypeError(f"spawn needs a callable, got {fn!r}")
    node = _node.current()
    pid = spawn_for(node, fn, args)
    return pid, node.monitor(pid, fresh=True)


def spawn_for(node: _node.Node, fn: Callable[..., Any], args: tuple[Any, ...], *,
              link: bool = False, trap: bool = False) -> Pid:
    if node.is_main:
        payload = _wire.dumps_code((fn, args))
        root = node.root
        assert root is not None
        pid = node.call(root, ("$spawn", payload, link, trap), 30.0)
        if pid.__class__ is tuple and pid[0] == "$error":
            raise pid[1]  # the root could not fork (out of descriptors or processes)
        if not isinstance(pid, Pid):
            raise ProcessError(f"the node's root answered a spawn with {pid!r}")
        if link:
            with node.lock:
                node._add_link(pid, requested=False)
        return pid
    if _thread.get_ident() != _MAIN_THREAD:
        raise ProcessError(
            "spawn from a runtime process must run on its main thread "
            "(a fork from another thread would not be safe)"
        )
    return _launch.start_child(node, (fn, args), link=link, trap=trap)


def self() -> Pid:
    """The calling process's Pid. In the embedding process, joins the node on first use."""
    return _node.current().me


def send(dest: Any, msg: Any) -> None:
    """Send ``msg`` to ``dest`` (a Pid or a registered name). Returns at once.

    A message to a dead Pid is dropped silently, as in OTP. Messages from one
    process to another arrive in the order they were sent.

    Raises:
        NoProcError: ``dest`` is a name that no live process has registered.
        TypeError: ``msg`` cannot be pickled.
    """
    _node.current().send(resolve(dest), msg)


def receive(timeout: float | None = None, match: Callable[[Any], bool] | None = None) -> Any:
    """Take the first message in the mailbox for which ``match(msg)`` is true (any
    message if ``match`` is None); the others stay queued, in order.

    Blocks until such a message arrives or ``timeout`` seconds pass (None: forever).

    Raises:
        ReceiveTimeout: (a ``TimeoutError``) nothing matched in time.
    """
    return _node.current().receive(timeout, match)


def monitor(pid: Any) -> Ref:
    """Watch ``pid`` (a Pid or registered name): when it exits, the caller receives
    ``Down(ref, pid, reason)``. Returns at once. If it is already dead, the Down
    (reason ``"noproc"``) is queued at once, after the messages it sent before dying
    (in an embedding process where another thread is waiting on the runtime, that
    thread queues both, as soon as it wakes)."""
    try:
        target = resolve(pid)
    except NoProcError:
        node = _node.current()
        ref = node.make_ref()
        from .messages import Down

        with node.lock:
            node._queue_down(Down(ref, pid, "noproc"), internal=False)
        return ref
    return _node.current().monitor(target)


def demonitor(ref: Ref, flush: bool = False) -> bool:
    """Stop a monitor. With ``flush``, also remove its Down if it was already queued.

    Returns True if the monitor was active. Never blocks."""
    return _node.current().demonitor(ref, flush)


def link(pid: Any) -> None:
    """Link the caller and ``pid``: if either exits abnormally, the other is killed
    with the same reason unless it traps exits (then it receives ``Exit``).

    Raises:
        NoProcError: ``pid`` is dead and the caller does not trap exits (a caller
            that traps receives ``Exit(pid, "noproc")`` instead).
    """
    _node.current().link(resolve(pid))


def unlink(pid: Any) -> None:
    """Remove the link between the caller and ``pid``, if any. Never blocks or raises."""
    try:
        target = resolve(pid)
    except NoProcError:
        return
    _node.current().unlink(target)


def trap_exit(flag: bool) -> bool:
    """Trap exits (``True``): exit signals from links and ``exit()`` arrive as ``Exit``
    messages instead of killing the caller. Returns the previous setting. The
    embedding process always traps; for it this is a no-op that returns True."""
    return _node.current().set_trap_exit(flag)


def exit(pid: Any, reason: Any) -> None:
    """Send an exit signal to ``pid`` (OTP's ``exit/2``). Returns at once.

    - ``"kill"``: cannot be trapped; the process stops at once, even if busy in its own
      code (``terminate`` does not run), with reason ``"killed"``. Its exit path then
      tells its links and stops its children, bounded to one second in all; a process
      that does not get that far is SIGKILLed.
    - ``"normal"``: ignored unless the target traps exits (it gets ``Exit``).
    - any other reason: a target that traps exits receives ``Exit(caller, reason)``;
      any other target dies at once with ``reason`` (its ``terminate`` does not run),
      even if it is busy in its own code.

    A dead target is ignored. The embedding process is never killed: it receives the
    ``Exit`` message whatever the reason.
    """
    _node.current().exit(resolve(pid), reason)


def is_alive(pid: Pid) -> bool:
    """True if ``pid`` has not exited. Never blocks."""
    if not isinstance(pid, Pid):
        raise TypeError(f"is_alive needs a Pid, got {pid!r}")
    return _node.current().is_alive(pid)


def shutdown(timeout: float = 5.0) -> None:
    """Stop every process of the node and release its files (embedding process only).

    Top-level processes are stopped in reverse start order with reason
    ``"shutdown"`` (servers that trap exits run ``terminate``); whatever is
    still alive after ``timeout`` seconds is killed. Blocks until all are gone.
    Interpreter exit calls this too. The next use of the runtime starts a new node.
    """
    from . import _root

    _root.shutdown_node(timeout)
