"""``python -m kv chaos``: the kv store and its TCP server under load while faults are
injected, and a check of everything the store promises.

It starts the kv tree and the TCP server (as ``python -m kv serve`` does:
``kv.start()``, then ``kv.server.start``), in this process, which is the runtime's
embedding process. Then, for ``seconds``:

- **Clients** (threads, raw TCP on 127.0.0.1, one connection each, reconnecting
  whenever the server closes it) PUT, GET and DELETE keys of buckets of their own,
  one request or a pipelined batch at a time, and keep a :class:`Ledger` of what
  they wrote: every value they read back is checked against it.
- **Faults** are injected one after another at random intervals (the seed fixes
  their kinds, targets and order; see :data:`KINDS`): SIGKILL, an exception raised
  inside a callback, or an exit signal, on buckets, the registry, the bucket
  supervisor, the connection processes, the task supervisor and the acceptor,
  found through the public API (``runtime.whereis``, ``kv.registry.lookup``,
  ``DynamicSupervisor.which_children``, ``runtime.processes``). After each, the
  time until the name or the port answers again is measured. Faults on the
  children of ``kv.supervisor`` and ``kv.server.supervisor`` are spaced so that
  neither reaches its restart intensity (3 restarts in 5 s): a supervisor that
  gives up would be the schedule's doing, not the store's.
- **Lookups** of the clients' bucket names are made between faults, and each
  result is checked against the buckets whose ``Down`` this process has already
  received.

Violations (each is reported, and makes the exit status 1):

- ``lookup``: the registry returned a bucket whose ``Down`` the caller had received;
- ``value``: a GET returned a value that was not written to that bucket since it
  was created (an older incarnation's, another bucket's, another key's, or one
  never written), or lost a write that the server had confirmed;
- ``protocol``: a reply that the protocol does not allow, or none in time;
- ``availability``: a stretch longer than ``max_gap`` with no request answered;
- ``recovery``: a name or the port that does not answer again in time, an exit
  reason other than the fault's, a bucket that outlives its tree;
- ``leak``: after the run, a process or a zombie left behind, more descriptors in
  a long-lived process or more files in the node's directory than at the start,
  or a supervisor that gave up or could not restart a child (from the log).

The processes' own logs (crash reports) go to ``--log`` (default: a temporary file,
read for restart failures and removed), not to the terminal, so that the progress
line stays readable.

The parts, one module each:

- ``options``: :class:`Options` and HOST;
- ``schedule``: the fault :data:`KINDS`, the seeded ``Schedule``, the ``RestartBudget``;
- ``ledger``: a client's :class:`Ledger` (pure bookkeeping);
- ``clients``: the client threads, their ``Pulse``, the port's ``probe``;
- ``lookups``: the lookup check;
- ``faults``: targets, injection and recovery of each kind of fault;
- ``checks``: the checks at the end (the trees, leaks, after the shutdown, the log);
- ``report``: the ``Report``, its text and its JSON;
- ``progress``: the progress line;
- ``poll``: waiting for what no message tells;
- ``driver``: the run (``Chaos``) and :func:`run`, the entry point.
"""

from __future__ import annotations

from .ledger import MISSING, Ledger
from .options import Options
from .schedule import KINDS

__all__ = ["KINDS", "MISSING", "Ledger", "Options", "run"]


def run(options: Options) -> int:
    """Run the chaos test and print its report: see :func:`kv.chaos.driver.run`. (The
    driver is imported here, not above: ``python -m kv``'s parser lists the fault
    kinds, and needs no more of this package.)"""
    from .driver import run as run_chaos

    return run_chaos(options)
