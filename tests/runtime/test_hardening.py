"""Regression tests for what a user found by using the runtime adversarially, after
the core's second pass was green: each failed before its fix.

A case that wedges the node or the interpreter runs in a subprocess with a bounded
wait.
"""

from __future__ import annotations

import math
import os
import signal
import threading

import pytest

import runtime
from runtime.testing import assert_receive, tagged, wait_down, wait_until

from .test_node import run_script

# ------------------------------------------------------------------ helpers


def _unsent_bytes(pid: runtime.Pid) -> int:
    """(Internal) bytes queued to ``pid`` that the kernel has not taken yet."""
    node = runtime._embed.current()
    with node.poller.lock:
        conn = node.conns.out_to(pid.serial)
        return 0 if conn is None else conn.queued - conn.sent


def _slow_reader(parent, delay):
    """Busy in its own code for ``delay`` s (reads nothing), then reports what came."""
    import time

    time.sleep(delay)  # sleep-ok: a process busy in its own code
    got = []
    while True:
        msg = runtime.receive(timeout=30)
        if msg == "done":
            break
        got.append(msg[0])
    runtime.send(parent, ("got", got))


# --------------------------------------------- a request that times out


def test_info_that_times_out_loses_no_message_queued_before_it():
    """info() with a short timeout to a process that does not read: its INFO frame
    waits behind big messages another thread is sending. It used to close the
    connection at its timeout, losing those messages and leaving the sender blocked."""
    me = runtime.self()
    pid = runtime.spawn(_slow_reader, me, 1.5)
    big = b"x" * (4 << 20)  # more than the socket buffers hold
    sent = []

    def sender():
        for i in range(3):
            runtime.send(pid, (i, big))
            sent.append(i)

    thread = threading.Thread(target=sender)
    thread.start()
    wait_until(lambda: _unsent_bytes(pid) > 0, what="the big message queued")
    info = runtime.info(pid, timeout=0.2)
    assert info["status"] == "running"  # it did not answer: busy in its own code
    thread.join(20)
    assert not thread.is_alive() and sent == [0, 1, 2]
    runtime.send(pid, "done")
    assert assert_receive(tagged("got"), timeout=20)[1] == [0, 1, 2]


def test_a_call_that_times_out_while_its_request_is_queued_loses_nothing():
    me = runtime.self()
    pid = runtime.spawn(_slow_reader, me, 1.0)
    runtime.send(pid, (0, b"x" * (4 << 20)))  # (queued: the reader is busy)
    with pytest.raises(runtime.CallTimeout):
        runtime.call(pid, "anything", timeout=0.05)
    runtime.send(pid, (1, b""))
    runtime.send(pid, "done")
    # (A guard: calls never waited for their write. It sees 0, the call, then 1.)
    got = assert_receive(tagged("got"), timeout=20)[1]
    assert got[0] == 0 and got[-1] == 1


# ------------------------------------------------- messages and unpickling

_interrupts: list[type[BaseException]] = []


class _Interrupting:
    """A message whose unpickling raises what ``_interrupts`` holds, once each."""

    def __init__(self, value):
        self.value = value

    def __setstate__(self, state):
        self.__dict__.update(state)
        if _interrupts:
            raise _interrupts.pop(0)()


def _receiver_interrupted(parent):
    _interrupts.append(KeyboardInterrupt)
    try:
        runtime.receive(timeout=10)
    except KeyboardInterrupt:
        pass
    msg = runtime.receive(timeout=10)  # the same message: it went back
    runtime.send(parent, ("got", msg.value))


def test_ctrl_c_while_a_taken_message_unpickles_puts_it_back():
    pid = runtime.spawn(_receiver_interrupted, runtime.self())
    runtime.send(pid, _Interrupting("kept"))
    assert assert_receive(tagged("got"))[1] == "kept"
    wait_down(runtime.monitor(pid))


def _receiver_exiting(parent):
    _interrupts.append(SystemExit)
    first = runtime.receive(timeout=10)  # the bad one is dropped (and logged)
    runtime.send(parent, ("got", first))


def test_a_message_whose_unpickling_calls_sys_exit_is_dropped_not_obeyed():
    pid = runtime.spawn(_receiver_exiting, runtime.self())
    runtime.send(pid, _Interrupting("bad"))
    runtime.send(pid, "next")
    assert assert_receive(tagged("got"))[1] == "next"
    wait_down(runtime.monitor(pid))


# ---------------------------------------------------------------- timeouts


class _Echo(runtime.GenServer):
    def handle_call(self, request, from_, state):
        return runtime.Reply(request, state)


@pytest.mark.parametrize("forever", [math.inf, 1e10, 30 * 86400.0])
def test_huge_timeouts_wait_like_none(forever):
    """They used to raise OverflowError from epoll, after the call was sent."""
    pid = _Echo.start_link(None, timeout=forever)
    try:
        assert runtime.call(pid, "hi", timeout=forever) == "hi"
        runtime.send(runtime.self(), "there")
        assert runtime.receive(timeout=forever) == "there"
    finally:
        runtime.stop(pid, timeout=forever)


def test_shutdown_with_an_infinite_timeout():
    proc = run_script("""
        import math, runtime
        runtime.spawn(print, "x")
        runtime.shutdown(math.inf)
        runtime.shutdown(30 * 86400.0)
        print("done")
    """)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.endswith("done\n")


def test_nan_timeout_is_a_value_error_naming_it():
    with pytest.raises(ValueError, match="timeout"):
        runtime.receive(timeout=math.nan)


# ------------------------------------------------------------------ asyncio


def test_pending_areceive_and_acall_fail_at_once_when_another_thread_shuts_down():
    proc = run_script("""
        import asyncio, threading, time, runtime

        class Slow(runtime.GenServer):
            def handle_call(self, request, from_, state):
                return runtime.NoReply(state)      # never answers

        async def main():
            pid = Slow.start(None)                 # (not linked: no Exit for us)
            threading.Timer(0.3, runtime.shutdown).start()
            t0 = time.monotonic()
            results = await asyncio.gather(runtime.areceive(timeout=None),
                                           runtime.acall(pid, "x", timeout=30),
                                           return_exceptions=True)
            print([type(r).__name__ for r in results], time.monotonic() - t0)

        asyncio.run(main())
    """)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    # (the server is stopped first, then the node closes; the shutdown itself takes
    # a moment: "at once" is well before the acall's 30 s and the call's 5 + 10 s)
    names, elapsed = out.rsplit("]", 1)
    assert names + "]" == "['ProcessError', 'ExitError']", (out, err)
    assert float(elapsed) < 5.0, (out, err)


# ------------------------------------------------------------- a dead root


def test_spawn_after_the_root_died_says_so_and_shutdown_recovers():
    proc = run_script("""
        import os, signal, runtime, runtime.testing
        runtime.spawn(len, "warm")
        root = runtime.testing.root()
        ref = runtime.monitor(root)
        os.kill(root.os_pid, signal.SIGKILL)
        runtime.receive(timeout=10, match=lambda m: isinstance(m, runtime.Down) and m.ref == ref)
        try:
            runtime.spawn(len, "x")
        except runtime.ProcessError as e:
            print(type(e).__name__, "|", e)
        runtime.shutdown()
        pid = runtime.spawn(len, "again")
        print("new node", runtime.is_alive(pid) in (True, False))
        runtime.shutdown()
    """)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "ProcessError | the node's root process has died" in out, out
    assert "call runtime.shutdown()" in out
    assert "new node True" in out


# ------------------------------------------------------------------- names


def _sleep_until_told():
    runtime.receive(timeout=30)


def test_a_long_name_is_listed_whole():
    name = "n" * 1500 + "é"
    pid = runtime.spawn(_sleep_until_told)
    runtime.register(name, pid)
    try:
        assert runtime.whereis(name) == pid
        assert name in runtime.testing.registered_names()
    finally:
        runtime.unregister(name)
        runtime.send(pid, "go")
        wait_down(runtime.monitor(pid))


@pytest.mark.parametrize("bad, error", [("", ValueError), (3, TypeError)])
def test_an_empty_or_non_str_name_is_rejected(bad, error):
    with pytest.raises(error, match="registered name"):
        _Echo.start_link(None, name=bad)
    with pytest.raises(error, match="registered name"):
        runtime.register(bad, runtime.self())
    with pytest.raises(error, match="registered name"):
        runtime.whereis(bad)


# ------------------------------------------------------------- foreign fork


def test_a_foreign_fork_keeps_none_of_the_nodes_files_open():
    runtime.self()
    table = runtime._embed.current().table.path
    node_dir = os.path.dirname(table)
    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover (the child)
        try:
            held = []
            for fd in os.listdir("/proc/self/fd"):
                try:
                    target = os.readlink(f"/proc/self/fd/{fd}")
                except OSError:
                    continue
                if target.startswith(node_dir):
                    held.append(target)
            with open("/proc/self/maps") as maps:
                held += [line.split()[-1] for line in maps if node_dir in line]
            os.write(w, repr(held).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as pipe:
        held = pipe.read()
    os.waitpid(child, 0)
    assert held == "[]", held


# ------------------------------------------- an event loop and a blocked thread


def test_a_thread_blocked_in_a_call_is_woken_while_an_event_loop_pumps_the_node():
    """The event loop's pump used to take the wake-up meant for the thread polling
    the node, which then slept on with its reply queued (a shutdown from another
    thread waited 15 s for its own reply, 2 runs in 6 on 3.10)."""
    proc = run_script("""
        import asyncio, threading, time, runtime

        class Echo(runtime.GenServer):
            def handle_call(self, request, from_, state):
                return runtime.Reply(request, state)

        def caller(pid, out):
            t0 = time.monotonic()
            try:
                for i in range(300):
                    assert runtime.call(pid, i, timeout=3) == i
                # (about 1 s here; 38 s and more when the thread slept on)
                out.append("ok" if time.monotonic() - t0 < 20 else "slow")
            except Exception as e:
                out.append(repr(e))
            runtime.send(runtime.self(), "caller done")

        async def main():
            pid = Echo.start_link(None)
            out = []
            thread = threading.Thread(target=caller, args=(pid, out))
            thread.start()
            await runtime.areceive(timeout=60, match=lambda m: m == "caller done")
            thread.join()
            print(out)

        asyncio.run(main())
    """)
    out, err = proc.communicate(timeout=120)
    assert out.strip() == "['ok']", (out, err)


# -------------------------------------- what a process held, once its exit is out


def _deaf():
    """A child that does not stop when told (every signal blocked): its parent's exit
    waits for it a while."""
    import signal
    import time

    signal.pthread_sigmask(signal.SIG_BLOCK, set(signal.Signals) - {signal.SIGKILL,
                                                                   signal.SIGSTOP})
    time.sleep(30)  # sleep-ok: a process that ignores its parent's exit


def _holds_a_port(parent, how="crash", fillers=()):
    import contextlib
    import os
    import socket

    for fd in fillers:  # (see _open_fillers; inherited under fork only)
        with contextlib.suppress(OSError):
            os.close(fd)
    if how != "SIGKILL":
        runtime.spawn(_deaf)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    for _ in fillers:
        os.open(os.devnull, os.O_RDONLY)
    runtime.send(parent, ("port", sock.getsockname()[1]))
    if runtime.receive(timeout=30) == "crash":
        raise RuntimeError("crashed holding a port")


def _open_fillers():
    """Files that take the low descriptor numbers, so that the sentinel made for the
    next child gets a high one. The child closes them, listens (a low number), and
    opens as many again (below the sentinel's): the kernel, ending the child, lets
    its files go from the highest number down, the sentinel's thousands of files
    before the port's."""
    import resource

    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return [os.open(os.devnull, os.O_RDONLY) for _ in range(max(0, min(limit, 1 << 16) - 400))]


def _restarts_a_port_holder(parent, how):
    """A supervisor's part: a linked child holds a port; end it, and on its Exit bind
    the port again (as a supervisor restarting an acceptor does); report how it went."""
    import socket

    runtime.trap_exit(True)
    results = []
    for _ in range(3):
        fillers = _open_fillers() if how == "SIGKILL" else []
        pid = runtime.spawn(_holds_a_port, runtime.self(), how, fillers, link=True)
        for fd in fillers:
            os.close(fd)
        port = runtime.receive(timeout=10, match=lambda m: m[0] == "port")[1]
        if how == "exit signal":
            runtime.exit(pid, "chaos")
        elif how == "SIGKILL":
            os.kill(pid.os_pid, signal.SIGKILL)
        else:
            runtime.send(pid, "crash")
        runtime.receive(timeout=10, match=lambda m, pid=pid: isinstance(m, runtime.Exit)
                        and m.pid == pid)
        again = socket.socket()
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            again.bind(("127.0.0.1", port))
            again.listen()
            results.append("bound")
        except OSError as exc:
            results.append(repr(exc))
        finally:
            again.close()
    runtime.send(parent, ("results", results))


@pytest.mark.parametrize("how", ["exit signal", "crash", "SIGKILL"])
def test_a_process_s_port_is_free_when_its_exit_reaches_its_link(how):
    """A supervisor restarting an acceptor on its Exit found the port still bound
    (EADDRINUSE): the exit was passed on before the process let its sockets go (here
    its exit waits a second for a child that does not stop). SIGKILLed, the process's
    parent passed its exit on as soon as the kernel closed its first descriptors (the
    sentinel), while the kernel was still closing the rest (here thousands, the
    port's last): a chaos run's restarted acceptor found its port taken."""
    pid = runtime.spawn(_restarts_a_port_holder, runtime.self(), how)
    ref = runtime.monitor(pid)
    assert assert_receive(tagged("results"), timeout=30)[1] == ["bound"] * 3
    wait_down(ref)


def test_a_call_timeout_s_message_shows_a_big_request_cut():
    err = runtime.CallTimeout(runtime.self(), ("put", b"x" * 1_000_000, "y" * 100_000), 1.0)
    assert len(str(err)) < 1000 and "'put'" in str(err)
    assert err.request[1] == b"x" * 1_000_000  # (the request itself is kept whole)


def test_is_alive_sees_an_exit_published_and_reaped_between_its_two_reads(monkeypatch):
    # is_alive of a process nobody here watches reads its table slot, then /proc. Its
    # parent publishes its exit, then reaps it: both can happen between those reads,
    # and /proc then has nothing. It was "alive" (the chaos run saw a name held by a
    # killed acceptor refuse the new one); a second read of the slot settles it.
    from runtime import _table

    node = runtime._embed.current()
    pid = runtime.spawn(len, "")  # exits at once; the root publishes its exit, reaps it
    wait_until(lambda: not os.path.exists(f"/proc/{pid.os_pid}")
               and node.table.state(pid.serial, pid.slot) == _table.EXITED,
               what="the process published and reaped")
    real, reads = node.table.state, []

    def stale_first(serial, slot):
        reads.append(serial)
        return _table.ALIVE if len(reads) == 1 else real(serial, slot)

    monkeypatch.setattr(node.table, "state", stale_first)
    assert not runtime.is_alive(pid)
    assert len(reads) == 2


# ------------------------------- threads waiting for their own call's reply


class _Holder(runtime.GenServer):
    """Answers a call only once told to (a cast "go")."""

    def init(self, arg):
        return None

    def handle_call(self, request, from_, state):
        return runtime.NoReply(from_)

    def handle_cast(self, request, state):
        if state is not None:
            runtime.reply(state, "done")
        return runtime.NoReply(None)


def test_a_thread_waiting_for_its_reply_polls_once_the_thread_that_polled_leaves(
        monkeypatch):
    """A thread waiting for its call's reply while another polls is woken by that reply
    only; so when the polling thread gets its own reply and leaves, it must hand the
    poll over to a waiting thread, or that thread's reply would sit unread until its
    lease runs out (made 60 s here: the test would see it)."""
    from runtime import _poller

    monkeypatch.setattr(_poller, "LEASE", 60.0)
    node = runtime._embed.current()
    first, second = _Holder.start_link(), _Holder.start_link()
    out: dict[str, object] = {}

    def caller(name, pid):
        out[name] = runtime.call(pid, "hold", timeout=30)

    a = threading.Thread(target=caller, args=("first", first))
    a.start()
    wait_until(lambda: node.poller.polling, what="the first caller polling the node")
    b = threading.Thread(target=caller, args=("second", second))
    b.start()
    wait_until(lambda: len(node.poller._keyed) == 1, what="the second caller waiting")
    runtime.cast(first, "go")  # the polling thread's reply: it leaves
    a.join(timeout=30)
    runtime.cast(second, "go")
    b.join(timeout=20)
    assert not a.is_alive() and not b.is_alive(), out
    assert out == {"first": "done", "second": "done"}
    runtime.stop(first)
    runtime.stop(second)


def test_calls_from_many_threads_with_a_receiving_thread_all_get_their_own_reply():
    """Threads waiting for calls (each woken by its reply only) beside a thread waiting
    for any message, on one node: every reply reaches its caller, every message the
    receiver."""
    servers = [_Echo.start_link() for _ in range(4)]
    me = runtime.self()
    errors: list[BaseException] = []

    def caller(k):
        try:
            for i in range(200):
                assert runtime.call(servers[k % 4], (k, i), timeout=20) == (k, i)
        except BaseException as exc:
            errors.append(exc)

    got: list[int] = []

    def receiver():
        try:
            for _ in range(100):
                got.append(runtime.receive(timeout=20, match=tagged("n"))[1])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(6)]
    threads.append(threading.Thread(target=receiver))
    for t in threads:
        t.start()
    for i in range(100):
        runtime.spawn(_send_back, me, ("n", i))
    for t in threads:
        t.join(timeout=60)
    assert not errors and not any(t.is_alive() for t in threads), errors
    assert sorted(got) == list(range(100))
    for s in servers:
        runtime.stop(s)


def _send_back(to, msg):
    runtime.send(to, msg)


class _Slow(runtime.GenServer):
    def handle_call(self, request, from_, state):
        import time

        time.sleep(request)  # sleep-ok: a server busy in its own code
        return runtime.Reply("done", state)


def test_a_thread_long_in_receive_still_polls_after_another_thread_s_long_call(monkeypatch):
    """A thread in a long receive polls the node; another thread's call outlasting two
    leases kicked it, and a lease later took the poll over as if it had vanished,
    though it had come back and polled again; once that call returned, no thread was
    the leader while the first one still polled, and a message for it woke no one
    (found by a review: it never got its message)."""
    from runtime import _poller

    monkeypatch.setattr(_poller, "LEASE", 0.1)
    node = runtime._embed.current()
    slow = _Slow.start_link()
    got: list[object] = []

    def receiver():
        got.append(runtime.receive(timeout=30, match=lambda m: m == "hello"))

    thread = threading.Thread(target=receiver)
    thread.start()
    wait_until(lambda: node.poller.polling, what="the receiving thread polling")
    assert runtime.call(slow, 0.6, timeout=10) == "done"  # six leases
    runtime.send(runtime.self(), "hello")
    thread.join(timeout=20)
    assert got == ["hello"]
    runtime.stop(slow)
