"""asyncio: the client side of the runtime as coroutines, for services on an event loop.

::

    reply = await runtime.acall("counter", "get")          # as runtime.call
    msg = await runtime.areceive(timeout=1.0, match=...)   # as runtime.receive
    await runtime.astop(pid)                               # as runtime.stop

They are built on the event loop's own readiness, not on a thread per call: while
something is awaited, the loop watches the node's descriptor (``loop.add_reader``)
and handles what has arrived without blocking; what another thread of the process
happens to receive for an await wakes the loop too. Many awaits on one loop share
the node's connections; the sync functions keep working from other threads
meanwhile. Cancelling an await (a task's cancellation, ``asyncio.timeout``) leaves
nothing behind: a reply that comes later is dropped, a message taken for a
cancelled ``areceive`` goes back to the front of the mailbox. A server that dies
fails every await on it at once.

Each coroutine runs in the embedding process (or any process), in the loop's
thread; it blocks the loop only for the few system calls of sending (and for
connecting to a process it has not talked to yet).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import _checks, _embed
from ._config import DEFAULT_TIMEOUT
from ._mailbox import CallResult
from ._node import Node, call_outcome
from .errors import CallTimeout, ExitError, NoProcError, ProcessError, ReceiveTimeout
from .messages import Down
from .pid import Ref
from .registry import resolve

if TYPE_CHECKING:
    import asyncio
# (asyncio itself is imported on first use: every runtime process imports this module,
# and under the spawn start method each pays for its imports)

__all__ = ["acall", "areceive", "astop"]


class _Driver:
    """What one event loop awaits from the node, and the loop's watch on it. Runs in
    the loop's thread, except ``_delivered``."""

    def __init__(self, loop: asyncio.AbstractEventLoop, node: Node) -> None:
        self.loop = loop
        self.node = node
        self.calls: dict[int, asyncio.Future[CallResult]] = {}
        self.ended: list[int] = []  # calls that ended (see Mailbox.note_reply)
        self.downs: dict[Ref, asyncio.Future[Down]] = {}
        self.receives: list[tuple[Callable[[Any], bool] | None, asyncio.Future[Any]]] = []
        self.attached = False
        self.fd = -1  # the node's descriptor, while attached (kept: it may close first)
        self.scheduled = False
        self.thread = threading.get_ident()  # the loop's
        self.pumping = False  # the loop's thread handles the node's events now

    # -- the loop's watch -----------------------------------------------------

    def _attach(self) -> None:
        """Watch the node while something is awaited. What another thread handled
        before we listened may be there already: look soon."""
        if not self.attached:
            self.attached = True
            self.fd = self.node.fileno()
            self.loop.add_reader(self.fd, self._ready)
            self.node.poller.listen(self._delivered)
            self._look_soon()

    def _look_soon(self) -> None:
        """Settle soon (the loop's thread)."""
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self._settle)

    def _detach_if_idle(self) -> None:
        if self.attached and not (self.calls or self.downs or self.receives):
            self.attached = False
            self.node.poller.unlisten(self._delivered)
            try:
                self.loop.remove_reader(self.fd)
            except (ValueError, OSError):
                pass  # (the descriptor was closed with the node)

    def _delivered(self) -> None:
        """Something was delivered (any thread, the node's lock held): look soon, unless
        this is the loop's thread handling the node's events (``_ready`` looks next)."""
        if not self.scheduled and not (self.pumping and threading.get_ident() == self.thread):
            self._schedule()

    def _schedule(self) -> None:
        self.scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._settle)
        except RuntimeError:
            pass  # the loop is closed

    def _ready(self) -> None:
        self.pumping = True
        try:
            self.node.pump()
        except (ProcessError, ValueError, OSError):  # (the node was shut down)
            self._fail_all(ProcessError("the runtime node has been shut down"))
            return
        finally:
            self.pumping = False
        self._settle()

    def _settle(self) -> None:
        """Resolve what has come (the loop's thread)."""
        self.scheduled = False
        if self.node.poller.closed:
            self._fail_all(ProcessError("the runtime node has been shut down"))
            return
        mailbox = self.node.mailbox
        if self.ended or self.downs:
            calls = self.calls
            with self.node.poller.lock:
                ended = self.ended[:]  # (the mailbox appends to this very list)
                self.ended.clear()
                done = [(fut, r) for ref in ended if (fut := calls.get(ref)) is not None
                        and not fut.done() and (r := mailbox.reply_of(ref)) is not None]
                downs = [(fut, d) for ref, fut in self.downs.items()
                         if not fut.done() and (d := mailbox.down_of((ref,))) is not None]
            for call, result in done:
                call.set_result(result)
            for waiting, down in downs:
                waiting.set_result(down)
        while self.receives:
            match, fut = self.receives[0]
            if fut.done():
                self.receives.pop(0)
                continue
            try:
                got = mailbox.take_now(match)
            except BaseException as exc:  # the match raised: that await raises it
                self.receives.pop(0)
                fut.set_exception(exc)
                continue
            if got is None:
                break
            self.receives.pop(0)
            fut.set_result(got[0])

    def _fail_all(self, exc: BaseException) -> None:
        futures: list[asyncio.Future[Any]] = [*self.calls.values(), *self.downs.values()]
        futures += [f for _, f in self.receives]
        for fut in futures:
            if not fut.done():
                fut.set_exception(exc)

    # -- what is awaited ------------------------------------------------------

    def add_call(self, ref: int) -> asyncio.Future[CallResult]:
        fut: asyncio.Future[CallResult] = self.loop.create_future()
        self.calls[ref] = fut
        ended = self.ended
        with self.node.poller.lock:
            self.node.mailbox.note_reply(ref, ended)
            now = bool(ended)  # (it ended already, or another one did unseen)
        self._attach()
        if now:
            self._look_soon()
        return fut

    def add_down(self, ref: Ref) -> asyncio.Future[Down]:
        fut: asyncio.Future[Down] = self.loop.create_future()
        self.downs[ref] = fut
        self._attach()
        self._look_soon()  # (it may be there already)
        return fut

    def add_receive(self, match: Callable[[Any], bool] | None) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = self.loop.create_future()
        self.receives.append((match, fut))
        self._attach()
        self._look_soon()  # (it may be there already)
        return fut

    def forget(self, ref: Any = None, fut: Any = None) -> None:
        self.calls.pop(ref, None)
        self.downs.pop(ref, None)
        if fut is not None:
            self.receives = [(m, f) for m, f in self.receives if f is not fut]
        self._detach_if_idle()


_drivers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Driver] = \
    weakref.WeakKeyDictionary()


def _driver() -> _Driver:
    import asyncio

    loop = asyncio.get_running_loop()
    node = _embed.current()
    driver = _drivers.get(loop)
    if driver is None or driver.node is not node:  # first use, or a new node
        driver = _drivers[loop] = _Driver(loop, node)
    return driver


async def _outcome(fut: asyncio.Future[Any], timeout: float | None) -> Any:
    """The future's result; None at the timeout (a timer resolves it so: lighter than
    ``asyncio.wait_for``, which wraps the future on every await)."""
    if timeout is None:
        return await fut
    timer = fut.get_loop().call_later(timeout, _expire, fut)
    try:
        return await fut
    finally:
        timer.cancel()


def _expire(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_result(None)


async def acall(dest: Any, request: Any, timeout: float | None = DEFAULT_TIMEOUT) -> Any:
    """``runtime.call`` for coroutines: send ``request`` to the GenServer ``dest`` and
    await its reply, the server's exit, or ``timeout`` seconds (None: forever).

    Raises: as ``runtime.call`` (NoProcError, ExitError as soon as the server exits,
    CallTimeout, ProcessError for a call to oneself, TypeError/ValueError for a bad
    timeout). Cancelling the await drops the call: a reply that comes later is
    discarded.
    """
    timeout = _checks.call_timeout(timeout)
    pid = resolve(dest)
    driver = _driver()
    node = driver.node
    ref = node.start_call(pid, request)
    try:
        result = await _outcome(driver.add_call(ref), timeout)
    finally:
        driver.forget(ref)
        node.end_call(pid, ref)
    return call_outcome(pid, request, timeout, result)


async def areceive(timeout: float | None = None,
                   match: Callable[[Any], bool] | None = None) -> Any:
    """``runtime.receive`` for coroutines: the first message ``match`` accepts (any
    message if None), awaited up to ``timeout`` seconds (None: forever; 0: only what
    has arrived). ``match`` runs in the loop's thread.

    Raises:
        ReceiveTimeout: nothing matched in time.
    """
    timeout = _checks.timeout(timeout)
    driver = _driver()
    node = driver.node
    got = node.mailbox.take_now(match)
    if got is not None:
        return got[0]
    if timeout == 0:
        raise ReceiveTimeout("no matching message within 0s")
    import asyncio

    fut = driver.add_receive(match)
    try:
        result = await asyncio.wait_for(fut, timeout)
    except asyncio.TimeoutError:
        raise ReceiveTimeout(f"no matching message within {timeout}s") from None
    except BaseException:
        if fut.done() and not fut.cancelled() and fut.exception() is None:
            node.mailbox.put_back(fut.result())  # taken for an await that gave up
        raise
    finally:
        driver.forget(fut=fut)
    return result


async def astop(dest: Any, reason: Any = "normal", timeout: float | None = 5.0) -> None:
    """``runtime.stop`` for coroutines: the GenServer ``dest`` runs ``terminate`` and
    exits; awaits its exit up to ``timeout`` seconds (None: forever).

    Raises: as ``runtime.stop`` (NoProcError, ExitError for another reason,
    CallTimeout after which the server was killed, ProcessError for oneself).
    """
    timeout = _checks.timeout(timeout)
    pid = resolve(dest)
    driver = _driver()
    node = driver.node
    if pid == node.me:
        raise ProcessError(f"{pid!r} cannot stop itself and wait for it")
    ref = node.monitor(pid, internal=True)
    node.send(pid, ("$gen_stop", reason))
    try:
        down = await _outcome(driver.add_down(ref), timeout)
    finally:
        driver.forget(ref)
    if down is None:  # (as stop: kill it, and wait for that)
        node.exit(pid, "kill")
        if await _outcome(driver.add_down(ref), 10.0) is None:
            node.demonitor(ref, True)
        driver.forget(ref)
        raise CallTimeout(pid, ("stop", reason), timeout or 0.0)
    if down.reason == "noproc":
        raise NoProcError(pid)
    if down.reason != reason:
        raise ExitError(pid, down.reason, "stop")
