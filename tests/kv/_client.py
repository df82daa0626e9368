"""A line client for the kv server's tests: raw sockets, loopback, every read bounded."""

from __future__ import annotations

import os
import socket

# Under the spawn start method each connection's process is a fresh interpreter:
# a hundred of them at once take longer than 10 s on two cores.
TIMEOUT = 40.0 if os.environ.get("RUNTIME_START_METHOD") == "spawn" else 10.0
ERRORS = (b"NOT FOUND", b"UNKNOWN COMMAND", b"ERROR")


class Client:
    """One connection. ``line()`` reads one reply line (without its ``\\r\\n``)."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = TIMEOUT) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError(f"connection closed; unread: {self.buf[:200]!r}")
            self.buf += data
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def reply(self, verb: bytes = b"") -> bytes:
        """One reply, with its ``\\r\\n``: two lines for a GET that found its bucket."""
        first = self.line()
        if verb == b"GET" and first not in ERRORS:
            return first + b"\r\n" + self.line() + b"\r\n"
        return first + b"\r\n"

    def request(self, line: bytes) -> bytes:
        self.send(line)
        words = line.split()
        return self.reply(words[0] if words else b"")

    def read_to_eof(self) -> bytes:
        """Everything until the server closes (a reset counts as a close)."""
        data = self.buf
        self.buf = b""
        while True:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                return data
            if not chunk:
                return data
            data += chunk

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
