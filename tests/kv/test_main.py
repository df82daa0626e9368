"""python -m kv serve, and kv.serve in an embedding script: start, serve, and stop on
SIGINT or SIGTERM with status 0 and nothing left behind."""

from __future__ import annotations

import glob
import os
import re
import signal
import socket
import subprocess
import sys

import psutil
import pytest

from runtime.testing import wait_until

from ._client import Client

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT = 30.0


class Served:
    """A server process we started, in a process group of its own."""

    def __init__(self, argv, env=None):
        self.proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True,
                                     env=env, start_new_session=True)
        line = self.proc.stdout.readline()
        found = re.search(r"accepting connections on 127\.0\.0\.1:(\d+)", line)
        if not found:
            self.proc.kill()
            raise AssertionError(f"not serving: {line!r} {self.proc.stderr.read()}")
        self.port = int(found.group(1))
        self.family = self.descendants()

    def descendants(self):
        return psutil.Process(self.proc.pid).children(recursive=True)

    def wait(self):
        """Its exit status; its output after the first line goes to ``out``, ``err``."""
        self.out, self.err = self.proc.communicate(timeout=TIMEOUT)
        return self.proc.returncode

    def assert_nothing_left(self):
        for p in self.family:
            wait_until(lambda p=p: not _running(p), what=f"process {p.pid} to end")
        for pid in [self.proc.pid] + [p.pid for p in self.family]:
            assert not glob.glob(f"/dev/shm/rt-{pid}-*"), "a node directory was left"

    def kill(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.wait()
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.wait()


def _running(proc):
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture
def serve():
    started = []

    def start(*args, env=None):
        served = Served([sys.executable, "-m", "kv", "serve", *args], env=env)
        started.append(served)
        return served

    yield start
    for served in started:
        served.kill()


def conversation(port):
    with Client(port) as c:
        assert c.request(b"CREATE shopping\r\n") == b"OK\r\n"
        assert c.request(b"PUT shopping eggs 3\r\n") == b"OK\r\n"
        assert c.request(b"GET shopping eggs\r\n") == b"3\r\nOK\r\n"


def test_help_explains_every_option():
    proc = subprocess.run([sys.executable, "-m", "kv", "serve", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0
    for option in ("--host", "--port", "--max-line", "--max-connections", "SIGTERM", "PORT"):
        assert option in proc.stdout


def test_sigterm_to_the_process_group_answers_what_was_read_and_leaves_nothing(serve):
    served = serve("--port", "0")
    conversation(served.port)
    with Client(served.port) as c:
        assert c.request(b"CREATE s\r\n") == b"OK\r\n"
        c.send(b"".join(b"PUT s k%d %d\r\n" % (i, i) for i in range(100)))
        os.killpg(served.proc.pid, signal.SIGTERM)
        assert c.read_to_eof() == b"OK\r\n" * 100
    assert served.wait() == 0, served.err
    assert "kv: stopped" in served.out
    served.assert_nothing_left()


def test_sigint_stops_it_too(serve):
    served = serve("--port", "0", "--max-line", "100", "--max-connections", "2")
    with Client(served.port) as c:
        c.send(b"x" * 101 + b"\n")
        assert c.read_to_eof() == b"ERROR\r\n"
    os.kill(served.proc.pid, signal.SIGINT)
    assert served.wait() == 0, served.err
    served.assert_nothing_left()


def test_the_service_stops_when_the_command_is_killed(serve):
    served = serve("--port", "0")
    [service] = psutil.Process(served.proc.pid).children()
    family = service.children(recursive=True)
    os.kill(served.proc.pid, signal.SIGKILL)
    served.wait()
    for p in [service, *family]:
        wait_until(lambda p=p: not _running(p), what=f"process {p.pid} to end")


def test_the_port_comes_from_PORT_in_the_environment(serve):
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    served = serve(env=dict(os.environ, PORT=str(port)))
    assert served.port == port
    conversation(port)


def test_a_port_in_use_is_an_error_and_status_1():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        proc = subprocess.run([sys.executable, "-m", "kv", "serve", "--port",
                               str(taken.getsockname()[1])], cwd=REPO, capture_output=True,
                              text=True, timeout=TIMEOUT)
    assert proc.returncode == 1
    assert "cannot listen on 127.0.0.1" in proc.stderr


EMBEDDED = """
import kv, runtime
kv.serve("127.0.0.1", 0, ready=lambda a: print("accepting connections on %s:%d" % a,
                                                flush=True))
print("returned", runtime.whereis("kv.registry"), flush=True)
runtime.shutdown()
"""


def test_kv_serve_in_an_embedding_script_returns_on_sigterm():
    served = Served([sys.executable, "-c", EMBEDDED])
    try:
        conversation(served.port)
        served.proc.send_signal(signal.SIGTERM)  # (to the process: see kv.serve)
        assert served.wait() == 0, served.err
        assert "returned None" in served.out
        served.assert_nothing_left()
    finally:
        served.kill()


def test_a_second_signal_kills_at_once_and_leaves_nothing(serve):
    served = serve("--port", "0")
    with Client(served.port) as c:
        assert c.request(b"CREATE s\r\n") == b"OK\r\n"
        os.kill(served.proc.pid, signal.SIGSTOP)  # (so that both signals come together)
        os.kill(served.proc.pid, signal.SIGINT)
        os.kill(served.proc.pid, signal.SIGTERM)
        os.kill(served.proc.pid, signal.SIGCONT)
        assert served.wait() != 0
    served.assert_nothing_left()


def test_a_tree_that_stops_on_its_own_ends_the_service_with_status_1(serve):
    served = serve("--port", "0")
    [root] = psutil.Process(served.proc.pid).children()[0].children()
    # The kv tree's supervisor or the server's (both are watched): the root's children
    # that have children (the others are warm children, waiting for a spawn).
    [*trees] = [p for p in root.children() if p.children()]
    trees[0].kill()
    assert served.wait() == 1
    assert re.search(r"kv(\.server)?\.supervisor exited with reason 'killed'", served.err)
    served.assert_nothing_left()
