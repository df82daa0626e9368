"""The server's text protocol: ``parse`` a line into a command, ``run`` a command.

Both are plain functions, the guide's ``KVServer.Command``: ``parse`` is pure (no
sockets, no processes), and ``run`` asks the registry and the bucket, in the
caller's process. The server (``kv.server``) uses the same commands, replies and
bucket operations, with a cache and batches in front (see there)::

    >>> parse("CREATE shopping\\r\\n")
    Create(bucket='shopping')
    >>> parse("PUT shopping milk 1\\r\\n")
    Put(bucket='shopping', key='milk', value='1')
    >>> parse("GET shopping\\r\\n")
    Traceback (most recent call last):
    ...
    kv.command.UnknownCommand: not a command: 'GET shopping\\r\\n'

The protocol (``mix_otp_spec.md``, "TCP protocol (exact)"): one command per
line; words are split on any run of whitespace (so ``\\r``, tabs and repeated
spaces do not matter); verbs are upper case:

=========================  ========================================================
request                    reply
=========================  ========================================================
``CREATE <bucket>``        ``OK\\r\\n`` (an existing bucket is kept)
``PUT <bucket> <k> <v>``   ``OK\\r\\n``
``GET <bucket> <k>``       ``<value>\\r\\nOK\\r\\n``; a missing key: ``\\r\\nOK\\r\\n``
``DELETE <bucket> <k>``    ``OK\\r\\n`` (present or not)
anything else              ``UNKNOWN COMMAND\\r\\n``
=========================  ========================================================

A request on a bucket that does not exist gets ``NOT FOUND\\r\\n``. Bucket names,
keys and values are any words: a line from the network is decoded as UTF-8 with
``surrogateescape``, so bytes that are not UTF-8 are kept as they came and a
value comes back byte for byte.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import runtime

from . import bucket, registry

__all__ = [
    "Command", "Create", "Delete", "ERROR", "Get", "NOT_FOUND", "OK", "Put", "REGISTRY",
    "UNKNOWN_COMMAND", "UnknownCommand", "decode", "encode", "op", "parse", "reply", "run",
]

REGISTRY = "kv.registry"

OK = b"OK\r\n"
NOT_FOUND = b"NOT FOUND\r\n"
UNKNOWN_COMMAND = b"UNKNOWN COMMAND\r\n"
ERROR = b"ERROR\r\n"


class Create(NamedTuple):
    """``CREATE <bucket>``"""

    bucket: str


class Get(NamedTuple):
    """``GET <bucket> <key>``"""

    bucket: str
    key: str


class Put(NamedTuple):
    """``PUT <bucket> <key> <value>``"""

    bucket: str
    key: str
    value: str


class Delete(NamedTuple):
    """``DELETE <bucket> <key>``"""

    bucket: str
    key: str


Command = Create | Get | Put | Delete


class UnknownCommand(ValueError):
    """The line is not a command: unknown or lower-case verb, wrong number of words,
    an empty or blank line. The server answers ``UNKNOWN COMMAND\\r\\n``."""


def decode(line: bytes) -> str:
    """A line from the network as text: UTF-8, with bytes that are not UTF-8 kept as
    lone surrogates (``surrogateescape``), so that :func:`encode` gives them back."""
    return line.decode("utf-8", "surrogateescape")


def encode(text: str) -> bytes:
    """The inverse of :func:`decode`."""
    return text.encode("utf-8", "surrogateescape")


def parse(line: str | bytes) -> Command:
    """The command on ``line`` (its line ending, if any, is whitespace like any other).

    Pure: runs in the caller, blocks on nothing.

    Raises:
        UnknownCommand: the line is not one of the four commands.
    """
    words = (decode(line) if isinstance(line, bytes) else line).split()
    n = len(words)
    if n == 3:
        verb = words[0]
        if verb == "GET":
            return Get(words[1], words[2])
        if verb == "DELETE":
            return Delete(words[1], words[2])
    elif n == 4:
        if words[0] == "PUT":
            return Put(words[1], words[2], words[3])
    elif n == 2:
        if words[0] == "CREATE":
            return Create(words[1])
    raise UnknownCommand(f"not a command: {line!r}")


def op(command: Get | Put | Delete) -> tuple[str, ...]:
    """The bucket operation (see ``kv.bucket.run``) that carries out ``command``."""
    cls = command.__class__
    if cls is Get:
        return ("get", command.key)
    if cls is Put:
        return ("put", command.key, command.value)  # type: ignore[union-attr]
    return ("delete", command.key)


def reply(command: Get | Put | Delete, result: Any) -> bytes:
    """The reply to ``command``, given what its bucket operation returned: a GET's
    value (None for a missing key; a value stored from Python that is not a str is
    written as ``str(value)``), ``OK`` for the others."""
    if command.__class__ is not Get:
        return OK
    if result is None:
        return b"\r\nOK\r\n"
    if result.__class__ is not str:
        result = str(result)
    return encode(result) + b"\r\nOK\r\n"


def run(command: Command, registry_name: Any = REGISTRY) -> bytes:
    """Carry out ``command`` against the registry ``registry_name`` and return the
    reply bytes (the guide's ``KVServer.Command.run``).

    Runs in the caller; blocks on the registry's call (and a new bucket's start
    for a CREATE) and the bucket's, 5 s each at most. A bucket that is missing, or
    that died before the request reached it, is ``NOT FOUND``.

    Raises:
        runtime.NoProcError: the registry is not running.
        runtime.ExitError: the bucket died while it held the request.
        runtime.CallTimeout: the registry or the bucket did not answer in time.
    """
    if command.__class__ is Create:
        registry.create(registry_name, command.bucket)
        return OK
    pid = registry.lookup(registry_name, command.bucket)
    if pid is None:
        return NOT_FOUND
    data: Get | Put | Delete = command  # type: ignore[assignment]
    try:
        results = bucket.run(pid, (op(data),))
    except runtime.NoProcError:
        return NOT_FOUND
    return reply(data, results[0])
