"""Process identifiers and references: small, hashable, picklable values.

A :class:`Pid` names one runtime process for the life of the node. Its identity
is the node's id plus a serial number that the node never hands out twice, so a
recycled OS pid never matches an old ``Pid``. ``os_pid`` is the OS process id;
``slot`` is where the process's entry lives in the node's process table.

A :class:`Ref` is a unique token, as returned by ``monitor``. A :class:`From`
names a pending call (the ``from_`` that ``handle_call`` receives).
"""

from __future__ import annotations

from typing import Any, NamedTuple

__all__ = ["From", "Pid", "Ref"]


class Pid:
    """Identifier of a runtime process. Compare, hash and pickle it freely.

    Users never build one: ``spawn``, ``self``, ``whereis`` and ``start_link`` return them.
    """

    __slots__ = ("node", "serial", "slot", "os_pid", "_hash")

    def __init__(self, node: int, serial: int, slot: int, os_pid: int) -> None:
        self.node = node
        self.serial = serial
        self.slot = slot
        self.os_pid = os_pid
        self._hash = hash((node, serial))

    def __eq__(self, other: object) -> bool:
        return other is self or (
            isinstance(other, Pid) and other.serial == self.serial and other.node == self.node
        )

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        return f"<Pid {self.os_pid}.{self.serial}>"

    def __reduce__(self) -> tuple[Any, ...]:
        return (Pid, (self.node, self.serial, self.slot, self.os_pid))


class Ref:
    """A unique reference (a monitor's ref, for instance)."""

    __slots__ = ("node", "owner", "n", "_hash")

    def __init__(self, node: int, owner: int, n: int) -> None:
        self.node = node
        self.owner = owner
        self.n = n
        self._hash = hash((node, owner, n))

    def __eq__(self, other: object) -> bool:
        return other is self or (
            isinstance(other, Ref)
            and other.n == self.n
            and other.owner == self.owner
            and other.node == self.node
        )

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        return f"<Ref {self.owner}.{self.n}>"

    def __reduce__(self) -> tuple[Any, ...]:
        return (Ref, (self.node, self.owner, self.n))


class From(NamedTuple):
    """A pending call, as ``handle_call`` receives it: answer it with ``reply``.

    The calling process (``caller``) and the call's number in it (``ref``), as OTP's
    ``{Pid, Tag}``."""

    caller: Pid
    ref: int
