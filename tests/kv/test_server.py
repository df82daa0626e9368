"""kv.server: the guide's server interaction, pipelining, lines, and every shortfall of
the guide's own server that issue 12 lists, over real sockets on 127.0.0.1."""

from __future__ import annotations

import os
import pickle
import signal
import socket
import struct
import threading

import pytest

import kv
import runtime
from kv import registry
from kv.server import ACCEPTOR, SUPERVISOR, TASKS
from runtime import Agent, DynamicSupervisor, Supervisor
from runtime.testing import wait_down, wait_until

from ._client import Client


@pytest.fixture
def start_server(app):
    """Start the server with the given options on a free port; stopped after the test."""

    def start(**options):
        _, port = kv.server.start("127.0.0.1", 0, **options)
        return port

    yield start
    if runtime.whereis(SUPERVISOR) is not None:
        kv.server.stop()


@pytest.fixture
def port(start_server):
    return start_server()


def active_connections():
    return DynamicSupervisor.count_children(TASKS)["active"]


def connection_pids():
    return [c.pid for c in DynamicSupervisor.which_children(TASKS)]


def bucket_of(name):
    return registry.lookup("kv.registry", name)


def talk(client, *exchanges):
    """Send each request on ``client`` and check its reply."""
    for request, expected in exchanges:
        assert client.request(request) == expected, request


def assert_still_served(client):
    """``client``, which created bucket "other", is served as before."""
    talk(client, (b"PUT other k 1\r\n", b"OK\r\n"), (b"GET other k\r\n", b"1\r\nOK\r\n"))


# ------------------------------------------------------------------ the guide


def test_server_interaction(port):
    """The guide's test/kv_server_test.exs, byte for byte."""
    with Client(port) as c:
        assert c.request(b"UNKNOWN shopping\r\n") == b"UNKNOWN COMMAND\r\n"
        assert c.request(b"GET shopping eggs\r\n") == b"NOT FOUND\r\n"
        assert c.request(b"CREATE shopping\r\n") == b"OK\r\n"
        assert c.request(b"PUT shopping eggs 3\r\n") == b"OK\r\n"
        c.send(b"GET shopping eggs\r\n")
        assert c.line() == b"3"
        assert c.line() == b"OK"
        assert c.request(b"DELETE shopping eggs\r\n") == b"OK\r\n"
        c.send(b"GET shopping eggs\r\n")
        assert c.line() == b""
        assert c.line() == b"OK"


def test_the_tree_is_the_guides_kvserver_supervisor(port):
    children = Supervisor.which_children(SUPERVISOR)
    assert [(c.id, c.type) for c in children] == [(TASKS, "supervisor"), (ACCEPTOR, "worker")]
    assert runtime.whereis(ACCEPTOR) == children[1].pid


def test_starting_twice_raises(port):
    with pytest.raises(runtime.AlreadyRegisteredError):
        kv.server.start("127.0.0.1", 0)


def test_a_port_in_use_is_an_oserror_that_says_so(app):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        with pytest.raises(OSError, match="cannot listen on 127.0.0.1"):
            kv.server.start("127.0.0.1", taken.getsockname()[1])
    assert runtime.whereis(SUPERVISOR) is None


# ------------------------------------------------------------------ lines and pipelining


def test_pipelined_requests_are_answered_in_order(port):
    lines = [b"CREATE a", b"CREATE b", b"PUT a k 1", b"PUT b k 2", b"GET a k", b"bogus",
             b"GET b k", b"GET c k", b"DELETE a k", b"GET a k", b"PUT b k 3", b"GET b k"]
    lines = lines * 20
    with Client(port) as c:
        c.send(b"".join(line + b"\r\n" for line in lines))
        replies = [c.reply(line.split()[0]) for line in lines]
    expected = [b"OK\r\n", b"OK\r\n", b"OK\r\n", b"OK\r\n", b"1\r\nOK\r\n",
                b"UNKNOWN COMMAND\r\n", b"2\r\nOK\r\n", b"NOT FOUND\r\n", b"OK\r\n",
                b"\r\nOK\r\n", b"OK\r\n", b"3\r\nOK\r\n"]
    assert replies == expected * 20


def test_a_partial_line_is_answered_once_it_ends(port):
    with Client(port) as c:
        c.send(b"CREATE shopping\r\nPUT shopping eg")
        assert c.line() == b"OK"
        c.sock.settimeout(0.2)  # (a bounded wait for a reply that must not come)
        with pytest.raises(socket.timeout):
            c.line()
        c.sock.settimeout(10)
        c.send(b"gs 3\r")
        c.send(b"\nGET shopping eggs")
        assert c.line() == b"OK"
        c.send(b"\n")
        assert c.reply(b"GET") == b"3\r\nOK\r\n"


def test_a_line_longer_than_a_segment_is_one_line(port):
    value = b"v" * 60_000
    with Client(port) as c:
        assert c.request(b"CREATE shopping\r\n") == b"OK\r\n"
        assert c.request(b"PUT shopping big " + value + b"\r\n") == b"OK\r\n"
        assert c.request(b"GET shopping big\r\n") == value + b"\r\nOK\r\n"
        assert c.request(b"GET shopping eggs\r\n") == b"\r\nOK\r\n"  # nothing else stored


def test_a_line_of_exactly_max_line_bytes_is_served(start_server):
    port = start_server(max_line=100)
    with Client(port) as c:
        assert c.request(b"CREATE s\r\n") == b"OK\r\n"
        line = b"PUT s k " + b"v" * (100 - 9) + b"\r"  # 100 bytes before the \n
        assert c.request(line + b"\n") == b"OK\r\n"
        assert c.request(b"GET s k\r\n") == b"v" * 91 + b"\r\nOK\r\n"


def test_a_line_over_max_line_gets_error_and_the_connection_closes(port):
    with Client(port) as c:
        c.send(b"CREATE s\r\nPUT s k v\r\n" + b"PUT s k " + b"x" * 70_000 + b"\r\nGET s k\r\n")
        assert c.read_to_eof() == b"OK\r\nOK\r\nERROR\r\n"
    with Client(port) as c:
        assert c.request(b"GET s k\r\n") == b"v\r\nOK\r\n"  # the long value was not stored


def test_an_endless_line_gets_error_and_a_close_not_more_memory(start_server):
    port = start_server(max_line=1000)
    with Client(port) as c:
        sent = 0
        chunk = b"x" * 65536
        with pytest.raises(OSError):  # the server closed: our writes fail
            while sent < 64 * 2**20:  # (bounded: the server must close long before)
                c.sock.sendall(chunk)
                sent += len(chunk)
        assert sent < 16 * 2**20
    wait_until(lambda: active_connections() == 0, what="the connection's process to end")


def test_an_endless_line_is_answered_with_error(start_server):
    port = start_server(max_line=1000)
    with Client(port) as c:
        c.send(b"y" * 1001)
        assert c.read_to_eof() == b"ERROR\r\n"


# ------------------------------------------------------------------ names and bad input


@pytest.mark.parametrize("name", [b"Shopping", b"1abc", "\u00e9t\u00e9".encode(), b"\xff\xfe",
                                  b"a\x00b", b"x" * 3000, b"!@#$%^&*()"])
def test_any_one_word_bucket_name_works(port, name):
    with Client(port) as c:
        assert c.request(b"CREATE " + name + b"\r\n") == b"OK\r\n"
        assert c.request(b"PUT " + name + b" k " + name + b"\r\n") == b"OK\r\n"
        assert c.request(b"GET " + name + b" k\r\n") == name + b"\r\nOK\r\n"


def test_bad_input_gets_a_reply_for_every_line(port):
    junk = [bytes(range(256)).replace(b"\n", b""), b"\x00\x00\x00", b"\xc3\x28 \xa0\xa1",
            b"\r", b"", b"   ", b"PUT", b"get a b", b"CREATE a b c d e"]
    with Client(port) as c:
        c.send(b"\n".join(junk) + b"\n")
        assert [c.line() for _ in junk] == [b"UNKNOWN COMMAND"] * len(junk)
        assert c.request(b"CREATE fine\r\n") == b"OK\r\n"


class _Touch:
    """Unpickling this runs a command (what a server must never do with network data)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_nothing_that_comes_from_the_network_is_unpickled(port, tmp_path):
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(_Touch(marker), protocol=0) + b"\n"
    value = b"".join(pickle.dumps(_Touch(marker)).split())  # (one word)
    lines = payload.count(b"\n")
    with Client(port) as c:
        c.send(payload)
        assert [c.line() for _ in range(lines)] == [b"UNKNOWN COMMAND"] * lines
        assert c.request(b"CREATE s\r\n") == b"OK\r\n"
        assert c.request(b"PUT s k " + value + b"\r\n") == b"OK\r\n"
        assert c.request(b"GET s k\r\n") == value + b"\r\nOK\r\n"
    assert not marker.exists()


def test_half_a_line_then_gone_leaves_nothing_behind(port):
    with Client(port) as c:
        assert c.request(b"CREATE s\r\n") == b"OK\r\n"
        c.send(b"PUT s k")
    wait_until(lambda: active_connections() == 0, what="the connection's process to end")
    with Client(port) as c:
        assert c.request(b"GET s k\r\n") == b"\r\nOK\r\n"


# ------------------------------------------------------------------ failures


def test_a_connection_closed_before_handover_does_not_hurt_the_acceptor(port):
    acceptor = runtime.whereis(ACCEPTOR)
    for i in range(30):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        if i % 2:  # a reset rather than a close
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:  # what crashed the guide's acceptor: a bad name, then gone at once
            sock.sendall(b"CREATE Shopping\r\n")
        sock.close()
    with Client(port) as c:
        assert c.request(b"CREATE fine\r\n") == b"OK\r\n"
    assert runtime.whereis(ACCEPTOR) == acceptor
    wait_until(lambda: active_connections() == 0, what="every connection's process to end")


def test_a_bucket_killed_between_requests_is_not_found_and_others_carry_on(port):
    with Client(port) as a, Client(port) as b:
        assert a.request(b"CREATE doomed\r\n") == b"OK\r\n"
        assert a.request(b"PUT doomed k 1\r\n") == b"OK\r\n"
        assert b.request(b"CREATE other\r\n") == b"OK\r\n"
        doomed = bucket_of("doomed")
        ref = runtime.monitor(doomed)
        os.kill(doomed.os_pid, signal.SIGKILL)
        assert wait_down(ref).reason == "killed"
        talk(a, (b"GET doomed k\r\n", b"NOT FOUND\r\n"), (b"PUT doomed k 2\r\n", b"NOT FOUND\r\n"))
        assert_still_served(b)
        talk(a, (b"CREATE doomed\r\n", b"OK\r\n"), (b"GET doomed k\r\n", b"\r\nOK\r\n"))


def test_a_name_created_again_elsewhere_is_found_by_a_connection_that_knew_the_old_one(port):
    with Client(port) as a, Client(port) as b:
        assert a.request(b"CREATE s\r\n") == b"OK\r\n"
        assert a.request(b"GET s k\r\n") == b"\r\nOK\r\n"  # a knows the bucket now
        old = bucket_of("s")
        ref = runtime.monitor(old)
        Agent.stop(old, "shutdown")
        wait_down(ref)
        talk(b, (b"CREATE s\r\n", b"OK\r\n"), (b"PUT s k new\r\n", b"OK\r\n"))
        assert a.request(b"GET s k\r\n") == b"new\r\nOK\r\n"


def test_a_request_inside_a_dying_bucket_gets_error_and_a_close(port):
    with Client(port) as a, Client(port) as b:
        assert a.request(b"CREATE doomed\r\n") == b"OK\r\n"
        assert b.request(b"CREATE other\r\n") == b"OK\r\n"
        doomed = bucket_of("doomed")
        ref = runtime.monitor(doomed)

        def die_with_the_next_request(state):  # runs inside the bucket
            import os
            import signal

            import runtime

            runtime.receive(timeout=10)  # takes the request the connection sends
            os.kill(os.getpid(), signal.SIGKILL)

        Agent.cast(doomed, die_with_the_next_request)
        a.send(b"GET doomed k\r\n")
        assert a.read_to_eof() == b"ERROR\r\n"
        assert wait_down(ref).reason == "killed"
        assert_still_served(b)


def test_a_killed_connection_process_does_not_affect_others(port):
    acceptor = runtime.whereis(ACCEPTOR)
    with Client(port) as a:
        assert a.request(b"CREATE s\r\n") == b"OK\r\n"
        [victim] = connection_pids()
        with Client(port) as b:
            assert b.request(b"PUT s k 1\r\n") == b"OK\r\n"
            ref = runtime.monitor(victim)
            os.kill(victim.os_pid, signal.SIGKILL)
            assert wait_down(ref).reason == "killed"
            assert a.read_to_eof() == b""
            assert b.request(b"GET s k\r\n") == b"1\r\nOK\r\n"
    assert runtime.whereis(ACCEPTOR) == acceptor


def test_a_killed_acceptor_is_restarted_and_listens_on_the_same_port(port):
    old = runtime.whereis(ACCEPTOR)
    with Client(port) as before:
        assert before.request(b"CREATE s\r\n") == b"OK\r\n"
        ref = runtime.monitor(old)
        runtime.exit(old, "kill")
        assert wait_down(ref).reason == "killed"

        def served():
            try:
                with Client(port) as c:
                    return c.request(b"PUT s k 1\r\n") == b"OK\r\n"
            except ConnectionRefusedError:  # (until the new acceptor listens)
                return False

        wait_until(served, what="a new acceptor on the same port")
        assert runtime.whereis(ACCEPTOR) not in (None, old)
        assert before.request(b"GET s k\r\n") == b"1\r\nOK\r\n"  # an older connection lives on


def test_more_connections_than_max_connections_get_error_and_a_close(start_server):
    port = start_server(max_connections=3)
    clients = [Client(port) for _ in range(3)]
    try:
        for i, c in enumerate(clients):
            assert c.request(b"CREATE b%d\r\n" % i) == b"OK\r\n"
        with Client(port) as extra:
            assert extra.read_to_eof() == b"ERROR\r\n"
        clients.pop().close()

        def served():
            with Client(port) as c:
                try:
                    return c.request(b"GET b0 k\r\n") == b"\r\nOK\r\n"
                except (EOFError, ConnectionResetError):
                    return False

        wait_until(served, what="a free place once a client left")
    finally:
        for c in clients:
            c.close()


def test_hundreds_of_idle_connections_do_not_stop_the_server(port):
    idle = []
    try:
        for _ in range(200):
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        with Client(port) as c:
            assert c.request(b"CREATE busy\r\n") == b"OK\r\n"
            assert c.request(b"PUT busy k 1\r\n") == b"OK\r\n"
        wait_until(lambda: active_connections() == 200, what="200 idle connections served")
    finally:
        for sock in idle:
            sock.close()
    wait_until(lambda: active_connections() == 0, what="every connection's process to end")


def test_a_hundred_concurrent_clients_each_with_its_own_bucket(port):
    results = {}

    def client(i):
        try:
            with Client(port) as c:
                name = b"bucket-%d" % i
                replies = [c.request(b"CREATE " + name + b"\r\n"),
                           c.request(b"PUT " + name + b" k v%d\r\n" % i)]
                c.send(b"GET " + name + b" k\r\nGET " + name + b" missing\r\n")
                replies += [c.reply(b"GET"), c.reply(b"GET")]
                results[i] = replies
        except Exception as exc:  # reported below
            results[i] = exc

    threads = [threading.Thread(target=client, args=(i,)) for i in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    for i in range(100):
        assert results[i] == [b"OK\r\n", b"OK\r\n", b"v%d\r\nOK\r\n" % i, b"\r\nOK\r\n"], i


# ------------------------------------------------------------------ stop


def test_stop_answers_what_was_read_then_closes_and_frees_the_port(app):
    _, port = kv.server.start("127.0.0.1", 0)
    with Client(port) as busy, Client(port) as idle:
        assert busy.request(b"CREATE s\r\n") == b"OK\r\n"
        idle.request(b"GET s k\r\n")
        busy.send(b"".join(b"PUT s k%d %d\r\n" % (i, i) for i in range(200)))
        kv.server.stop()
        assert busy.read_to_eof() == b"OK\r\n" * 200
        assert idle.read_to_eof() == b""
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=10)
    assert runtime.whereis(SUPERVISOR) is None
    assert kv.bucket.get(bucket_of("s"), "k199") == "199"


def test_stop_without_a_server_raises(app):
    with pytest.raises(runtime.NoProcError):
        kv.server.stop()


# ------------------------------------------------------------------ any bytes at all


class Model:
    """What the server must answer, computed with the pure parser and plain dicts."""

    def __init__(self, max_line):
        self.max_line = max_line
        self.buckets = {}

    def replies(self, data):
        """The replies to ``data`` (sent, then the write side closed), and whether the
        server closes the connection with ERROR."""
        *lines, rest = data.split(b"\n")
        out = []
        for line in lines:
            if len(line) > self.max_line:
                return b"".join(out) + b"ERROR\r\n"
            try:
                command = kv.command.parse(line)
            except kv.command.UnknownCommand:
                out.append(b"UNKNOWN COMMAND\r\n")
                continue
            if isinstance(command, kv.command.Create):
                self.buckets.setdefault(command.bucket, {})
                out.append(b"OK\r\n")
                continue
            bucket = self.buckets.get(command.bucket)
            if bucket is None:
                out.append(b"NOT FOUND\r\n")
            elif isinstance(command, kv.command.Get):
                out.append(kv.command.encode(bucket.get(command.key, "")) + b"\r\nOK\r\n")
            elif isinstance(command, kv.command.Put):
                bucket[command.key] = command.value
                out.append(b"OK\r\n")
            else:
                bucket.pop(command.key, None)
                out.append(b"OK\r\n")
        if len(rest) > self.max_line:
            out.append(b"ERROR\r\n")
        return b"".join(out)


def _lines():
    from hypothesis import strategies as st

    names = st.sampled_from([b"a", b"b", b"Shopping", "\u00e9t\u00e9".encode(), b"\xff\x00"])
    keys = st.sampled_from([b"k", b"OK", b"\xc3"])
    values = st.one_of(keys, st.integers(0, 300).map(lambda n: b"v" * n))
    words = st.one_of(names, keys, st.sampled_from([b"CREATE", b"PUT", b"get", b""]))
    separators = st.sampled_from([b" ", b"  ", b"\t", b"\r", b"\x0b"])
    endings = st.sampled_from([b"\n", b"\r\n", b""])
    words_of_a_line = st.one_of(
        st.tuples(st.just(b"CREATE"), names),
        st.tuples(st.just(b"PUT"), names, keys, values),
        st.tuples(st.just(b"GET"), names, keys),
        st.tuples(st.just(b"DELETE"), names, keys),
        st.lists(words, max_size=5),
    )
    line = st.builds(lambda ws, sep, end: sep.join(ws) + end,
                     words_of_a_line, separators, endings)
    return st.lists(st.one_of(line, line, st.binary(max_size=300)), max_size=12).map(b"".join)


def test_any_bytes_get_a_reply_for_each_complete_line_or_a_close(start_server):
    """Property: for any bytes a client sends (then closing its side), the server
    answers exactly as the model says, line by line, or ends with ERROR and a close;
    and it keeps serving another client all along."""
    from hypothesis import HealthCheck, given, settings

    port = start_server(max_line=256)
    model = Model(256)
    with Client(port) as other:
        assert other.request(b"CREATE other\r\n") == b"OK\r\n"

        @settings(max_examples=150, deadline=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(_lines())
        def check(data):
            expected = model.replies(data)
            with Client(port) as c:
                try:
                    c.send(data)
                    c.sock.shutdown(socket.SHUT_WR)
                except OSError:  # (it closed already: an ERROR)
                    pass
                assert c.read_to_eof() == expected
            assert other.request(b"PUT other k v\r\n") == b"OK\r\n"

        check()
