"""asyncio (runtime.aio): acall, areceive and astop on the event loop's own readiness."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

import runtime
from runtime.testing import assert_receive, wait_down


class Echo(runtime.GenServer):
    def handle_call(self, request, from_, state):
        if request == "crash":
            raise RuntimeError("asked to")
        if isinstance(request, tuple) and request[0] == "slow":
            time.sleep(request[1])  # sleep-ok: a slow callback
        if isinstance(request, tuple) and request[0] == "later":
            return runtime.NoReply(state)  # never answered
        return runtime.Reply(request, state)


@pytest.fixture
def server():
    pid = Echo.start(None)
    yield pid
    if runtime.is_alive(pid):
        ref = runtime.monitor(pid)
        runtime.exit(pid, "kill")
        wait_down(ref)


def test_acall_answers_like_call(server):
    async def main():
        return await runtime.acall(server, ("hello", 1))

    assert asyncio.run(main()) == ("hello", 1)


def test_many_concurrent_acalls_from_one_loop_each_get_their_own_reply(server):
    async def main():
        return await asyncio.gather(*(runtime.acall(server, i) for i in range(300)))

    assert asyncio.run(main()) == list(range(300))


def test_a_server_that_dies_fails_every_pending_acall_at_once(server):
    async def main():
        pending = [asyncio.ensure_future(runtime.acall(server, ("later", i), timeout=30))
                   for i in range(20)]
        await asyncio.sleep(0)  # sleep-ok: let them send
        crash = asyncio.ensure_future(runtime.acall(server, "crash", timeout=30))
        started = time.monotonic()
        results = await asyncio.gather(*pending, crash, return_exceptions=True)
        return results, time.monotonic() - started

    results, took = asyncio.run(main())
    assert all(isinstance(r, runtime.ExitError) for r in results), results
    assert all(isinstance(r.reason, runtime.Crash) for r in results)
    assert took < 10  # not at the 30 s timeout


def test_acall_of_a_dead_server_raises_noproc(server):
    ref = runtime.monitor(server)
    runtime.exit(server, "kill")
    wait_down(ref)

    async def main():
        await runtime.acall(server, "x")

    with pytest.raises(runtime.NoProcError):
        asyncio.run(main())


def test_an_acall_that_times_out_leaves_no_stale_reply_for_the_next(server):
    async def main():
        with pytest.raises(runtime.CallTimeout):
            await runtime.acall(server, ("slow", 0.3), timeout=0.05)
        return await runtime.acall(server, "after")  # the slow reply arrives meanwhile

    assert asyncio.run(main()) == "after"


def test_a_cancelled_acall_leaves_no_stale_reply(server):
    async def main():
        task = asyncio.ensure_future(runtime.acall(server, ("slow", 0.2)))
        await asyncio.sleep(0)  # sleep-ok: the task starts and sends its call
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await runtime.acall(server, "next")

    assert asyncio.run(main()) == "next"


def test_sync_calls_from_other_threads_keep_working_while_the_loop_awaits(server):
    results = []

    def worker():
        for i in range(50):
            results.append(runtime.call(server, ("thread", i)))

    async def main():
        thread = threading.Thread(target=worker)
        thread.start()
        got = await asyncio.gather(*(runtime.acall(server, ("loop", i)) for i in range(50)))
        await asyncio.get_running_loop().run_in_executor(None, thread.join, 10)
        return got

    assert asyncio.run(main()) == [("loop", i) for i in range(50)]
    assert results == [("thread", i) for i in range(50)]


def test_areceive_takes_the_first_matching_message_and_leaves_the_others():
    me = runtime.self()

    async def main():
        runtime.spawn(runtime.send, me, ("other", 1))
        runtime.spawn(runtime.send, me, ("wanted", 2))
        return await runtime.areceive(timeout=10, match=lambda m: m[0] == "wanted")

    assert asyncio.run(main()) == ("wanted", 2)
    assert assert_receive(("other", 1))


def test_areceive_times_out_and_a_cancelled_one_loses_no_message():
    async def main():
        with pytest.raises(runtime.ReceiveTimeout):
            await runtime.areceive(timeout=0.05, match=lambda m: m == "never")
        task = asyncio.ensure_future(runtime.areceive(match=lambda m: m == "kept"))
        await asyncio.sleep(0)  # sleep-ok: it waits
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        runtime.send(runtime.self(), "kept")
        return await runtime.areceive(timeout=5, match=lambda m: m == "kept")

    assert asyncio.run(main()) == "kept"


def test_astop_stops_a_server_and_awaits_its_exit(server):
    async def main():
        await runtime.astop(server, "shutdown")

    asyncio.run(main())
    assert not runtime.is_alive(server)


def test_a_bad_timeout_is_refused_before_anything_is_sent(server):
    async def main():
        await runtime.acall(server, "x", timeout=-1)

    with pytest.raises(ValueError):
        asyncio.run(main())
