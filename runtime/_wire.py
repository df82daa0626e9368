"""Internal: what travels between processes, byte for byte.

A connection carries frames: a 4-byte big-endian length, then the frame. Its
first byte is a tag; then come the tag's fixed binary fields; then, for the
tags that carry a user value, a pickle of that value:

========== ======================== ==============================
tag        fixed fields             pickle
========== ======================== ==============================
MSG        none                     the message
CALL       the call's ref (u64)     the request (a GenServer call)
REPLY      the call's ref (u64)     the reply
LINK       none                     none: link to the sender
UNLINK     none                     none: unlink from the sender
EXIT       none                     the sender's exit signal reason
INFO       the request's ref (u64)  none: answer with a REPLY (``runtime.info``)
WARM       none                     none: a warm child waits for a target (``_root``)
RUN        link to the sender (u8)  none: the cloudpickled target, as a warm child gets it
========== ======================== ==============================

The sender of a frame is the process at the other end of its connection.

So a node routes every frame without unpickling it: the receiver unpickles a
value when it takes it (``_mailbox``), outside the node's lock, where the user
code that unpickling may run (``__setstate__``, an import) is free to use the
runtime.

The first frame of a connection is a HELLO, plain binary, which proves the
node's random key: ``HMAC(key, connector serial | connector OS pid | target
serial | n)``, where ``n`` numbers the connector's connections. The acceptor
checks it against the peer pid the kernel reports (``SO_PEERCRED``), and that it
has not accepted that (serial, n) before, and closes the connection unless both
hold; nothing from a connection is unpickled before that. So a recorded HELLO
replays nowhere: to another process its proof is wrong, to the same one it was
seen (even sent from a process that got the recorder's OS pid back).

An *observer* (``python -m runtime top``) is a connector that is no process of
the node: it has no table slot, no socket and no name. It proves the key as a
process would, with a serial of its own that has the ``OBSERVER`` bit set (no
process of a node ever has it: serials count up from 1); an acceptor answers
its INFO frames, on its one connection, and closes the connection on any other
frame. The key is in the node's directory (``KEY_FILE``, mode 0600, in a
directory of mode 0700), so only the node's owner can observe it.

Plain ``pickle`` carries values; ``cloudpickle`` only where plain pickle cannot
(lambdas, closures, classes defined in ``__main__``): that is where code travels.
"""

from __future__ import annotations

import hmac
import io
import os
import pickle
import socket
import struct
import sys
from typing import Any

from .pid import Pid

LENGTH = struct.Struct("!I")

MSG, REPLY, LINK, UNLINK, EXIT, CALL, INFO, RUN, WARM = 0, 1, 2, 3, 4, 5, 6, 7, 8
_WITH_REF = struct.Struct("!IBQ")  # length, tag, ref
_TAGGED = struct.Struct("!IB")  # length, tag
REF_FIELD = struct.Struct("!Q")

# Above this size a payload is written from its own buffer, not copied behind its head.
_JOIN_MAX = 1 << 16

_PEERCRED = struct.Struct("3i")


def dumps(obj: Any, shown: Any = None) -> bytes:
    """Pickle ``obj``; cloudpickle where plain pickle cannot (see the module doc).

    Raises:
        TypeError: it cannot be pickled; the message names ``shown`` (default ``obj``),
            the value as the user gave it.
    """
    try:
        data = pickle.dumps(obj, protocol=5)
        # A reference to the sender's __main__ (a function or class of the user's
        # script) means nothing in another process: those travel by value.
        if b"__main__" not in data:
            return data
    except Exception:
        pass
    return _dumps_by_value(obj, shown)


def dumps_code(obj: Any, shown: Any = None) -> bytes:
    """Pickle a spawn target ``(fn, args)``: as ``dumps`` (a function importable by
    name travels by name), but by cloudpickle alone once a module is registered with
    ``cloudpickle.register_pickle_by_value``, which plain pickle would send by name.

    Raises:
        TypeError: as ``dumps``.
    """
    if _by_value_registered() or (obj.__class__ is tuple and obj and _is_code(obj[0])):
        return _dumps_by_value(obj, shown)
    return dumps(obj, shown)


def _is_code(fn: Any) -> bool:
    """Is ``fn`` code that travels by value (``__main__``'s, a lambda, a local
    function)? Then plain pickle is not tried first: it would fail, or pickle the
    arguments once for nothing."""
    try:
        return (getattr(fn, "__module__", None) in ("__main__", "__mp_main__")
                or "<" in getattr(fn, "__qualname__", ""))
    except Exception:
        return False


def _dumps_by_value(obj: Any, shown: Any) -> bytes:
    """cloudpickle: code (lambdas, closures, what ``__main__`` defines) by value."""
    try:
        with io.BytesIO() as file:
            _code_pickler()(file, protocol=5).dump(obj)
            return file.getvalue()
    except Exception as exc:
        value = obj if shown is None else shown
        raise TypeError(f"cannot send {value!r} to another process: {exc}") from None


def _by_value_registered() -> bool:
    """Has a module been registered with cloudpickle to travel by value? (Not if
    cloudpickle is not even imported yet.)"""
    cloudpickle = sys.modules.get("cloudpickle")
    return cloudpickle is not None and bool(cloudpickle.list_registry_pickle_by_value())


_CodePickler: Any = None


def _code_pickler() -> Any:
    """cloudpickle's Pickler, except that code keeps its file name.

    cloudpickle (2.1+) writes ``<dynamic-code>`` as the file name of the code it
    pickles by value (functions and classes of the user's ``__main__``), so that
    its pickles are byte-for-byte reproducible. Here that matters less than a
    crash's traceback, which would show ``File "<dynamic-code>"`` and no source
    line for the user's own script: the real name is put back. Its private
    ``_code_reduce`` is used; without it (another version) names are lost, no
    more."""
    global _CodePickler
    if _CodePickler is not None:
        return _CodePickler
    import collections
    import collections.abc
    import types

    import cloudpickle

    reduce = getattr(getattr(cloudpickle, "cloudpickle", None), "_code_reduce", None)
    table = getattr(cloudpickle.Pickler, "dispatch_table", None)
    if reduce is None or not isinstance(table, collections.abc.MutableMapping):
        _CodePickler = cloudpickle.Pickler
        return _CodePickler
    base: collections.abc.MutableMapping[Any, Any] = table

    def code_reduce(code: types.CodeType) -> Any:
        fn, args = reduce(code)
        return fn, tuple(code.co_filename if arg.__class__ is str and arg == "<dynamic-code>"
                         else arg for arg in args)

    class CodePickler(cloudpickle.Pickler):  # type: ignore[misc]
        dispatch_table = collections.ChainMap({types.CodeType: code_reduce}, base)

    _CodePickler = CodePickler
    return _CodePickler


def loads(data: bytes) -> Any:
    """Unpickle what ``dumps`` made."""
    return pickle.loads(data)


def _frame(head: bytes, payload: bytes) -> list[bytes]:
    if len(payload) <= _JOIN_MAX:
        return [head + payload]
    return [head, payload]


def message(payload: bytes) -> list[bytes]:
    """A MSG frame around a pickled message (as buffers to write in order)."""
    head = _TAGGED.pack(len(payload) + 1, MSG)
    return [head + payload] if len(payload) <= _JOIN_MAX else [head, payload]


def call(ref: int, payload: bytes) -> list[bytes]:
    """A CALL frame: the pickled request of the call ``ref``."""
    head = _WITH_REF.pack(len(payload) + 9, CALL, ref)  # (9: the tag and the ref)
    return [head + payload] if len(payload) <= _JOIN_MAX else [head, payload]


_RUN = struct.Struct("!IBB")  # length, tag, link


def run(payload: bytes, link: bool) -> list[bytes]:
    """A RUN frame: a warm child's target (``dumps_code``'s), and whether it links to
    the sender first."""
    return _frame(_RUN.pack(len(payload) + 2, RUN, link), payload)


def info(ref: int) -> list[bytes]:
    """An INFO frame: a request for the receiver's state, answered with REPLY ``ref``."""
    return [_WITH_REF.pack(1 + REF_FIELD.size, INFO, ref)]


def reply(ref: int, payload: bytes) -> list[bytes]:
    """A REPLY frame: the pickled answer to the call ``ref``."""
    head = _WITH_REF.pack(len(payload) + 9, REPLY, ref)  # (9: the tag and the ref)
    return [head + payload] if len(payload) <= _JOIN_MAX else [head, payload]


def control(tag: int, payload: bytes = b"") -> list[bytes]:
    """A LINK, UNLINK, EXIT or WARM frame (EXIT with the pickled reason)."""
    return _frame(_TAGGED.pack(len(payload) + 1, tag), payload)


# ------------------------------------------------------------------ the handshake

# The HELLO is plain binary, not a pickle: nothing from an unproven peer is unpickled.
_HELLO = struct.Struct("!4sQIIQ32s")
_MAGIC = b"RTH2"


def _proof(key: bytes, serial: int, os_pid: int, target_serial: int, n: int) -> bytes:
    return hmac.new(key, b"%d|%d|%d|%d" % (serial, os_pid, target_serial, n),
                    "sha256").digest()


def hello(key: bytes, me: Pid, target_serial: int, n: int) -> bytes:
    """The first frame on a connection from ``me`` to the process ``target_serial``:
    ``n`` numbers the connections ``me`` made, so that the target accepts each HELLO
    once (see ``Connections``)."""
    os_pid = os.getpid()
    body = _HELLO.pack(_MAGIC, me.serial, me.slot, os_pid, n,
                       _proof(key, me.serial, os_pid, target_serial, n))
    return LENGTH.pack(len(body)) + body


def check_hello(key: bytes, sock: socket.socket, my_serial: int,
                body: memoryview) -> tuple[int, int, int, int] | None:
    """(serial, slot, OS pid, connection number) of the peer if ``body`` is a valid
    HELLO from the process at the other end of ``sock``, else None. (Whether it was
    seen before is the caller's to check.)"""
    if len(body) != _HELLO.size:
        return None
    magic, serial, slot, os_pid, n, given = _HELLO.unpack(body)
    if magic != _MAGIC:
        return None
    try:
        if peer_os_pid(sock) != os_pid:
            return None
    except OSError:
        return None
    if not hmac.compare_digest(_proof(key, serial, os_pid, my_serial, n), given):
        return None
    return serial, slot, os_pid, n


# ------------------------------------------------------------------ observers

# The serial bit of an observer (see the module docstring); its other bits are the
# observer's OS pid and a number it chooses, so two live observers never share one.
OBSERVER = 1 << 63
KEY_FILE = "key"


def is_observer(serial: int) -> bool:
    return serial >= OBSERVER


def observer(number: int) -> Pid:
    """The identity an observer gives in its HELLO (see the module docstring)."""
    return Pid(0, OBSERVER | os.getpid() << 32 | number & 0xFFFFFFFF, 0, os.getpid())


def save_key(node_dir: str, key: bytes) -> None:
    """Write the node's key into its directory, readable by its owner only."""
    fd = os.open(os.path.join(node_dir, KEY_FILE),
                 os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, key)
    finally:
        os.close(fd)


def load_key(node_dir: str) -> bytes:
    """The key of the node in ``node_dir``. Raises OSError (PermissionError for
    anyone but its owner)."""
    with open(os.path.join(node_dir, KEY_FILE), "rb") as f:
        return f.read()


def peer_os_pid(sock: socket.socket) -> int:
    """The OS pid of the process at the other end of ``sock``, as the kernel reports it."""
    cred = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    pid: int = _PEERCRED.unpack(cred)[0]
    return pid
