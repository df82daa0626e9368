"""Internal: how messages travel between processes.

Every process owns a listening Unix stream socket in the node's directory (mode
0700), named after its serial. A sender connects once and keeps the connection;
frames are a 4-byte big-endian length and a pickle. A connection is used in both
directions, but a sender sticks to the first connection it chose for a peer, so
messages from one process to another stay in order.

The first frame on a connection is a HELLO, in plain binary, that proves the
node's random key: ``HMAC(key, connector serial | connector os pid | target
serial)``. The acceptor checks it against the kernel-attested peer pid
(``SO_PEERCRED``) and closes the connection unless it holds; nothing from a
connection is unpickled before that.

Plain ``pickle`` carries messages; ``cloudpickle`` is used only when plain pickle
cannot (lambdas, closures, classes defined in ``__main__``), that is where code
travels.
"""

from __future__ import annotations

import _socket
import hmac
import os
import pickle
import socket
import struct
from typing import Any

HEADER = struct.Struct("!I")
MAX_FRAME = 1 << 31

# Frame tags: the first element of every decoded frame tuple.
T_MSG = 0  # (T_MSG, message)
T_REPLY = 1  # (T_REPLY, ref, value)
T_LINK = 2  # (T_LINK, from_pid)
T_UNLINK = 3  # (T_UNLINK, from_pid)
T_EXIT = 4  # (T_EXIT, from_pid, reason): an exit signal for a process that traps exits

_PEERCRED = struct.Struct("3i")


def dumps(obj: Any) -> bytes:
    """Pickle ``obj``; fall back to cloudpickle for code (lambdas, closures, __main__)."""
    try:
        data = pickle.dumps(obj, protocol=5)
        # A reference to the sender's __main__ (a function or class of the user's
        # script) means nothing in another process: those travel by value.
        if b"__main__" not in data:
            return data
    except Exception:
        pass
    import cloudpickle

    try:
        code: bytes = cloudpickle.dumps(obj, protocol=5)
        return code
    except Exception as exc:
        raise TypeError(f"cannot send {obj!r}: it cannot be pickled ({exc})") from exc


def dumps_code(obj: Any) -> bytes:
    """Pickle something that carries code (a spawn target): cloudpickle directly."""
    import cloudpickle

    try:
        data: bytes = cloudpickle.dumps(obj, protocol=5)
        return data
    except Exception as exc:
        raise TypeError(f"cannot send {obj!r} to another process: {exc}") from exc


def frame(payload: bytes) -> bytes:
    return HEADER.pack(len(payload)) + payload


def encode(obj: Any) -> bytes:
    """A whole frame for ``obj``."""
    payload = dumps(obj)
    return HEADER.pack(len(payload)) + payload


def proof(key: bytes, serial: int, os_pid: int, target_serial: int) -> bytes:
    return hmac.new(key, b"%d|%d|%d" % (serial, os_pid, target_serial), "sha256").digest()


# The HELLO is plain binary, not a pickle: nothing from an unproven peer is unpickled.
_HELLO = struct.Struct("!4sQII32s")
_MAGIC = b"RTH1"


def hello_frame(key: bytes, serial: int, slot: int, target_serial: int) -> bytes:
    os_pid = os.getpid()
    body = _HELLO.pack(_MAGIC, serial, slot, os_pid, proof(key, serial, os_pid, target_serial))
    return HEADER.pack(len(body)) + body


def check_hello(key: bytes, sock: _socket.socket, my_serial: int,
                payload: memoryview) -> tuple[int, int, int] | None:
    """(serial, slot, os_pid) of the peer if ``payload`` is a valid HELLO from the process
    at the other end of ``sock``, else None."""
    if len(payload) != _HELLO.size:
        return None
    magic, serial, slot, os_pid, given = _HELLO.unpack(payload)
    if magic != _MAGIC:
        return None
    if peer_os_pid(sock) != os_pid:
        return None
    if not hmac.compare_digest(proof(key, serial, os_pid, my_serial), given):
        return None
    return serial, slot, os_pid


def peer_os_pid(sock: _socket.socket) -> int:
    """The OS pid of the process at the other end of ``sock``, as the kernel reports it."""
    cred = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    pid: int = _PEERCRED.unpack(cred)[0]
    return pid


def split_frames(buf: bytearray) -> list[memoryview] | None:
    """Remove the complete frames at the start of ``buf``; return their payloads.

    Returns None if no frame is complete yet. The payloads are copies, safe to keep.
    """
    n = len(buf)
    pos = 0
    out = []
    while n - pos >= 4:
        size = HEADER.unpack_from(buf, pos)[0]
        end = pos + 4 + size
        if end > n:
            break
        out.append(memoryview(bytes(buf[pos + 4 : end])))
        pos = end
    if not pos:
        return None
    del buf[:pos]
    return out
