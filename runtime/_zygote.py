"""Internal: a zygote, the process that forks a runtime process's children for it.

A runtime process that keeps its children warm with a zygote (``keep_warm(True,
zygote=True)``, see ``_warm``) starts one as a fresh interpreter (the spawn
start method), its own child, and its spawns are forked by the zygote instead
(a fork server: see ``_forkserver``): a zygote's fork costs what a small
process's costs, however large its keeper and its keeper's children grow.

The children a zygote forks are its children: it reaps them, they die with it
(the kernel's parent-death signal), and its exit stops them, as a process's own
children are. It is its keeper's child and dies with it likewise; when its
keeper exits, it is stopped with the keeper's other children (``"shutdown"``),
after the keeper's links, its children among them, got the keeper's reason.
A zygote runs no user code of its own: it imports the modules of its keeper's
targets (those the keeper names as it starts it, and those its children name
once they have unpickled their targets), which its children then share instead
of importing them each.

A retired zygote (``("$retire",)`` from its keeper, which started a successor or
stopped keeping children warm) kills those it started ahead that its keeper has
not taken (see ``Table.claim_ahead``), starts no more, and exits once all it
forked are gone.
"""

from __future__ import annotations

from . import _current
from ._forkserver import ForkServer
from .pid import Pid


def main(keeper: Pid, warm_children: int, imports: tuple[str, ...] = ()) -> None:
    """The zygote's process function: serve ``keeper`` until retired and childless.
    ``imports``: the modules of the keeper's targets so far, imported here first
    (see ``_forkserver``: the zygote imports them for its children)."""
    # The runtime's own dependency, imported once here rather than in every child:
    # a target from the keeper is unpickled with it.
    import cloudpickle  # noqa: F401

    node = _current.get()
    assert node is not None
    learn = node.info.warm_imports  # (configure(warm_imports=False): none)
    server = ForkServer(node, keeper, warm_children, warm_imports=learn, count_children=True,
                        import_here=learn)
    server.import_modules(imports)
    retired = False
    while not (retired and not server.children):
        msg = server.next_message(None)
        if msg is None:
            continue
        if server.handle(msg):
            continue
        if msg == ("$retire",):
            retired = True
            server.stop_warming()
            server.stop_waiting()
