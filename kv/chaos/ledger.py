"""A chaos client's ledger: what it wrote to its buckets, and so what a GET may
return. Pure bookkeeping, no I/O."""

from __future__ import annotations

import re

__all__ = ["MISSING", "Ledger", "bucket_names"]

MISSING = ""  # what a GET of a missing key reads: an empty line


def bucket_names(client: int, buckets: int) -> list[str]:
    """The names of the buckets of client number ``client``: ``c<client>.b<j>``."""
    return [f"c{client}.b{j}" for j in range(buckets)]


class Ledger:
    """What one client wrote to its buckets, and what a GET may therefore return.

    Pure bookkeeping, no I/O. The client calls ``sent_*`` before it sends a request,
    and ``ok_*``, ``unsure_*`` (the reply was ``ERROR`` or the connection closed
    first: its effect is unknown) or ``not_found`` after.

    A bucket has a *generation*: the client's count of the incarnations it has
    seen die. ``NOT FOUND`` proves that the bucket it wrote to is gone, so every
    value written before is from a dead incarnation; the client then CREATEs the
    bucket again and writes values of the next generation. A value read back must
    have been written to that bucket and key in the current generation, and be one
    that the writes the server confirmed leave possible (the last confirmed write,
    or any write whose effect is unknown).
    """

    def __init__(self, client: int, buckets: int) -> None:
        self.client = client
        self.names = bucket_names(client, buckets)
        self.generation = dict.fromkeys(self.names, 0)
        self.created = dict.fromkeys(self.names, False)
        self.written: dict[str, dict[str, set[str]]] = {n: {} for n in self.names}
        self.possible: dict[str, dict[str, set[str]]] = {n: {} for n in self.names}
        self.unsure: dict[str, dict[str, set[str]]] = {n: {} for n in self.names}
        self.seq = 0
        self.checked = 0
        self.violations: list[str] = []

    def value(self, name: str, key: str) -> str:
        """A value never written before: ``<bucket>.g<generation>.<key>.<n>``."""
        self.seq += 1
        return f"{name}.g{self.generation[name]}.{key}.{self.seq}"

    def sent_put(self, name: str, key: str, value: str) -> None:
        self.written[name].setdefault(key, set()).add(value)

    def ok_put(self, name: str, key: str, value: str) -> None:
        self.possible[name][key] = {value} | self.unsure[name].get(key, set())

    def ok_delete(self, name: str, key: str) -> None:
        self.possible[name][key] = {MISSING} | self.unsure[name].get(key, set())

    def unsure_put(self, name: str, key: str, value: str) -> None:
        self._unsure(name, key, value)

    def unsure_delete(self, name: str, key: str) -> None:
        self._unsure(name, key, MISSING)

    def _unsure(self, name: str, key: str, value: str) -> None:
        self.unsure[name].setdefault(key, set()).add(value)
        self.possible[name].setdefault(key, {MISSING}).add(value)

    def ok_create(self, name: str) -> None:
        self.created[name] = True

    def not_found(self, name: str) -> None:
        """The bucket is gone: what was written to it is gone with it."""
        self.generation[name] += 1
        self.created[name] = False
        self.written[name].clear()
        self.possible[name].clear()
        self.unsure[name].clear()

    def got(self, name: str, key: str, value: str) -> None:
        """A GET of ``key`` on ``name`` returned ``value`` (MISSING: no such key)."""
        self.checked += 1
        possible = self.possible[name].get(key, {MISSING})
        if value != MISSING and value not in self.written[name].get(key, ()):
            self.violations.append(
                f"GET {name} {key} returned {value!r}: {self._whose(name, key, value)}")
        elif value not in possible:
            shown = sorted(repr(v) for v in possible)
            self.violations.append(
                f"GET {name} {key} returned {value!r}, but the writes the server confirmed "
                f"leave only {', '.join(shown)} possible (a lost write)")
        self.possible[name][key] = {value} | self.unsure[name].get(key, set())

    def _whose(self, name: str, key: str, value: str) -> str:
        found = re.fullmatch(r"(c\d+\.b\d+)\.g(\d+)\.(k\d+)\.(\d+)", value)
        if found is None:
            return "a value no client wrote"
        bucket, generation, vkey, _ = found.groups()
        if bucket != name:
            return f"a value written to another bucket ({bucket})"
        if int(generation) < self.generation[name]:
            return (f"a value written to an earlier incarnation of the bucket (generation "
                    f"{generation}; this one is {self.generation[name]})")
        if vkey != key:
            return f"a value written to another key ({vkey})"
        return "a value this client never wrote there"
