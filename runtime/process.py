"""Processes: spawn, self, send, receive, monitors, links, exit, and the node's lifetime.

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

Threads: every function here may be called from any thread of the embedding
process, and from any thread of a runtime process, except ``spawn`` (a runtime
process forks from its main thread only).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import _checks, _config, _embed, _launch, _warm
from ._config import DEFAULT_TIMEOUT, Config
from .errors import NoProcError
from .pid import Pid, Ref
from .registry import resolve

__all__ = [
    "DEFAULT_TIMEOUT",
    "Config",
    "configure",
    "demonitor",
    "exit",
    "info",
    "is_alive",
    "keep_warm",
    "link",
    "monitor",
    "options",
    "processes",
    "receive",
    "self",
    "send",
    "shutdown",
    "spawn",
    "spawn_monitor",
    "system_info",
    "SystemInfo",
    "trap_exit",
    "unlink",
]


def configure(*, start_method: str | None = None, preload: Any = None,
              node_dir: str | None = None, warm_children: int | None = None,
              warm_imports: bool | None = None, call_timeout: Any = None) -> None:
    """Set the runtime's options, in code. Never blocks. Options left as None keep
    their value; each has an environment variable that sets it when neither code
    nor an earlier ``configure`` did. All but ``call_timeout`` are the node's: set
    them before the first use of the runtime in this program.

    Args:
        start_method: ``"fork"`` (default; runtime processes fork their children,
            the fastest) or ``"spawn"`` (every process is a fresh interpreter, as
            on macOS). ``RUNTIME_START_METHOD``.
        preload: names of modules the node's root imports when it starts. A process
            spawned from the embedding process unpickles its target itself, and so
            imports the modules it needs, as under ``multiprocessing``'s forkserver
            method; the root forks those processes, so a module it has imported is
            inherited instead (``multiprocessing.set_forkserver_preload``; under
            the spawn start method every process imports its own). Only modules
            that start no thread at import: the node fails to start if the root
            has more than one thread after preloading. ``RUNTIME_PRELOAD``
            (comma-separated).
        node_dir: where the node's directory is made (its sockets, process table
            and names): ``/dev/shm`` by default, else the temporary directory.
            ``RUNTIME_NODE_DIR``.
        warm_children: how many processes the root keeps started ahead for the
            embedding process's spawns (default 2; 0 turns them off). A warm child
            was forked from the root before the spawn and waits for its target: it
            holds the root's state, which is the runtime, ``preload``'s modules and
            no user state. ``RUNTIME_WARM_CHILDREN``.
        warm_imports: whether a warm child imports, before it offers itself, the
            modules that unpickling earlier targets imported (their functions' and
            their arguments' classes' modules; default True): a service that spawns
            the same kind of process again finds its module imported already, as
            with ``preload``, but learned, and imported in the warm child, never in
            the root. Turn it off if importing one of those modules has effects
            beyond the process (it binds a port, say), as a warm child may never run
            a target, or run another one. ``RUNTIME_WARM_IMPORTS`` (1 or 0).
        call_timeout: the timeout of ``call``, ``acall`` and the Agent's calls when
            none is given (default 5.0 s; ``math.inf``: none). May change at any
            time. ``RUNTIME_CALL_TIMEOUT`` (seconds, or ``none``).

    Raises:
        ValueError: unknown start method, ``node_dir`` is not a directory,
            ``warm_children`` out of 0..64, a negative ``call_timeout``.
        TypeError: ``preload`` is not a list of module names, or another option
            has the wrong type.
        ProcessError: a node option after the node has started.
    """
    _embed.configure({"start_method": start_method, "preload": preload,
                      "node_dir": node_dir, "warm_children": warm_children,
                      "warm_imports": warm_imports, "call_timeout": call_timeout})


def options() -> Config:
    """The options in force (a frozen ``Config`` record): ``configure``'s, else the
    environment's, else the defaults. The node reads its options when it starts;
    ``call_timeout`` is read at each call. Never blocks.

    Raises:
        ValueError, TypeError: an environment variable holds a bad value (it is named).
    """
    return _config.current()


def spawn(fn: Callable[..., Any], *args: Any, link: bool = False) -> Pid:
    """Run ``fn(*args)`` in a new OS process and return its Pid.

    Returns as soon as the process exists (messages sent to it are queued); does
    not wait for ``fn`` to start. From the embedding process, ``fn`` and ``args``
    are cloudpickled (lambdas and closures work) and unpickled in the new
    process, which imports the modules they need; from a runtime process nothing
    is pickled (the child is forked), except under the spawn start method and
    when the caller keeps a child started ahead (``keep_warm``).

    From the embedding process it blocks while the target is written to a process
    the root started ahead (one that takes none of it for 2 s, stopped, is killed
    and another used), or, with none ready, while the root forks one (up to 30 s);
    likewise from a runtime process with a zygote (``keep_warm(zygote=True)``),
    with the zygote for the root. A spawn that raises (Ctrl-C included) leaves no
    process running ``fn``.

    Args:
        link: link the new process to the caller (atomically, before it runs).

    Raises:
        TypeError: ``fn`` is not callable, or cannot be pickled when it must be.
        ProcessError: called from a thread other than a runtime process's main thread;
            the node's root has died, or did not answer within 30 s; the caller's
            zygote died during the spawn (what it may have started died with it).
        OSError: the root (or the zygote) could not fork (out of processes or
            descriptors).
    """
    if not callable(fn):
        raise TypeError(f"spawn needs a callable, got {fn!r}")
    return _launch.spawn(_embed.current(), fn, args, link=link)


def spawn_monitor(fn: Callable[..., Any], *args: Any) -> tuple[Pid, Ref]:
    """Spawn ``fn(*args)`` and monitor it at once (OTP's ``spawn_monitor``).

    Unlike ``spawn`` followed by ``monitor``, the Down carries the process's true
    exit reason even if it exited before the monitor was set up.
    Blocks, raises and pickles as ``spawn``."""
    if not callable(fn):
        raise TypeError(f"spawn needs a callable, got {fn!r}")
    node = _embed.current()
    pid = _launch.spawn(node, fn, args)
    return pid, node.monitor(pid, fresh=True)


def self() -> Pid:
    """The calling process's Pid. In the embedding process, joins the node on first use."""
    return _embed.current().me


def send(dest: Any, msg: Any) -> None:
    """Send ``msg`` to ``dest`` (a Pid or a registered name).

    Returns once the message is in the kernel's socket buffer towards ``dest``:
    at once, unless ``dest`` has left about 200 KB unread (the kernel's default
    Unix socket buffer, ``net.core.wmem_default``); then it blocks until ``dest``
    reads, serving the caller's own incoming messages meanwhile. A message to a
    dead Pid is dropped silently, as in OTP. Messages from one process to another
    arrive in the order they were sent.

    Raises:
        NoProcError: ``dest`` is a name that no live process has registered.
        TypeError: ``msg`` cannot be pickled.
    """
    _embed.current().send(resolve(dest), msg)


def receive(timeout: float | None = None, match: Callable[[Any], bool] | None = None) -> Any:
    """Take the first message in the mailbox for which ``match(msg)`` is true (any
    message if ``match`` is None); the others stay queued, in order.

    Blocks until such a message arrives or ``timeout`` seconds pass (None: forever;
    0: only what has arrived, as OTP's ``after 0``). ``match`` runs in the calling
    thread, outside the runtime's locks: it may call the runtime. If it raises,
    ``receive`` raises that and the message stays queued.

    Raises:
        ReceiveTimeout: (a ``TimeoutError``) nothing matched in time.
        TypeError, ValueError: ``timeout`` is not a non-negative number or None.
    """
    return _embed.current().receive(_checks.timeout(timeout), match)


def monitor(pid: Any) -> Ref:
    """Watch ``pid`` (a Pid or registered name): when it exits, the caller receives
    ``Down(ref, pid, reason)``. Returns at once. If it is already dead, the Down
    (reason ``"noproc"``) is queued at once, after the messages it sent before
    dying."""
    try:
        target = resolve(pid)
    except NoProcError:
        return _embed.current().monitor_name(pid)
    return _embed.current().monitor(target)


def demonitor(ref: Ref, flush: bool = False) -> bool:
    """Stop a monitor. With ``flush``, also remove its Down if it was already queued.

    Returns True if the monitor was active. Never blocks."""
    return _embed.current().demonitor(ref, flush)


def link(pid: Any) -> None:
    """Link the caller and ``pid``: if either exits abnormally, the other is killed
    with the same reason unless it traps exits (then it receives ``Exit``).
    Returns at once.

    Raises:
        NoProcError: ``pid`` is dead and the caller does not trap exits (a caller
            that traps receives ``Exit(pid, "noproc")`` instead).
    """
    _embed.current().link(resolve(pid))


def unlink(pid: Any) -> None:
    """Remove the link between the caller and ``pid``, if any. Never blocks or raises."""
    try:
        target = resolve(pid)
    except NoProcError:
        return
    _embed.current().unlink(target)


def trap_exit(flag: bool) -> bool:
    """Trap exits (``True``): exit signals from links and ``exit()`` arrive as ``Exit``
    messages instead of killing the caller. Returns the previous setting. The
    embedding process always traps; for it this is a no-op that returns True."""
    return _embed.current().trap_exit(flag)


def keep_warm(on: bool = True, *, zygote: bool = False) -> None:
    """In a runtime process: keep children started ahead for its spawns (``on``), or
    stop (``False``). Returns at once; the work is done when the caller next waits
    for a message (``receive`` with no ``match``, or a GenServer between messages),
    on its main thread: while the process is idle instead of while a spawn waits.

    A spawn whose target can be pickled (cloudpickle) is then run by a child
    started ahead instead of a fork of the caller, except ``trap=True`` starts (a
    supervisor's own children), which are forked as usual, or by the zygote. Two
    kinds:

    - ``zygote=False``: one child, forked by the caller when it was last idle (and
      again each time a spawn took it). The target runs in a process that sees
      the caller's memory, and holds the descriptors the caller had open, as they
      were then, not as they are at the spawn (a socket the caller has closed
      since stays open in it: its port stays bound). That is why this is a
      choice, not the default.
    - ``zygote=True``: children forked by a *zygote*, a small process the caller
      starts as a fresh interpreter (its child), which keeps two children started
      ahead and forks more when a spawn finds none ready (``trap=True`` ones
      too). A process's own fork slows down as it and its children grow (at
      thousands of children, by 5-10x on a small machine: the kernel walks the
      pages they share with it); a zygote's does not, and a new zygote replaces
      it after 400 children, so none is shared by more. The target runs in a
      fresh interpreter that has imported the modules of the targets before it,
      not a copy of the caller: it must not rely on state the caller set up at
      run time (a target from a child spec never does). The processes it runs
      in are the zygote's children (``info(pid)["parent"]``), linked to the
      caller if the spawn links; they die with the zygote, which dies with the
      caller: killing a zygote kills the processes it forked, as killing the
      caller does. A retired zygote exits once those it forked are gone.

    Children started ahead are not the node's processes (``processes()``) until
    they have a target, and cost the memory of an idle process each (a zygote
    that of a fresh interpreter, ~10 MiB). ``keep_warm(False)`` stops those
    waiting; the zygotes exit once the processes they forked are gone.
    ``DynamicSupervisor.start_link(warm_child=True)`` (or ``zygote=True``) turns
    it on for a supervisor's children.

    Raises:
        ProcessError: called from the embedding process (its spawns use the root's
            warm children: ``configure(warm_children=)``).
    """
    _warm.keep_warm(_embed.current(), bool(on), bool(zygote))


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

    Raises:
        TypeError: ``reason`` cannot be pickled (nothing is done).
    """
    _embed.current().exit(resolve(pid), reason)


def is_alive(pid: Pid) -> bool:
    """True if ``pid`` has not exited. Never blocks."""
    if not isinstance(pid, Pid):
        raise TypeError(f"is_alive needs a Pid, got {pid!r}")
    return _embed.current().is_alive(pid)


def processes() -> list[Pid]:
    """Every live process of the node, the embedding process and the node's root
    included, in start order. Never blocks."""
    return _embed.current().processes()


def info(pid: Pid, timeout: float = 1.0) -> dict[str, Any] | None:
    """What the runtime knows of ``pid`` (OTP's ``process_info``), None if it is dead.

    Keys: ``pid``, ``os_pid``, ``names`` (its registered names), ``memory``
    (``{"rss": ..., "uss": ...}`` in bytes, from psutil), and what the process's own
    runtime answers when asked: ``parent``, ``status`` (``"waiting"`` in the
    runtime, ``"running"`` its own code, ``"exiting"``), ``message_queue_len``,
    ``monitors`` (the processes it monitors), ``links``, ``children``,
    ``trap_exit``, ``warm_children`` (the children started ahead for its spawns that
    are ready for a target, the one its next spawn takes first: see ``keep_warm``),
    ``warm_child`` (that first one, or None) and ``zygotes`` (the zygotes it keeps,
    see ``keep_warm``; like its warm children, they are not among its
    ``children``). A process busy in its own code answers when it next enters the
    runtime: if it has not within ``timeout`` seconds, those keys are None and its
    status is ``"running"``.

    Blocks up to ``timeout`` seconds. Raises TypeError if ``pid`` is not a Pid.
    """
    if not isinstance(pid, Pid):
        raise TypeError(f"info needs a Pid, got {pid!r}")
    value = _checks.timeout(timeout, none=False)
    assert value is not None
    return _embed.current().process_info(pid, value)


@dataclass(frozen=True)
class SystemInfo:
    """The node as a whole (see ``system_info``)."""

    node_dir: str  # its directory: sockets, the process table, names, the key
    root: Pid  # the root process (forks the embedding process's spawns, reaps orphans)
    janitor: int | None  # OS pid of the process that removes node_dir once all is gone
    warm_children: tuple[int, ...]  # OS pids of the warm children ready now, oldest first


def system_info() -> SystemInfo:
    """The node's directory, root, janitor and warm children (OTP's ``system_info``),
    for tools and demos: ``python -m kv demo`` names each process with it.

    From the embedding process: blocks for one call to the root the first time (the
    janitor's OS pid, kept after); joins the node on first use. From a runtime
    process, ``janitor`` is None and ``warm_children`` empty (only the embedding
    process knows them).
    """
    node = _embed.current()
    root = _embed.root_pid(node)
    assert root is not None
    if not node.is_main:
        return SystemInfo(node.info.dir, root, None, ())
    return SystemInfo(node.info.dir, root, _embed.janitor(node),
                      tuple(pid.os_pid for pid in node.waiting_warm()))


def shutdown(timeout: float = 5.0) -> None:
    """Stop every process of the node and release its files (embedding process only).

    Top-level processes are stopped in reverse start order with reason
    ``"shutdown"`` (servers that trap exits run ``terminate``); whatever is
    still alive after ``timeout`` seconds is killed. Blocks until all are gone.
    Interpreter exit calls this too. The next use of the runtime starts a new node.

    Raises:
        ProcessError: called from a runtime process.
    """
    value = _checks.timeout(timeout, none=False)
    assert value is not None
    _embed.shutdown(value)
