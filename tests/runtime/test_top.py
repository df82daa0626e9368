"""``python -m runtime top``: an observer's view of a node run by another program.

Each test starts nodes in subprocesses (a script that embeds the runtime), in a
node directory of its own (``RUNTIME_NODE_DIR``), and runs ``top`` against them.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading

import psutil
import pytest

from runtime import _observe, _wire
from runtime.testing import TIMEOUT, wait_until

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A service embedding the runtime: a named GenServer, a named supervisor with a
# child, and a named process busy in its own code; the embedding process waits in
# the runtime until its stdin closes.
NODE = """
import json, os, sys, threading, time
import runtime

class Counter(runtime.GenServer):
    def init(self, start):
        return start
    def handle_call(self, request, from_, state):
        return runtime.Reply(state, state)

def sleeper(parent):
    runtime.register("sleeper", runtime.self())
    runtime.send(parent, "sleeping")
    time.sleep(600)  # sleep-ok: a process busy in its own code

if __name__ == "__main__":
    counter = Counter.start_link(0, name="counter")
    sup = runtime.Supervisor.start_link([(Counter, 1)], strategy="one_for_one")
    runtime.register("sup", sup)
    sleeper_pid = runtime.spawn(sleeper, runtime.self())
    runtime.receive(timeout=60, match=lambda m: m == "sleeping")
    def watch_stdin():
        sys.stdin.read()
        runtime.send(runtime.self(), "stop")
    threading.Thread(target=watch_stdin, daemon=True).start()
    from runtime import testing
    print("ready " + json.dumps({
        "dir": testing.node_dir(), "main": os.getpid(), "counter": counter.os_pid,
        "sup": sup.os_pid, "sleeper": sleeper_pid.os_pid,
        "root": testing.root().os_pid,
    }), flush=True)
    runtime.receive(match=lambda m: m == "stop")
    runtime.shutdown()
"""

# For a top whose statuses a test does not check: the busy sleeper costs a timeout.
QUICK = "0.3"

ROW = re.compile(r"^(?P<tree>[ │├└─]*)<(?P<os>\d+)\.(?P<serial>\d+)>\s+(?P<os_pid>\d+)\s+"
                 r"(?P<names>\S+)\s+(?P<status>\S+)\s+(?P<msgq>\S+)\s+(?P<mon>\S+)\s+"
                 r"(?P<links>\S+)\s+(?P<memory>\S+)$")


class Node:
    """A node run by a script in a subprocess."""

    def __init__(self, base: str) -> None:
        env = dict(os.environ, RUNTIME_NODE_DIR=base, PYTHONPATH=REPO)
        self.proc = subprocess.Popen([sys.executable, "-c", NODE], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env, cwd=REPO)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.err: list[str] = []
        threading.Thread(target=self._pump, args=(self.proc.stdout, self.lines.put),
                         daemon=True).start()
        self._err_done = threading.Event()
        threading.Thread(target=self._pump_err, daemon=True).start()
        line = self.lines.get(timeout=60)
        assert line and line.startswith("ready "), (line, self.stderr())
        self.facts = json.loads(line[len("ready "):])
        self.dir: str = self.facts["dir"]

    @staticmethod
    def _pump(stream, put) -> None:
        for line in stream:
            put(line.rstrip("\n"))
        put(None)

    def _pump_err(self) -> None:
        for line in self.proc.stderr:
            self.err.append(line)
        self._err_done.set()

    def stderr(self) -> str:
        return "".join(self.err)

    def stop(self) -> None:
        """Stop the node and wait until it is gone, its directory too."""
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=TIMEOUT * 3)
            except subprocess.TimeoutExpired:
                self.proc.kill()  # its root then ends the node
                self.proc.wait(timeout=TIMEOUT)
        self._err_done.wait(TIMEOUT)
        wait_until(lambda: not os.path.exists(self.dir), what=f"{self.dir} removed")

    def tree(self) -> set[int]:
        """OS pids of the node's processes (the embedding process's descendants)."""
        me = psutil.Process(self.proc.pid)
        return {me.pid} | {p.pid for p in me.children(recursive=True)}


@pytest.fixture
def base():
    """A node directory base of the test's own, empty at the end."""
    path = tempfile.mkdtemp(prefix="top-", dir="/tmp")  # short: socket paths are limited
    nodes: list[Node] = []
    try:
        yield path, nodes
    finally:
        for node in nodes:
            node.stop()
        left = os.listdir(path)
        shutil.rmtree(path, ignore_errors=True)
    assert not left, left


def start(base_and_nodes) -> Node:
    path, nodes = base_and_nodes
    node = Node(path)
    nodes.append(node)
    return node


def top(base: str, *args: str, module: str = "runtime") -> subprocess.CompletedProcess:
    env = dict(os.environ, RUNTIME_NODE_DIR=base, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", module, "top", *args], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=120)


def rows(output: str) -> list[dict]:
    found = []
    for line in output.splitlines():
        m = ROW.match(line)
        if m:
            row = m.groupdict()
            row["depth"] = len(row.pop("tree")) // 3
            row["os_pid"] = int(row["os_pid"])
            found.append(row)
    return found


def listing(path: str) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            out.append(os.path.relpath(os.path.join(dirpath, name), path))
    return sorted(out)


# ------------------------------------------------------------------ the tree


def test_top_once_shows_the_tree_with_names_statuses_and_columns(base):
    node = start(base)
    proc = top(base[0], "--once", "--timeout", "3")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"node {os.path.basename(node.dir)} ({node.dir}): 6 processes")
    assert lines[1].split() == ["PID", "OS", "PID", "NAME", "STATUS", "MSGQ", "MON", "LINKS",
                                "USS"]
    got = rows(proc.stdout)
    assert len(got) == 6, proc.stdout
    by_os = {row["os_pid"]: row for row in got}
    facts = node.facts
    main, root = by_os[facts["main"]], by_os[facts["root"]]
    counter, sup, sleeper = by_os[facts["counter"]], by_os[facts["sup"]], by_os[facts["sleeper"]]
    # The tree: main > root > (counter, sup > its child, sleeper), each process's
    # children in the order of their serials (a process the root started ahead for a
    # spawn has the serial of that moment, so the three need not be in spawn order).
    assert [row["os_pid"] for row in got[:2]] == [facts["main"], facts["root"]]
    assert [row["depth"] for row in got[:2]] == [0, 1]
    at_two = [row for row in got if row["depth"] == 2]
    assert {row["os_pid"] for row in at_two} == {facts["counter"], facts["sup"],
                                                  facts["sleeper"]}
    assert [row["depth"] for row in got[2:]].count(3) == 1
    child = got[got.index(sup) + 1]
    assert child["depth"] == 3
    assert (main["names"], counter["names"], sup["names"], child["names"],
            sleeper["names"]) == ("-", "counter", "sup", "-", "sleeper")
    # Who waits in the runtime answers; the sleeper, in its own code, does not.
    for row in (main, root, counter, sup, child):
        assert row["status"] == "waiting", proc.stdout
        assert row["msgq"] == "0", proc.stdout
    assert (sleeper["status"], sleeper["msgq"], sleeper["mon"], sleeper["links"]) == (
        "running", "-", "-", "-")
    assert main["links"] == "2"  # counter and sup, started linked
    assert sup["links"] == "2" and child["links"] == "1"  # sup: its parent and its child
    # The root watches the embedding process and the two children it keeps started
    # ahead (by default), each until it has settled once taken: the sleeper, in its
    # own code, has not, so one is waiting and the sleeper holds the other's place.
    assert root["mon"] == "3", proc.stdout
    for row in got:
        assert re.fullmatch(r"[\d.]+[BKMG]", row["memory"]), proc.stdout
        assert row["os"] == str(row["os_pid"])


def test_kv_top_is_the_same_command(base):
    node = start(base)
    proc = top(base[0], "--once", "--timeout", QUICK, "--node", str(node.facts["main"]),
               module="kv")
    assert proc.returncode == 0, proc.stderr
    assert {row["names"] for row in rows(proc.stdout)} >= {"counter", "sup", "sleeper"}


# ------------------------------------------------------------ finding the node


def test_top_picks_the_only_node_and_asks_which_when_there_are_two(base):
    path = base[0]
    first = start(base)
    proc = top(path, "--once", "--timeout", QUICK)
    assert proc.returncode == 0, proc.stderr
    assert f"({first.dir})" in proc.stdout.splitlines()[0]

    second = start(base)
    # A dead node's directory (its lock held by nobody; the next node to start removes
    # it) is no candidate.
    dead = os.path.join(path, "rt-999999-deadnode")
    os.mkdir(dead, 0o700)
    open(os.path.join(dead, "lock"), "w").close()
    try:
        proc = top(path, "--once", "--timeout", QUICK)
        assert proc.returncode == 2 and not proc.stdout
        assert "2 live nodes" in proc.stderr and "--node" in proc.stderr
        assert first.dir in proc.stderr and second.dir in proc.stderr
        assert dead not in proc.stderr

        by_pid = top(path, "--once", "--timeout", QUICK, "--node", str(second.facts["main"]))
        assert by_pid.returncode == 0, by_pid.stderr
        assert f"({second.dir})" in by_pid.stdout.splitlines()[0]
        by_name = top(path, "--once", "--timeout", QUICK, "--node", os.path.basename(first.dir))
        assert f"({first.dir})" in by_name.stdout.splitlines()[0]

        missing = top(path, "--once", "--node", dead)
        assert missing.returncode == 2 and "is not a live node" in missing.stderr
    finally:
        shutil.rmtree(dead)


def test_top_without_a_node_says_so(base):
    proc = top(base[0], "--once")
    assert proc.returncode == 1
    assert "no live node of yours" in proc.stderr and not proc.stdout


# ------------------------------------------------------------ leaving no trace


def test_top_joins_nothing_and_leaves_nothing_even_when_killed(base):
    node = start(base)
    files, tree = listing(node.dir), node.tree()
    proc = top(base[0], "--once", "--timeout", QUICK)
    assert proc.returncode == 0, proc.stderr
    assert listing(node.dir) == files
    assert node.tree() == tree

    # A refreshing top (not a terminal: a snapshot per refresh), SIGKILLed.
    env = dict(os.environ, RUNTIME_NODE_DIR=base[0], PYTHONPATH=REPO)
    live = subprocess.Popen([sys.executable, "-m", "runtime", "top", "--interval", "0.2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=REPO)
    try:
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=Node._pump, args=(live.stdout, lines.put), daemon=True).start()
        titles = 0
        while titles < 2:  # two snapshots: its connections are open
            line = lines.get(timeout=60)
            assert line is not None, live.stderr.read()
            titles += line.startswith("node ")
    finally:
        live.send_signal(signal.SIGKILL)
        live.wait(timeout=TIMEOUT)
        live.stderr.close()
    assert listing(node.dir) == files
    assert node.tree() == tree

    # The node carries on as before: the same processes, and all but the sleeper answer.
    again = top(base[0], "--once", "--timeout", "3")
    assert again.returncode == 0, again.stderr
    assert [(r["os_pid"], r["names"]) for r in rows(again.stdout)] == \
        [(r["os_pid"], r["names"]) for r in rows(proc.stdout)]
    assert [r["os_pid"] for r in rows(again.stdout) if r["status"] != "waiting"] == \
        [node.facts["sleeper"]]
    node.stop()
    assert "rejected" not in node.stderr() and "Traceback" not in node.stderr(), node.stderr()


# ---------------------------------------------------------------- the key


def test_the_key_is_the_owners_only(base):
    node = start(base)
    assert os.stat(node.dir).st_mode & 0o777 == 0o700
    assert os.stat(os.path.join(node.dir, _wire.KEY_FILE)).st_mode & 0o777 == 0o600


def test_a_stranger_with_a_wrong_key_is_refused(base):
    node = start(base)
    with _observe.Observer(node.dir, key=b"x" * 32) as stranger:
        roots = stranger.snapshot(timeout=3)
    statuses = {}
    stack = list(roots)
    while stack:
        row = stack.pop()
        statuses[row.os_pid] = (row.status, row.message_queue_len)
        stack.extend(row.children)
    assert statuses[node.facts["counter"]] == ("refused", None)
    assert statuses[node.facts["main"]] == ("refused", None)
    wait_until(lambda: "did not prove the node key" in node.stderr(), what="the refusal logged")

    # The same by hand, on a copy of a socket's path: a HELLO with a wrong key gets the
    # connection closed, and the INFO behind it no answer.
    path = os.path.join(node.dir, str(_pid_serial(node, "counter")))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect(path)
        sock.sendall(_wire.hello(b"y" * 32, _wire.observer(1), _pid_serial(node, "counter"), 1)
                     + b"".join(_wire.info(7)))
        assert _read_all(sock) == b""


def test_an_observer_may_only_ask(base):
    node = start(base)
    serial = _pid_serial(node, "counter")
    key = _wire.load_key(node.dir)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect(os.path.join(node.dir, str(serial)))
        sock.sendall(_wire.hello(key, _wire.observer(1 << 30), serial, 1 << 30)
                     + b"".join(_wire.message(_wire.dumps("not for you"))))
        assert _read_all(sock) == b""  # closed, unanswered
    wait_until(lambda: "sent a frame other than INFO" in node.stderr(), what="the close logged")
    with _observe.Observer(node.dir) as observer:
        states = observer.ask([p for p in observer.processes() if p.serial == serial], 3)
    assert states[serial]["message_queue_len"] == 0  # the message was not delivered


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run as another user")
def test_another_user_cannot_look(base):
    node = start(base)
    os.chmod(base[0], 0o755)  # the base is open; the node's own directory is not
    env = dict(os.environ, RUNTIME_NODE_DIR=base[0], PYTHONPATH=REPO)
    try:
        proc = subprocess.run([sys.executable, "-c", "import runtime.top"], user=65534,
                              env=env, cwd="/", capture_output=True, timeout=60)
    except PermissionError:
        pytest.skip("cannot switch to another user here")
    if proc.returncode != 0:
        pytest.skip(f"another user cannot run this Python: {proc.stderr[-300:]!r}")
    for args in (["--once"], ["--once", "--node", node.dir]):
        proc = subprocess.run([sys.executable, "-m", "runtime", "top", *args], user=65534,
                              env=env, cwd="/", capture_output=True, text=True, timeout=60)
        assert proc.returncode != 0 and not proc.stdout, proc.stdout


# ------------------------------------------------------------------ helpers


def _pid_serial(node: Node, name: str) -> int:
    with _observe.Observer(node.dir) as observer:
        for pid in observer.processes():
            if pid.os_pid == node.facts[name]:
                return pid.serial
    raise AssertionError(f"no process {name}")


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    while True:
        try:
            chunk = sock.recv(4096)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk
