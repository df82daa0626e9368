"""kv.registry: the guide's registry tests, plus the stronger promises of this project."""

from __future__ import annotations

import os
import signal

import pytest

import runtime
from kv import bucket, registry
from runtime import Agent
from runtime.testing import wait_down


@pytest.fixture
def reg(app):
    """A registry of the test's own (as the guide's start_supervised!), sharing the
    app's bucket supervisor."""
    pid = registry.start_link()
    yield pid
    runtime.stop(pid)


def test_spawns_buckets(reg):
    assert registry.lookup(reg, "shopping") is None
    registry.create(reg, "shopping")
    b = registry.lookup(reg, "shopping")
    assert b is not None
    bucket.put(b, "milk", 1)
    assert bucket.get(b, "milk") == 1


def test_create_is_idempotent(reg):
    first = registry.create(reg, "shopping")
    assert registry.create(reg, "shopping") == first
    assert registry.lookup(reg, "shopping") == first


def test_removes_buckets_on_exit(reg):
    b = registry.create(reg, "shopping")
    Agent.stop(b)
    assert registry.lookup(reg, "shopping") is None  # no dummy call needed first


def test_removes_bucket_on_crash(reg):
    b = registry.create(reg, "shopping")
    ref = runtime.monitor(b)
    Agent.stop(b, "shutdown")  # a non-normal reason
    assert wait_down(ref).reason == "shutdown"
    assert registry.lookup(reg, "shopping") is None
    assert runtime.is_alive(reg)


def test_bucket_can_crash_at_any_time(reg):
    b = registry.create(reg, "shopping")
    Agent.stop(b, "shutdown")
    with pytest.raises(runtime.NoProcError):
        bucket.put(b, "milk", 3)


def test_a_sigkilled_buckets_name_vanishes(reg):
    b = registry.create(reg, "shopping")
    ref = runtime.monitor(b)
    os.kill(b.os_pid, signal.SIGKILL)
    assert wait_down(ref).reason == "killed"
    assert registry.lookup(reg, "shopping") is None
    assert registry.create(reg, "shopping") != b  # a fresh bucket under the old name


def test_the_registry_survives_bucket_crashes(reg):
    b = registry.create(reg, "shopping")
    ref = runtime.monitor(b)
    with pytest.raises(runtime.ExitError):
        Agent.get(b, lambda state: 1 / 0)
    wait_down(ref)
    assert runtime.is_alive(reg)
    assert registry.lookup(reg, "shopping") is None
    assert registry.lookup(reg, "other") is None


def test_buckets_are_children_of_the_bucket_supervisor_not_of_the_registry(reg):
    import psutil

    b = registry.create(reg, "shopping")
    sup = runtime.whereis("kv.bucket_supervisor")
    assert b in [c.pid for c in runtime.DynamicSupervisor.which_children(sup)]
    assert b in runtime.info(sup)["links"] and b not in runtime.info(reg)["links"]
    # Forked by the bucket supervisor's zygote (see keep_warm), its child.
    zygote = psutil.Process(b.os_pid).ppid()
    assert zygote in [z.os_pid for z in runtime.info(sup)["zygotes"]]
    assert psutil.Process(zygote).ppid() == sup.os_pid


@pytest.mark.parametrize("name", ["Shopping", "1abc", "été", "with space", "a/b", "", "x" * 3000])
def test_bucket_names_are_arbitrary_strings(reg, name):
    b = registry.create(reg, name)
    assert registry.lookup(reg, name) == b


def test_bucket_names_must_be_strings(reg):
    with pytest.raises(TypeError):
        registry.create(reg, 42)


def test_stray_messages_do_not_crash_the_registry(reg):
    runtime.send(reg, {"unexpected": True})
    assert registry.lookup(reg, "anything") is None


def test_the_registry_is_reachable_by_name_from_any_process(app):
    me = runtime.self()

    def elsewhere(parent):
        b = registry.create("kv.registry", "shopping")
        bucket.put(b, "eggs", 12)
        runtime.send(parent, ("done", b))

    runtime.spawn(elsewhere, me)
    _, b = runtime.receive(timeout=10, match=lambda m: isinstance(m, tuple) and m[0] == "done")
    assert registry.lookup("kv.registry", "shopping") == b
    assert bucket.get(b, "eggs") == 12
