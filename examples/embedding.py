"""Embedding the runtime in a service: calls from threads and from an asyncio loop
(the README's "Embedding in a service"). Run: python examples/embedding.py"""

import asyncio
import threading

import runtime


class Counter(runtime.GenServer):
    def init(self, start):
        return start
    def handle_call(self, request, from_, state):
        return runtime.Reply(state + request, state + request)

def from_a_thread(results):
    results.append(runtime.call("counter", 1))      # any thread may call

async def from_the_loop():
    return await runtime.acall("counter", 10)       # no thread per call

if __name__ == "__main__":
    Counter.start_link(0, name="counter")
    results = []
    threads = [threading.Thread(target=from_a_thread, args=(results,)) for _ in range(4)]
    for t in threads:
        t.start()
    print(asyncio.run(from_the_loop()))
    for t in threads:
        t.join()
    print(sorted(results), runtime.info(runtime.whereis("counter"))["status"])
    runtime.shutdown()
