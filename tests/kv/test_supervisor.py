"""kv.start: the one_for_all tree of the guide."""

from __future__ import annotations

import pytest

import kv
import runtime
from kv import bucket, registry
from runtime import Supervisor
from runtime.testing import assert_receive, wait_down, wait_until


def test_the_tree_has_the_bucket_supervisor_then_the_registry(app):
    children = Supervisor.which_children("kv.supervisor")
    assert [c.id for c in children] == ["kv.bucket_supervisor", "kv.registry"]
    assert [c.type for c in children] == ["supervisor", "worker"]
    assert runtime.whereis("kv.registry") == children[1].pid


def test_killing_the_registry_restarts_the_whole_tree_empty(app):
    old_registry = runtime.whereis("kv.registry")
    old_bucket_sup = runtime.whereis("kv.bucket_supervisor")
    b = registry.create("kv.registry", "shopping")
    refs = [runtime.monitor(p) for p in (old_registry, old_bucket_sup, b)]
    runtime.exit(old_registry, "kill")
    assert [wait_down(r).reason for r in refs] == ["killed", "shutdown", "shutdown"]
    new_registry = wait_until(lambda: (p := runtime.whereis("kv.registry")) not in
                              (None, old_registry) and p, what="a new registry")
    assert registry.lookup("kv.registry", "shopping") is None
    assert runtime.whereis("kv.bucket_supervisor") not in (None, old_bucket_sup)
    new_b = registry.create("kv.registry", "shopping")
    bucket.put(new_b, "milk", 1)
    assert bucket.get(new_b, "milk") == 1
    assert new_registry == runtime.whereis("kv.registry")


def test_stop_stops_every_process_of_the_tree(app):
    buckets = [registry.create("kv.registry", f"b{i}") for i in range(3)]
    refs = [runtime.monitor(p) for p in buckets]
    kv.stop()
    assert {wait_down(r).reason for r in refs} == {"shutdown"}
    assert runtime.whereis("kv.registry") is None
    assert_receive(lambda m: isinstance(m, runtime.Exit) and m.pid == app)


def test_starting_twice_raises(app):
    with pytest.raises(runtime.AlreadyRegisteredError):
        kv.start()
