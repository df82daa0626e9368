"""The guide's TCP server: an acceptor, one process per connection, the text protocol.

The tree (the guide's ``KVServer.Supervisor``), started by :func:`start`::

    kv.server.supervisor (one_for_one)
      1. kv.server.tasks     a DynamicSupervisor (the guide's Task.Supervisor): one
                             temporary Connection process per client, at most
                             ``max_connections`` of them
      2. kv.server.acceptor  the Acceptor (permanent): listens, accepts, and hands
                             each connection to a new Connection

A failure while serving one connection ends that connection's process only. A
killed acceptor is restarted and listens again on the same port; the
connections it handed over live under the task supervisor and carry on.

How a connection travels. The acceptor accepts it, asks the task supervisor to
start a Connection and passes it the socket's descriptor (``SCM_RIGHTS``) over a
Unix datagram socket in the abstract namespace (nothing on disk) whose name the
acceptor drew at random. The Connection takes a descriptor only from the
acceptor's OS pid, which the kernel attests (``SCM_CREDENTIALS``). The acceptor
never waits for the Connection: if it died before it took the socket, the client
sees the connection closed and the acceptor goes on accepting.

How a request is served, and why it is fast. A Connection reads what the client
sent, parses every complete line (``kv.command``) and answers them, in order,
in one write (``TCP_NODELAY`` is on, so a reply never waits for an ACK).
Consecutive requests on the same bucket go to it as one call (``kv.bucket.run``),
so a pipelined batch costs one hop, not one per request. A Connection talks to
the buckets directly: it keeps the bucket Pids it looked up, each monitored, so a
request pays no registry round trip; a dead bucket's entry goes with its
``Down``, and a call that finds its bucket dead looks the name up again.

Limits. A line holds at most ``max_line`` bytes before its ``\\n`` (the ``\\r``
counts); a longer line is answered with ``ERROR`` and the connection is closed,
and a Connection never buffers more than that. More than ``max_connections``
clients at once: the newcomer gets ``ERROR`` and is closed. A bucket that died
while it held a request: ``ERROR`` and the connection is closed (the request's
effect is unknown); so too when the registry does not answer (the kv tree is
restarting). Idle connections are kept; a client that does not read its replies
for ``SEND_TIMEOUT`` seconds is disconnected. Nothing that comes from the network
is ever unpickled.

Stopping (:func:`stop`): the acceptor stops (the port is closed), then every
Connection is sent SIGTERM: it answers the complete lines it has read, closes
the connection and exits; what remains after the grace period is stopped with
the tree. :func:`kv.serve <serve>` runs the kv tree and the server until SIGINT
or SIGTERM, and then does just that.
"""

from __future__ import annotations

import array
import errno
import logging
import os
import secrets
import select
import signal
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import runtime
from runtime import Down, DynamicSupervisor, GenServer, NoReply, Pid, Stop, Supervisor
from runtime import child_spec as specs

from . import registry
from . import supervisor as kv_supervisor
from .command import (
    ERROR,
    NOT_FOUND,
    OK,
    REGISTRY,
    UNKNOWN_COMMAND,
    Create,
    Get,
    UnknownCommand,
    op,
    parse,
    reply,
)

__all__ = [
    "ACCEPTOR", "Acceptor", "Connection", "HOST", "MAX_CONNECTIONS", "MAX_LINE", "PORT",
    "SUPERVISOR", "Settings", "TASKS", "serve", "start", "stop",
]

log = logging.getLogger("kv.server")

SUPERVISOR = "kv.server.supervisor"
TASKS = "kv.server.tasks"
ACCEPTOR = "kv.server.acceptor"

HOST = "127.0.0.1"
PORT = 4040
MAX_LINE = 64 * 1024
MAX_CONNECTIONS = 1024

BACKLOG = 1024
RECV_SIZE = 256 * 1024
# A call to a bucket or the registry: as long as the guide's default.
CALL_TIMEOUT = 5.0
# How long a new Connection waits for its socket; the acceptor sends it right after
# the Connection started, so only an acceptor that died in between makes it wait.
HANDOFF_TIMEOUT = 5.0
# A client that does not read its replies for this long is disconnected.
SEND_TIMEOUT = 30.0
# Bucket Pids a Connection keeps (each monitored); the oldest goes first.
CACHE_SIZE = 1024
# How long stop() lets the Connections answer what they have read.
DRAIN_TIMEOUT = 5.0

_SERVE = "$kv.server.serve"
_ACCEPT = "$kv.server.accept"
_FD_SIZE = array.array("i").itemsize
_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid
# Errors of accept() that concern one client only (see accept(2)): try the next one.
_CLIENT_ERRORS = {errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ENETDOWN,
                  errno.ENOPROTOOPT, errno.EHOSTDOWN, errno.ENONET, errno.EHOSTUNREACH,
                  errno.EOPNOTSUPP, errno.ENETUNREACH}
# Errors of accept() that say the process or the system is out of something.
_RESOURCE_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


@dataclass(frozen=True)
class Settings:
    """What the acceptor and the Connections need to know (checked by :func:`start`)."""

    host: str
    port: int
    max_line: int = MAX_LINE
    max_connections: int = MAX_CONNECTIONS
    registry: str = REGISTRY


# ------------------------------------------------------------------ the client API


def start(host: str = HOST, port: int = PORT, *, max_line: int = MAX_LINE,
          max_connections: int = MAX_CONNECTIONS, registry_name: str = REGISTRY
          ) -> tuple[str, int]:
    """Start the server's tree (see the module doc), linked to the caller, serving the
    kv registry ``registry_name`` (which must be running, see ``kv.start``).

    Runs in the caller, which the tree's supervisor is linked to; blocks until the
    acceptor listens. ``port`` 0 picks a free port: the port is chosen here, once,
    so that a restarted acceptor listens on the same one. The registry is looked
    up by name at each request that needs it: if it is not running, those
    requests get ``ERROR``.

    Returns:
        The address it listens on, ``(host, port)``.

    Raises:
        OSError: it cannot listen on ``host``:``port`` (the message says why).
        ValueError: an option is out of range.
        runtime.AlreadyRegisteredError: a server is running already.
        runtime.StartError: the tree did not start.
    """
    for option, value in (("max_line", max_line), ("max_connections", max_connections)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{option} must be an int >= 1, got {value!r}")
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise ValueError(f"port must be an int from 0 to 65535, got {port!r}")
    port = _reserve(host, port)
    settings = Settings(host, port, max_line, max_connections, registry_name)
    children = [DynamicSupervisor.child_spec(name=TASKS, max_children=max_connections),
                Acceptor.child_spec(settings)]
    Supervisor.start_link(children, strategy="one_for_one", name=SUPERVISOR)
    return host, port


def stop(timeout: float = DRAIN_TIMEOUT) -> None:
    """Stop the server: close the port, let every connection answer the complete lines
    it has read (``timeout`` seconds at most), close them, and stop the tree.

    Blocks until the tree is gone: about ``timeout`` seconds at most, plus the stop
    of Connections that did not finish in time. Call it from any process but a
    process of the server's tree.

    Raises:
        runtime.NoProcError: the server is not running.
    """
    Supervisor.terminate_child(SUPERVISOR, ACCEPTOR)  # (raises NoProcError if not running)
    try:
        children = DynamicSupervisor.which_children(TASKS)
    except runtime.NoProcError:
        children = []
    pending = set()
    for child in children:
        if child.pid is not None:
            pending.add(runtime.monitor(child.pid))
            _signal(child.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pending:
        try:
            down = runtime.receive(max(0.0, deadline - time.monotonic()),
                                   lambda m: m.__class__ is Down and m.ref in pending)
        except runtime.ReceiveTimeout:
            break
        pending.discard(down.ref)
    for ref in pending:
        runtime.demonitor(ref, flush=True)
    runtime.stop(SUPERVISOR, "shutdown", None)


def serve(host: str = HOST, port: int = PORT, *, max_line: int = MAX_LINE,
          max_connections: int = MAX_CONNECTIONS,
          ready: Callable[[tuple[str, int]], Any] | None = None) -> None:
    """Run the kv store and its TCP server until SIGINT or SIGTERM, then stop both.

    Starts the kv tree (``kv.start``) and the server (:func:`start`), calls
    ``ready((host, port))`` once it listens (by default it logs "Accepting
    connections on host:port" on the ``kv.server`` logger), and blocks. On SIGINT
    or SIGTERM it stops the server (:func:`stop`: the port closes, every
    connection answers the complete lines it has read) and the kv tree, restores
    the signal handlers it found, and returns. The runtime's node keeps running
    (``runtime.shutdown`` ends it).

    Must be called from the main thread of the embedding process (it installs the
    signal handlers). A signal sent to the whole process group or cgroup also
    reaches the runtime's processes, which end at once: send it to this process
    only, or run the service in a session of its own, as ``python -m kv serve``
    does.

    Raises:
        OSError: it cannot listen on ``host``:``port``.
        runtime.ProcessError: the kv tree or the server stopped on its own (their
            restart intensity was reached); what was left of both was stopped.
        ValueError: called from another thread than the main thread, or a bad option.
    """
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def on_signal(signo: int, frame: Any) -> None:
        try:
            os.write(wake_w, b"s")
        except OSError:
            pass

    previous = {signo: signal.signal(signo, on_signal) for signo in (signal.SIGINT,
                                                                     signal.SIGTERM)}
    watched: list[tuple[str, Pid, Any, int]] = []
    died = None
    try:
        kv_sup = kv_supervisor.start()
        try:
            address = start(host, port, max_line=max_line, max_connections=max_connections)
            try:
                for name in (kv_supervisor.SUPERVISOR, SUPERVISOR):
                    watched.append(_watch(name))
                if ready is None:
                    log.info("Accepting connections on %s:%d", *address)
                else:
                    ready(address)
                died = _wait_signal_or_exit(wake_r, watched)
            finally:
                if runtime.whereis(SUPERVISOR) is not None:
                    stop()
        finally:
            if runtime.is_alive(kv_sup):
                kv_supervisor.stop()
        if died is not None:
            raise runtime.ProcessError(f"{died[0]} exited with reason {died[1]!r}; "
                                       "the server stopped")
    finally:
        for _name, _pid, ref, fd in watched:
            runtime.demonitor(ref, flush=True)
            os.close(fd)
        for signo, handler in previous.items():
            signal.signal(signo, handler)
        os.close(wake_r)
        os.close(wake_w)


def _watch(name: str) -> tuple[str, Pid, Any, int]:
    """Monitor the process registered as ``name`` and open a pidfd on it.

    Raises:
        runtime.NoProcError: it is not running.
    """
    pid = runtime.whereis(name)
    if pid is None:
        raise runtime.NoProcError(name, "it stopped before the server was ready")
    ref = runtime.monitor(pid)
    try:
        fd = os.pidfd_open(pid.os_pid)
    except OSError:
        fd = -1
    if fd < 0 or not runtime.is_alive(pid):  # (alive after the open: the pidfd is its)
        runtime.demonitor(ref, flush=True)
        if fd >= 0:
            os.close(fd)
        raise runtime.NoProcError(name, "it stopped before the server was ready")
    return name, pid, ref, fd


def _wait_signal_or_exit(wake: int, watched: list[tuple[str, Pid, Any, int]]
                         ) -> tuple[str, Any] | None:
    """Block until a byte comes on ``wake`` (a signal) or a watched supervisor exits;
    None for a signal, else the supervisor's name and exit reason."""
    fds = {fd: (name, ref) for name, _pid, ref, fd in watched}
    while True:
        readable, _, _ = select.select([wake, *fds], [], [])
        for fd in readable:
            if fd in fds:
                name, ref = fds[fd]
                return name, _reason(ref)
        if wake in readable:
            return None


def _reason(ref: Any) -> Any:
    """The exit reason in the Down of monitor ``ref``, which comes right after the
    process's end."""
    try:
        down = runtime.receive(5.0, lambda m: m.__class__ is Down and m.ref == ref)
    except runtime.ReceiveTimeout:
        return "unknown"
    return down.reason


def _reserve(host: str, port: int) -> int:
    """Check that ``host``:``port`` can be listened on and return the port (the one
    the kernel picked, for port 0)."""
    try:
        sock = _listen(host, port, 1)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None
    with sock:
        return int(sock.getsockname()[1])


def _listen(host: str, port: int, backlog: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def _signal(pid: Pid, signo: int) -> None:
    """Send ``signo`` to the runtime process ``pid`` if it is alive (through a pidfd,
    so that a recycled OS pid is never hit)."""
    try:
        fd = os.pidfd_open(pid.os_pid)
    except OSError:
        return
    try:
        if runtime.is_alive(pid):  # (alive now, so the pidfd is this process)
            signal.pidfd_send_signal(fd, signo)
    except OSError:
        pass
    finally:
        os.close(fd)


# ------------------------------------------------------------------ the acceptor


class Acceptor(GenServer):
    """The process that listens and accepts (the guide's ``KVServer.accept``).

    ``init`` binds and listens, so ``start_link`` returns once connections are
    accepted; then the process loops in ``accept`` and answers no call. It does
    not trap exits: the supervisor's exit signal ends it at once, closing the port.
    """

    @classmethod
    def child_spec(cls, arg: Any = None) -> dict[str, Any]:
        return specs.make(ACCEPTOR, cls.start_link, (arg,), {"name": ACCEPTOR})

    def init(self, arg: Any) -> Any:
        self.settings: Settings = arg
        self.listener = _listen(arg.host, arg.port, BACKLOG)
        self.handoff = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.me = runtime.self()
        runtime.send(self.me, _ACCEPT)
        return None

    def handle_info(self, msg: Any, state: Any) -> Any:
        if msg == _ACCEPT:
            while True:
                self._accept_one()
        return NoReply(state)

    def _accept_one(self) -> None:
        try:
            conn, _peer = self.listener.accept()
        except OSError as exc:
            if exc.errno in _CLIENT_ERRORS:
                return
            if exc.errno in _RESOURCE_ERRORS:
                # No event says when a descriptor or memory frees up: wait a little
                # rather than spin (the pending client waits in the backlog).
                log.warning("kv server: accept failed (%s); retrying in 0.1 s", exc)
                time.sleep(0.1)
                return
            raise
        with conn:
            self._hand_over(conn)

    def _hand_over(self, conn: socket.socket) -> None:
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            return  # (reset already)
        address = "\0kv.server." + secrets.token_hex(16)
        try:
            DynamicSupervisor.start_child(TASKS, Connection.child_spec(
                (address, self.me, self.settings)))
        except runtime.ProcessError:
            # max_connections reached, or the task supervisor restarts: say so, close.
            try:
                conn.send(ERROR, socket.MSG_DONTWAIT)
            except OSError:
                pass
            return
        try:
            self.handoff.sendmsg([b"c"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                           array.array("i", [conn.fileno()]))], 0, address)
        except OSError:
            pass  # it died before it took the socket: closing ours closes the connection


# ------------------------------------------------------------------ a connection


class Connection(GenServer):
    """The process that serves one client (the guide's ``serve`` task).

    ``init`` opens the inbox for its socket; then the process takes the socket and
    serves it until the client closes, an ``ERROR``, or SIGTERM (see :func:`stop`),
    and exits normally. It answers no call while it serves.
    """

    @classmethod
    def child_spec(cls, arg: Any = None) -> dict[str, Any]:
        return specs.make("kv.server.connection", cls.start_link, (arg,), restart="temporary")

    def init(self, arg: Any) -> Any:
        address, acceptor, settings = arg
        self.settings: Settings = settings
        self.acceptor: Pid = acceptor
        self.draining = False
        self.sock: socket.socket | None = None
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.signal(signal.SIGTERM, self._on_sigterm)
        self.inbox = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.inbox.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.inbox.bind(address)
        runtime.send(runtime.self(), _SERVE)
        return None

    def handle_info(self, msg: Any, state: Any) -> Any:
        if msg != _SERVE:
            return NoReply(state)
        sock = self._take_socket()
        self.inbox.close()
        if sock is not None:
            self.sock = sock
            if self.draining:  # (SIGTERM came before we had the socket)
                self._on_sigterm(signal.SIGTERM, None)
            try:
                _Session(self.settings, sock).serve()
            finally:
                try:
                    sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                sock.close()
        return Stop("normal", state)

    def _on_sigterm(self, signo: int, frame: Any) -> None:
        """Stop reading: answer what was read, then close (see ``stop``). Runs between
        two bytecodes of this process's main thread: it only sets a flag and makes
        a blocked read return."""
        self.draining = True
        try:
            os.write(self.wake_w, b"t")
        except OSError:
            pass
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RD)
            except OSError:
                pass

    def _take_socket(self) -> socket.socket | None:
        """The client's socket, from the acceptor; None if it does not come (the
        acceptor died, SIGTERM, or HANDOFF_TIMEOUT)."""
        try:
            acceptor = os.pidfd_open(self.acceptor.os_pid)
        except OSError:
            acceptor = -1
        try:
            waiter = select.poll()
            for fd in (self.inbox.fileno(), acceptor, self.wake_r):
                if fd >= 0:
                    waiter.register(fd, select.POLLIN)
            deadline = time.monotonic() + HANDOFF_TIMEOUT
            while True:
                sock = self._receive_socket()
                if sock is not None:
                    return sock
                remaining = deadline - time.monotonic()
                if self.draining or remaining <= 0 or acceptor < 0:
                    return None
                events = waiter.poll(remaining * 1000)
                if any(fd == acceptor for fd, _ in events):
                    return self._receive_socket()  # (it may have sent it just before)
        finally:
            if acceptor >= 0:
                os.close(acceptor)

    def _receive_socket(self) -> socket.socket | None:
        """A socket the acceptor sent, if one is queued; messages from anyone else are
        dropped (with any descriptors they carried)."""
        space = socket.CMSG_SPACE(_FD_SIZE) + socket.CMSG_SPACE(_CREDENTIALS.size)
        while True:
            try:
                _, ancillary, _, _ = self.inbox.recvmsg(1, space, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return None
            fds: list[int] = []
            sender = None
            for level, kind, data in ancillary:
                if level != socket.SOL_SOCKET:
                    continue
                if kind == socket.SCM_RIGHTS:
                    fds.extend(array.array("i", data[:len(data) - len(data) % _FD_SIZE]))
                elif kind == socket.SCM_CREDENTIALS and len(data) >= _CREDENTIALS.size:
                    sender = _CREDENTIALS.unpack_from(data)[0]
            if sender == self.acceptor.os_pid and len(fds) == 1:
                sock = socket.socket(fileno=fds[0])
                if sock.type == socket.SOCK_STREAM:
                    sock.setblocking(True)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                                    struct.pack("ll", int(SEND_TIMEOUT), 0))
                    return sock
                sock.close()
                continue
            for fd in fds:
                os.close(fd)


class _Fail(Exception):
    """A request cannot be answered: reply ``ERROR`` and close the connection."""


class _Session:
    """What one Connection knows: its socket, its settings, and the bucket Pids it
    looked up (each monitored). Lives in the Connection's process."""

    def __init__(self, settings: Settings, sock: socket.socket) -> None:
        self.sock = sock
        self.max_line = settings.max_line
        self.registry = settings.registry
        self.buckets: dict[str, Pid] = {}  # name -> live bucket (as far as we know)
        self.refs: dict[Any, str] = {}  # monitor ref -> name
        self.ref_of: dict[str, Any] = {}  # name -> monitor ref

    def serve(self) -> None:
        """Serve the client until it closes, an ERROR, or the end of what it sent
        before the Connection stopped reading (SIGTERM: the read side is shut)."""
        max_line = self.max_line
        recv = self.sock.recv
        send = self.sock.sendall
        execute = self.execute
        pending = b""
        while True:
            try:
                data = recv(RECV_SIZE)
            except OSError:
                return
            if not data:
                return
            if pending:
                data = pending + data
            end = data.rfind(b"\n")
            if end < 0:
                if len(data) > max_line:
                    send(ERROR)
                    return
                pending = data
                continue
            pending = data[end + 1:]
            lines = data[:end].split(b"\n")
            too_long = False
            if end > max_line:  # (only then can one line be too long)
                for i, line in enumerate(lines):
                    if len(line) > max_line:
                        del lines[i:]
                        too_long = True
                        break
            out, failed = execute(lines)
            if not failed and (too_long or len(pending) > max_line):
                out += ERROR
                failed = True
            try:
                send(out)
            except OSError:
                return
            if failed:
                return

    def execute(self, lines: list[bytes]) -> tuple[bytes, bool]:
        """The replies to ``lines``, in order, and whether the connection must close
        (the last reply is then ``ERROR``)."""
        out: list[bytes] = []
        name = None
        run: list[Any] = []
        try:
            for line in lines:
                try:
                    command = parse(line)
                except UnknownCommand:
                    if run:
                        self._run(name, run, out)
                        run = []
                    out.append(UNKNOWN_COMMAND)
                    continue
                if command.__class__ is Create:
                    if run:
                        self._run(name, run, out)
                        run = []
                    self._create(command.bucket)
                    out.append(OK)
                    continue
                if command.bucket != name:
                    if run:
                        self._run(name, run, out)
                        run = []
                    name = command.bucket
                run.append(command)
            if run:
                self._run(name, run, out)
        except _Fail:
            out.append(ERROR)
            return b"".join(out), True
        return b"".join(out), False

    def _run(self, name: Any, commands: list[Any], out: list[bytes]) -> None:
        """Carry out ``commands`` (all on bucket ``name``) as one call; append replies."""
        request = ("$kv", tuple([op(c) for c in commands]))
        is_alive = runtime.is_alive
        for _attempt in (1, 2):
            pid = self._bucket(name)
            if pid is None:
                out.extend([NOT_FOUND] * len(commands))
                return
            # A bucket that is dead already (its Down not seen yet) is forgotten, and
            # the name looked up again: it may have a new bucket. The check is needed:
            # a call to a process that died before it began raises ExitError, not
            # NoProcError, while this process still watches it (a runtime quirk).
            if not is_alive(pid):
                self._forget(name)
                continue
            try:
                results = runtime.call(pid, request, CALL_TIMEOUT)
            except runtime.NoProcError:
                self._forget(name)
                continue
            except runtime.ProcessError as exc:  # died holding it, or too slow
                raise _Fail from exc
            for command, result in zip(commands, results, strict=True):
                out.append(OK if command.__class__ is not Get else reply(command, result))
            return
        out.extend([NOT_FOUND] * len(commands))

    def _bucket(self, name: str) -> Pid | None:
        pid = self.buckets.get(name)
        if pid is not None:
            return pid
        self._drain_downs()
        try:
            pid = registry.lookup(self.registry, name)
        except runtime.ProcessError as exc:
            raise _Fail from exc
        if pid is not None:
            self._remember(name, pid)
        return pid

    def _create(self, name: str) -> None:
        try:
            pid = registry.create(self.registry, name)
        except runtime.ProcessError as exc:
            raise _Fail from exc
        if self.buckets.get(name) != pid:
            self._forget(name)
            self._drain_downs()
            self._remember(name, pid)

    def _remember(self, name: str, pid: Pid) -> None:
        if len(self.buckets) >= CACHE_SIZE:
            self._forget(next(iter(self.buckets)))
        ref = runtime.monitor(pid)
        self.buckets[name] = pid
        self.refs[ref] = name
        self.ref_of[name] = ref

    def _forget(self, name: str) -> None:
        self.buckets.pop(name, None)
        ref = self.ref_of.pop(name, None)
        if ref is not None:
            self.refs.pop(ref, None)
            runtime.demonitor(ref, flush=True)

    def _drain_downs(self) -> None:
        """Forget the buckets whose Down has come (and drop any other message: while
        it serves, a Connection takes no request)."""
        while True:
            try:
                msg = runtime.receive(0)
            except runtime.ReceiveTimeout:
                return
            if msg.__class__ is Down:
                name = self.refs.pop(msg.ref, None)
                if name is not None:
                    self.buckets.pop(name, None)
                    self.ref_of.pop(name, None)
