"""Internal: this OS process's node, and what a fork does to it.

A process has at most one node. A fork the runtime makes hands the parent's
node to the child's start (:func:`take_forked_from`), which closes its
descriptors and builds the child's own. A fork the runtime did not make
(``os.fork``, a fork-based ``multiprocessing`` pool) must not keep the node's
descriptors: held open by such a child, the sentinel and the connections of a
runtime process would hide its death from its parent. They are replaced by
``/dev/null``, so the numbers stay taken (an object of the old node that closes
its descriptor late, say at interpreter exit, cannot close a file the child
opened since), and runtime calls are refused in that child.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from .errors import ProcessError

if TYPE_CHECKING:
    from ._node import Node

_node: Node | None = None
_forked_from: Node | None = None
_foreign_fork = False
_forking = False
# Objects of a parent's node, kept alive for good in a child: none of them may close
# a descriptor number the child has reused.
_graveyard: list[Any] = []


def get() -> Node | None:
    """This process's node, if it has one.

    Raises:
        ProcessError: this process was forked outside the runtime from a process
            that had a node.
    """
    if _foreign_fork:
        raise ProcessError(
            "this process was forked outside the runtime (os.fork or multiprocessing); "
            "start runtime processes with runtime.spawn instead")
    return _node


def peek() -> Node | None:
    """This process's node, if it has one, without the check of ``get`` (for signal
    handlers, which must not raise for that)."""
    return _node


def set(node: Node | None) -> None:  # noqa: A001 (the module's own namespace)
    global _node
    _node = node


def fork() -> int:
    """``os.fork()`` for the runtime's own children: the child finds its parent's node
    with :func:`take_forked_from`."""
    global _forking
    _forking = True
    try:
        return os.fork()
    finally:
        _forking = False


def take_forked_from() -> Node | None:
    """In a child the runtime forked: the parent's node (once)."""
    global _forked_from
    node, _forked_from = _forked_from, None
    return node


def bury(obj: Any) -> None:
    """Keep ``obj`` alive for good (see ``_graveyard``)."""
    _graveyard.append(obj)


def _after_fork_in_child() -> None:
    global _node, _forked_from, _foreign_fork
    node = _node
    if node is None:
        return
    _node = None
    if _forking:
        _forked_from = node
        return
    _foreign_fork = True
    bury(node)
    try:
        node.table.mm.close()  # (the node's table is not this process's to write)
    except (BufferError, ValueError):
        pass
    try:
        null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        null = -1
    for fd in [*node.descriptors().numbers(), node.table.fd]:
        if fd != null:
            try:
                if null >= 0:
                    os.dup2(null, fd, inheritable=False)
                else:
                    os.close(fd)
            except OSError:
                pass
    if null >= 0:
        os.close(null)


os.register_at_fork(after_in_child=_after_fork_in_child)
