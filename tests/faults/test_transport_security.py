"""The transport's security: the node's directory and sockets are the owner's only,
a connection that does not prove the node's key is dropped before a byte of it is
unpickled, a recorded handshake cannot be replayed, and the key shows nowhere.

Already tested elsewhere, not repeated here: a connection with no HELLO, or with a
wrong proof, is dropped before unpickling (tests/runtime/test_node.py,
``test_a_connection_that_does_not_prove_the_key_is_dropped_before_unpickling``);
``NodeInfo``'s repr hides the key (tests/runtime/test_core_bugs.py); the TCP
server unpickles nothing from the network and enforces its line length and
connection limits with ``ERROR`` and a close (tests/kv/test_server.py:
``test_nothing_that_comes_from_the_network_is_unpickled``,
``test_a_line_over_max_line_gets_error_and_the_connection_closes``,
``test_an_endless_line_gets_error_and_a_close_not_more_memory``,
``test_more_connections_than_max_connections_get_error_and_a_close``).
"""

from __future__ import annotations

import base64
import os
import pickle
import select
import signal
import socket
import stat
import struct
import traceback

import psutil
import pytest

import kv
import runtime
from runtime import _embed, _wire, testing
from runtime.testing import assert_receive, tagged, wait_down, wait_until

from . import _actors
from ._helpers import descendants, kill_all, start_script

STRANGER = 65534  # nobody


def _node():
    return _embed.current()


class Evil:
    """Unpickling this creates ``path``: proof that code from the connection ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _msg_frame(payload: bytes) -> bytes:
    return struct.pack("!I", len(payload) + 1) + b"\x00" + payload


def _closed_by_peer(sock: socket.socket, timeout: float = 5.0) -> bool:
    """Whether the other end closes ``sock`` within ``timeout`` (reading whatever comes)."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    if not poller.poll(timeout * 1000):
        return False
    try:
        return sock.recv(4096) == b""
    except ConnectionResetError:
        return True


@pytest.fixture
def target(tmp_path):
    """A process that unpickles whatever it receives and reports it; and the file an
    Evil pickle would create."""
    me = runtime.self()
    pid, ref = runtime.spawn_monitor(_actors.reports_messages, me)
    assert_receive(("listening", pid))
    yield pid, str(tmp_path / "code ran")
    runtime.send(pid, "stop")
    assert_receive(("received", pid, "stop"))
    assert wait_down(ref).reason == "normal"


# ------------------------------------------------------------ who can get in


def test_the_node_directory_and_everything_in_it_are_the_owner_s_only():
    runtime.self()
    top = testing.node_dir()
    assert stat.S_IMODE(os.stat(top).st_mode) == 0o700
    uid = os.getuid()
    for d, dirs, files in os.walk(top):
        for name in [*dirs, *files]:
            st = os.lstat(os.path.join(d, name))
            assert st.st_uid == uid, name
            if stat.S_ISDIR(st.st_mode):
                assert stat.S_IMODE(st.st_mode) == 0o700, name


def test_another_unix_user_can_neither_read_the_node_directory_nor_connect(target):
    if os.getuid() != 0:
        pytest.skip("needs root to become another user (uid 65534) in a child")
    pid, _ = target
    top = testing.node_dir()
    path = _node().info.sock_path(pid.serial)
    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # only os calls here: this is a fork of the test process
        code = 0
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(STRANGER)
            os.setuid(STRANGER)
            results = []
            for attempt in (lambda: os.listdir(top), lambda: os.stat(path),
                            lambda: os.open(os.path.join(top, "table"), os.O_RDONLY)):
                try:
                    attempt()
                    results.append("allowed")
                except PermissionError:
                    results.append("denied")
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
                results.append("allowed")
            except PermissionError:
                results.append("denied")
            os.write(w, " ".join(results).encode())
        except BaseException:
            code = 1
        os._exit(code)
    os.close(w)
    try:
        got = b""
        while chunk := os.read(r, 4096):
            got += chunk
    finally:
        os.close(r)
        _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert got.decode().split() == ["denied"] * 4, "listdir, stat of a socket, open of the " \
        f"table, connect: {got.decode()}"


def test_a_pickle_sent_without_the_handshake_never_runs(target):
    pid, marker = target
    garbage_hello = os.urandom(_wire._HELLO.size)
    for first in (b"", struct.pack("!I", len(garbage_hello)) + garbage_hello):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(_node().info.sock_path(pid.serial))
            s.sendall(first + _msg_frame(pickle.dumps(Evil(marker))))
            assert _closed_by_peer(s), "the process kept a connection that proved nothing"
    assert not os.path.exists(marker)


def test_a_handshake_recorded_for_another_target_or_from_another_process_fails(target):
    pid, marker = target
    me = runtime.self()
    # What a live process of the node sends first when it connects to another one.
    recorder = runtime.spawn(_actors.sends_its_hello, me, pid.serial + 1)
    _, hello = assert_receive(tagged("hello"))
    attacks = [
        hello,  # sent to another target, replayed here, from another process
        _wire.hello(_node().info.key, me, pid.serial + 1, 7),  # ours, for another target
    ]
    for recorded in attacks:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(_node().info.sock_path(pid.serial))
            s.sendall(recorded + _msg_frame(pickle.dumps(Evil(marker))))
            assert _closed_by_peer(s), "a replayed handshake was accepted"
    assert not os.path.exists(marker)
    runtime.exit(recorder, "kill")


def _fork_with_pid(wanted: int, then) -> int | None:
    """Fork a child whose OS pid is ``wanted`` (root: ``ns_last_pid``), which runs
    ``then()`` and exits with its result; the child's pid, or None if another
    process took that pid first (a few tries)."""
    for _ in range(20):
        try:
            with open("/proc/sys/kernel/ns_last_pid", "w") as f:
                f.write(str(wanted - 1))
        except OSError:
            return None
        child = os.fork()
        if child == 0:
            code = 3
            try:
                code = then() if os.getpid() == wanted else 2
            finally:
                os._exit(code)
        if child == wanted:
            return child
        os.waitpid(child, 0)
    return None


def test_a_handshake_replayed_by_the_process_that_made_it_fails(target):
    """A recording of a connection that was accepted, sent again on a new connection
    from the same process (so that the kernel's peer pid matches): each HELLO is
    accepted once."""
    pid, marker = target
    me = runtime.self()
    replayer, ref = runtime.spawn_monitor(_actors.replays_its_hello, me, pid.serial,
                                          pickle.dumps(Evil(marker)))
    assert_receive(("received", pid, "recorded"))
    runtime.send(replayer, "seen")
    assert assert_receive(tagged("replay closed"))[1] is True
    assert wait_down(ref).reason == "normal"
    runtime.send(pid, "sync")  # the target has handled whatever came before
    assert_receive(("received", pid, "sync"))
    assert not os.path.exists(marker), "the replayed connection's pickle was unpickled"


def test_a_handshake_replayed_by_a_process_that_reuses_the_recorder_s_pid_fails(target):
    # The proof binds the connecting process's pid; a recording must not outlive the
    # process that made it, even when a new process gets the same pid.
    if os.getuid() != 0 or not os.access("/proc/sys/kernel/ns_last_pid", os.W_OK):
        pytest.skip("needs root to choose a pid (/proc/sys/kernel/ns_last_pid)")
    pid, marker = target
    me = runtime.self()
    recorder, ref = runtime.spawn_monitor(_actors.sends_its_hello, me, pid.serial)
    _, hello = assert_receive(tagged("hello"))
    assert_receive(("received", pid, "recorded"))  # the target accepted it once
    runtime.exit(recorder, "kill")
    wait_down(ref)
    wait_until(lambda: not psutil.pid_exists(recorder.os_pid), what="the recorder reaped")
    path = _node().info.sock_path(pid.serial)

    def replay() -> int:  # in the child: os and socket calls only
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        s.sendall(hello + _msg_frame(pickle.dumps(Evil(marker))))
        return 0 if _closed_by_peer(s, timeout=2.0) else 1

    child = _fork_with_pid(recorder.os_pid, replay)
    if child is None:
        pytest.skip(f"could not get pid {recorder.os_pid} back for the replay")
    _, status = os.waitpid(child, 0)
    code = os.waitstatus_to_exitcode(status)
    assert code != 1, "a handshake replayed from the recorder's reused pid was accepted"
    assert code == 0, code
    runtime.send(pid, "sync")  # the target has handled whatever came before
    assert_receive(("received", pid, "sync"))
    assert not os.path.exists(marker), "the replayed connection's pickle was unpickled"


# ------------------------------------------------------------ the key shows nowhere


def _forms(key: bytes) -> list[bytes]:
    return [key, key.hex().encode(), key.hex().upper().encode(), base64.b64encode(key),
            base64.urlsafe_b64encode(key), repr(key).encode(), str(list(key)).encode()]


def _leaks(key: bytes, text: bytes | str) -> list[bytes]:
    data = text.encode() if isinstance(text, str) else text
    return [form for form in _forms(key) if form in data]


def _proc_texts(os_pid: int) -> bytes:
    out = b""
    for name in ("cmdline", "environ"):
        try:
            with open(f"/proc/{os_pid}/{name}", "rb") as f:
                out += f.read()
        except OSError:
            pass
    return out


def test_the_key_is_in_no_argv_environment_repr_or_exception_of_the_node():
    me = runtime.self()
    key = _node().info.key
    sup = kv.start()
    try:
        bucket = kv.registry.create("kv.registry", "secrets")
        worker = runtime.spawn(_actors.sleeper)
        seen: list = [me, bucket, worker, runtime.processes(), runtime.info(bucket),
                      runtime.info(me), runtime.Supervisor.which_children(sup), _node().info]
        for pid in runtime.processes():
            assert not _leaks(key, _proc_texts(pid.os_pid)), f"the key is in /proc of {pid}"
        errors = []
        for attempt in (lambda: runtime.call(bucket, ("no such request",)),
                        lambda: runtime.call(worker, "x", timeout=0.01),
                        lambda: runtime.call(runtime.spawn(_actors.sleeper), "x", timeout=0)):
            try:
                attempt()
            except Exception as exc:
                errors.append(exc)
        assert len(errors) == 3
        for thing in [*seen, *errors]:
            assert not _leaks(key, repr(thing)), f"the key is in repr({thing!r:.80})"
            assert not _leaks(key, str(thing))
        for exc in errors:
            assert not _leaks(key, "".join(traceback.format_exception(exc)))
            reason = getattr(exc, "reason", None)
            if isinstance(reason, runtime.Crash):
                assert not _leaks(key, reason.traceback)
    finally:
        kv.stop()
        for pid in testing.node_processes():
            os.kill(pid, signal.SIGKILL)


LEAKY_SERVICE = """
    import logging, os, pickle, socket, struct, sys
    import runtime
    from runtime import _embed
    from runtime.testing import wait_down
    from tests.faults import _actors

    if __name__ == "__main__":
        logging.basicConfig(level=logging.DEBUG)
        key = _embed.current().info.key
        server = _actors.LongCall.start(None)
        # a crash, an unexpected message, a rejected connection: each logged
        pid, ref = runtime.spawn_monitor(_actors.crashes, "on purpose")
        wait_down(ref)
        runtime.send(server, "unexpected")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(_embed.current().info.sock_path(server.serial))
            s.sendall(struct.pack("!I", 48) + os.urandom(48))
            s.recv(1)
        pid, ref = runtime.spawn_monitor(_actors.sleeper)
        print(key.hex(), flush=True)
        print(" ".join(str(p.os_pid) for p in runtime.processes()), flush=True)
        sys.stdin.readline()
        runtime.stop(server)
"""


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_the_key_is_in_no_argv_environment_or_log_of_a_service(method):
    proc = start_script(LEAKY_SERVICE, env={"RUNTIME_START_METHOD": method})
    family: list[psutil.Process] = []
    try:
        key = bytes.fromhex(proc.stdout.readline().strip())
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(key) == 32, proc.stderr.read()[-3000:]
        family = descendants(proc.pid)
        assert len(pids) >= 4
        for os_pid in pids:
            assert not _leaks(key, _proc_texts(os_pid)), f"the key is in /proc/{os_pid}"
        proc.stdin.write("done\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err[-3000:]
        assert "crashed" in err and "on purpose" in err, err[-3000:]
        assert "rejected a connection" in err, err[-3000:]
        assert "unexpected message" in err, err[-3000:]
        assert not _leaks(key, err), "the key is in the service's log"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        kill_all(family)


# ------------------------------------------------------------ the TCP server


def test_the_tcp_server_listens_on_loopback_only_unless_told_otherwise():
    sup = kv.start()
    try:
        host, port = kv.server.start(port=0)  # the default host
        assert host == "127.0.0.1" == kv.server.HOST
        acceptor = runtime.whereis("kv.server.acceptor")
        listening = [c.laddr for c in psutil.Process(acceptor.os_pid).net_connections("inet")
                     if c.status == psutil.CONN_LISTEN]
        assert listening == [("127.0.0.1", port)], listening
    finally:
        kv.server.stop()
        kv.stop()
    wait_until(lambda: not testing.node_processes(), what="the trees to be gone")
    del sup
