"""An asyncio TCP service that keeps each user's state in a kv bucket (an OS process).

    python examples/aio_service.py [port]       # 0 (the default) picks a free port

It prints the port it listens on, then serves lines (one reply line each):

    SET <user> <key> <value>   -> OK
    GET <user> <key>           -> the value, or an empty line
    WHO <user>                 -> the OS pid of the user's bucket (to crash it)

A user's bucket is found through the kv registry and kept; if it dies (crashed,
killed), the next request creates a new, empty one: the service carries on. It
awaits the runtime on its event loop (``runtime.acall`` underneath), with no
thread per request. Ctrl-C or SIGTERM stops it, with every process.
"""

from __future__ import annotations

import asyncio
import signal
import sys

import kv
import runtime
from kv import bucket, registry

REGISTRY = "kv.registry"


async def bucket_of(user: str) -> runtime.Pid:
    found = await registry.alookup(REGISTRY, user)
    return found if found is not None else await registry.acreate(REGISTRY, user)


async def answer(words: list[str]) -> str:
    if len(words) == 4 and words[0] == "SET":
        for attempt in range(2):  # a bucket that died between lookup and use: once more
            try:
                await bucket.aput(await bucket_of(words[1]), words[2], words[3])
                return "OK"
            except (runtime.NoProcError, runtime.ExitError):
                if attempt:
                    raise
    if len(words) == 3 and words[0] == "GET":
        try:
            value = await bucket.aget(await bucket_of(words[1]), words[2])
        except (runtime.NoProcError, runtime.ExitError):
            value = None  # it died: the user's state went with it
        return "" if value is None else str(value)
    if len(words) == 2 and words[0] == "WHO":
        return str((await bucket_of(words[1])).os_pid)
    return "ERROR"


CLIENTS: set[asyncio.StreamWriter] = set()


async def serve_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    CLIENTS.add(writer)
    try:
        while line := await reader.readline():
            reply = await answer(line.decode("utf-8", "replace").split())
            writer.write(reply.encode() + b"\n")
            await writer.drain()
    except (ConnectionError, runtime.ProcessError):
        pass
    finally:
        CLIENTS.discard(writer)
        writer.close()


async def main(port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signo in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signo, stop.set)
    server = await asyncio.start_server(serve_client, "127.0.0.1", port)
    print(server.sockets[0].getsockname()[1], flush=True)
    await stop.wait()
    server.close()
    for writer in list(CLIENTS):  # their handlers see the end of input and return
        writer.transport.abort()
    await server.wait_closed()


if __name__ == "__main__":
    kv.start()
    try:
        asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 0))
    finally:
        kv.stop()
        runtime.shutdown()
