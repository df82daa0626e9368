"""Internal: a node's connections to its peers.

Every process listens on a Unix socket named after its serial in the node's
directory; a sender connects once, proves the node key (see ``_wire``), and keeps
the connection. Writes never block forever: while a peer's buffer is full the
node keeps reading its own connections, so two processes writing to each other
cannot deadlock.
"""

from __future__ import annotations

import _socket
import mmap
import select
import time
from typing import Any

from . import _wire
from ._base import (
    EPOLLIN,
    POLL_MAX,
    READ_SIZE,
    Conn,
    NodeState,
)
from .pid import Pid

_AF_UNIX = _socket.AF_UNIX
_SOCK_STREAM = _socket.SOCK_STREAM


class Transport(NodeState):
    """Part of Node (see ``_node``); a mixin, it uses the node's state."""

    def _accept_all(self) -> list[Conn]:
        new: list[Conn] = []
        while True:
            try:
                fd, _ = self.listen._accept()  # type: ignore[attr-defined]
            except (BlockingIOError, InterruptedError):
                return new
            except OSError:
                return new
            sock = _socket.socket(_AF_UNIX, _SOCK_STREAM, 0, fd)
            sock.setblocking(False)
            conn = Conn(sock, None)
            self.handlers[conn.fd] = conn
            self.epoll.register(conn.fd, EPOLLIN)
            self.unproven.add(conn)
            new.append(conn)

    def _read(self, conn: Conn, drain: bool = False) -> None:
        """Read what ``conn`` has (all of it with ``drain``) and dispatch whole frames."""
        sock = conn.sock
        handlers = self.handlers
        header = _wire.HEADER
        rbuf = self.rbuf
        if rbuf is None or self.reading:  # first read, or re-entered from a dispatch
            # Anonymous memory: only the pages a read touches cost anything.
            rbuf = mmap.mmap(-1, READ_SIZE)
            if not self.reading:
                self.rbuf = rbuf
        rview = memoryview(rbuf)
        self.reading += 1
        try:
            while True:
                try:
                    n = sock.recv_into(rbuf)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError:
                    n = 0
                if not n:
                    self._close_conn(conn)
                    if not drain and conn.peer is not None:
                        # A peer closes its end only by dying: check it now rather than
                        # wake again for its sentinel or pidfd (see _process).
                        self.suspects.append(conn.peer.serial)
                    return
                buf = conn.inbuf
                if buf:
                    buf += rview[:n]
                    for payload in _wire.split_frames(buf) or ():
                        self._dispatch(conn, payload)
                        if handlers.get(conn.fd) is not conn:
                            return
                else:
                    # Frames straight from the read buffer; only a partial one is copied.
                    pos = 0
                    while n - pos >= 4:
                        end = pos + 4 + header.unpack_from(rbuf, pos)[0]
                        if end > n:
                            break
                        self._dispatch(conn, rview[pos + 4 : end])
                        if handlers.get(conn.fd) is not conn:
                            return
                        pos = end
                    if pos < n:
                        buf += rview[pos:n]
                if not drain and n < READ_SIZE:
                    return
        finally:
            self.reading -= 1
            try:
                rview.release()
            except BufferError:
                pass

    def _close_conn(self, conn: Conn) -> None:
        self.unproven.discard(conn)
        self.handlers.drop(conn.fd, conn, self.epoll)
        if conn.peer is not None:
            serial = conn.peer.serial
            if self.out.get(serial) is conn:
                del self.out[serial]
            peers = self.conns_of.get(serial)
            if peers is not None:
                peers.discard(conn)
                if not peers:
                    del self.conns_of[serial]
        conn.sock.close()

    def _conn_to(self, pid: Pid) -> Conn | None:
        conn = self.out.get(pid.serial)
        if conn is not None:
            return conn
        if pid.node != self.node_id:
            return None
        sock = _socket.socket(_AF_UNIX, _SOCK_STREAM)
        try:
            sock.connect(self.info.sock_path(pid.serial))
        except OSError:
            sock.close()
            return None
        conn = self.adopt_conn(sock, pid)
        self._write(conn, _wire.hello_frame(self.key, self.me.serial, self.me.slot, pid.serial))
        return conn

    def adopt_conn(self, sock: _socket.socket, peer: Pid) -> Conn:
        """Use a connected socket (one we connected, or a socketpair made at spawn) for
        ``peer``: poll it, and send to ``peer`` through it."""
        sock.setblocking(False)
        conn = Conn(sock, peer)
        self.handlers[conn.fd] = conn
        self.epoll.register(conn.fd, EPOLLIN)
        self.out[peer.serial] = conn
        self.conns_of.setdefault(peer.serial, set()).add(conn)
        return conn

    def _write(self, conn: Conn, data: bytes) -> bool:
        if conn.outbuf:
            conn.outbuf += data
            return self._flush(conn)
        try:
            n = conn.sock.send(data)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError:
            self._close_conn(conn)
            return False
        if n == len(data):
            return True
        conn.outbuf = data[n:]
        return self._flush(conn)

    def _flush(self, conn: Conn) -> bool:
        """Finish writing ``conn.outbuf``. While the peer's buffer is full, keep reading
        our own connections (if no other thread does), so that two processes that
        write to each other cannot deadlock."""
        give_up = self.exit_deadline if self.exiting else None
        while conn.outbuf:
            if give_up is not None and time.monotonic() > give_up:
                # Exiting, and the peer does not read: drop the frame rather than hang
                # (a linked peer still learns of our death through its watch).
                conn.outbuf = b""
                self._close_conn(conn)
                return False
            try:
                n = conn.sock.send(conn.outbuf)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError:
                conn.outbuf = b""
                self._close_conn(conn)
                return False
            conn.outbuf = conn.outbuf[n:]
            if not conn.outbuf:
                return True
            if not self.polling:
                events = self.epoll.poll(0, POLL_MAX)
                if events:
                    self._process(events)
                    if self.is_main:
                        self.cond.notify_all()
                if self.handlers.get(conn.fd) is not conn:
                    return False
            # Let other threads run while we wait for room. The exit path of a runtime
            # process may get here without holding the lock: then there is none to drop.
            try:
                self.lock.release()
                released = True
            except RuntimeError:
                released = False
            try:
                poller = select.poll()
                poller.register(conn.fd, select.POLLOUT)
                poller.poll(50)
            except (OSError, ValueError):
                pass
            finally:
                if released:
                    self.lock.acquire()
        return True

    def _send(self, pid: Pid, obj: Any) -> bool:
        """Send one frame to ``pid``. False if the process is gone (the frame is dropped)."""
        conn = self.out.get(pid.serial) or self._conn_to(pid)
        if conn is None:
            return False
        return self._write(conn, _wire.encode(obj))
