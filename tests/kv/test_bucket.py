"""kv.bucket: the guide's bucket tests, and a bucket is a real OS process."""

from __future__ import annotations

import os

import pytest

import runtime
from kv import bucket
from runtime.testing import wait_down


@pytest.fixture
def b():
    pid = bucket.start_link()
    yield pid
    if runtime.is_alive(pid):
        runtime.stop(pid)


def test_stores_values_by_key(b):
    assert bucket.get(b, "milk") is None
    bucket.put(b, "milk", 3)
    assert bucket.get(b, "milk") == 3


def test_delete_returns_the_old_value(b):
    bucket.put(b, "eggs", 12)
    assert bucket.delete(b, "eggs") == 12
    assert bucket.get(b, "eggs") is None
    assert bucket.delete(b, "eggs") is None


def test_are_temporary_workers():
    assert bucket.child_spec()["restart"] == "temporary"
    assert runtime.child_spec.normalize(bucket.child_spec())["restart"] == "temporary"


def test_a_bucket_is_a_separate_os_process(b):
    assert b.os_pid != os.getpid()
    import psutil

    assert psutil.Process(b.os_pid).is_running()


def test_keys_and_values_may_be_any_picklable_values(b):
    bucket.put(b, ("a", 1), {"nested": [1, 2]})
    assert bucket.get(b, ("a", 1)) == {"nested": [1, 2]}


def test_a_put_to_a_stopped_bucket_raises_and_does_not_hang(b):
    ref = runtime.monitor(b)
    runtime.stop(b, "shutdown")
    wait_down(ref)
    with pytest.raises(runtime.NoProcError):
        bucket.put(b, "milk", 3)
    runtime.receive(timeout=5, match=lambda m: isinstance(m, runtime.Exit) and m.pid == b)


def test_the_async_client_reads_and_writes_like_the_sync_one(app):
    import asyncio

    from kv import registry

    async def main():
        b = await registry.acreate("kv.registry", "async shopping")
        assert await registry.alookup("kv.registry", "async shopping") == b
        await bucket.aput(b, "milk", 3)
        assert await bucket.aget(b, "milk") == 3
        assert await bucket.adelete(b, "milk") == 3
        return await asyncio.gather(*(bucket.aget(b, k) for k in range(50)))

    assert asyncio.run(main()) == [None] * 50
