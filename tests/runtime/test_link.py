"""Links, trap_exit and exit/2: OTP semantics, delivered even to a busy process."""

from __future__ import annotations

import hashlib
import select
import time

import pytest

import runtime
from runtime import _embed, _mailbox
from runtime.testing import assert_receive, tagged, wait_down


def sleeper():
    time.sleep(60)  # sleep-ok: busy in a sleep


def spinner():
    x = 0
    while True:  # busy in Python code
        x += 1


def c_call():
    # busy inside one long C call that never returns to the interpreter
    hashlib.pbkdf2_hmac("sha256", b"password", b"salt", 2**31 - 1)


def select_forever():
    select.select([], [], [], 60)


def crash_on(msg):
    runtime.receive(timeout=30, match=lambda m: m == msg)
    raise ValueError("linked crash")


def linked_pair(busy):
    """A process running ``busy`` linked to one that crashes on "go"; returns both."""
    me = runtime.self()

    def starter(parent, busy):
        crasher = runtime.spawn(crash_on, "go")
        runtime.link(crasher)
        runtime.send(parent, ("crasher", crasher))
        busy()

    peer = runtime.spawn(starter, me, busy)
    _, crasher = assert_receive(tagged("crasher"))
    return peer, crasher


@pytest.mark.parametrize("busy", [sleeper, spinner, c_call, select_forever])
def test_a_linked_crash_kills_a_busy_peer_with_the_same_reason(busy):
    peer, crasher = linked_pair(busy)
    ref = runtime.monitor(peer)
    runtime.send(crasher, "go")
    reason = wait_down(ref).reason
    assert isinstance(reason, runtime.Crash) and reason.message == "linked crash"


def trapper(parent):
    runtime.trap_exit(True)
    crasher = runtime.spawn(crash_on, "go", link=True)
    runtime.send(parent, ("crasher", crasher))
    msg = runtime.receive(timeout=30, match=lambda m: isinstance(m, runtime.Exit))
    runtime.send(parent, ("got", msg))


def test_a_trapping_peer_receives_exit_instead_of_dying():
    me = runtime.self()
    peer = runtime.spawn(trapper, me)
    _, crasher = assert_receive(tagged("crasher"))
    runtime.send(crasher, "go")
    _, exit_msg = assert_receive(tagged("got"))
    assert exit_msg.pid == crasher
    assert isinstance(exit_msg.reason, runtime.Crash)
    ref = runtime.monitor(peer)
    assert wait_down(ref).reason in ("normal", "noproc")


def test_a_normal_exit_does_not_kill_a_linked_peer():
    me = runtime.self()

    def starter(parent):
        child = runtime.spawn(crash_on, "never", link=True)
        ref = runtime.monitor(child)
        runtime.unlink(child)
        runtime.link(child)
        runtime.exit(child, "normal")  # ignored: child does not trap exits
        quick = runtime.spawn(lambda: None, link=True)
        r2 = runtime.monitor(quick)
        runtime.receive(timeout=30, match=lambda m: isinstance(m, runtime.Down) and m.ref == r2)
        runtime.send(parent, ("alive after normal exit", runtime.is_alive(child)))
        runtime.exit(child, "kill")
        runtime.receive(timeout=30, match=lambda m: isinstance(m, runtime.Down) and m.ref == ref)

    pid = runtime.spawn(starter, me)
    ref = runtime.monitor(pid)
    assert assert_receive(tagged("alive after normal exit"))[1] is True
    # the child was killed, reason "killed", which is abnormal: the starter dies too
    assert wait_down(ref).reason == "killed"


def test_exit_kill_cannot_be_trapped():
    me = runtime.self()

    def trapping(parent):
        runtime.trap_exit(True)
        runtime.send(parent, "trapping")
        runtime.receive(timeout=30, match=lambda m: m == "never")

    pid = runtime.spawn(trapping, me)
    ref = runtime.monitor(pid)
    assert_receive("trapping")
    runtime.exit(pid, "kill")
    assert wait_down(ref).reason == "killed"


def test_exit_with_a_reason_is_a_message_to_a_trapping_process():
    me = runtime.self()

    def trapping(parent):
        runtime.trap_exit(True)
        runtime.send(parent, "trapping")
        msg = runtime.receive(timeout=30, match=lambda m: isinstance(m, runtime.Exit))
        runtime.send(parent, ("exit message", msg.pid, msg.reason))

    pid = runtime.spawn(trapping, me)
    assert_receive("trapping")
    runtime.exit(pid, "please stop")
    assert assert_receive(tagged("exit message")) == (
        "exit message", runtime.self(), "please stop")


def test_exit_with_a_reason_kills_a_busy_process_with_that_reason():
    pid = runtime.spawn(c_call)
    ref = runtime.monitor(pid)
    runtime.exit(pid, ("shutdown", "maintenance"))
    assert wait_down(ref).reason == ("shutdown", "maintenance")


def test_the_embedding_process_gets_exit_for_a_linked_crash():
    pid = runtime.spawn(crash_on, "go", link=True)
    runtime.send(pid, "go")
    msg = assert_receive(lambda m: isinstance(m, runtime.Exit) and m.pid == pid)
    assert isinstance(msg.reason, runtime.Crash)


def test_the_embedding_process_gets_no_exit_for_a_normal_exit():
    pid = runtime.spawn(lambda: None, link=True)
    ref = runtime.monitor(pid)
    wait_down(ref)
    with pytest.raises(TimeoutError):
        runtime.receive(timeout=0.1, match=lambda m: isinstance(m, runtime.Exit) and m.pid == pid)


def test_unreceived_exits_in_the_embedding_process_are_bounded(monkeypatch):
    monkeypatch.setattr(_mailbox, "MAIN_EXIT_BACKLOG", 3)
    node = _embed.current()
    assert node.mailbox.exits_queued() == 0
    pids = [runtime.spawn(crash_on, "go", link=True) for _ in range(6)]
    refs = [runtime.monitor(p) for p in pids]
    for p in pids:
        runtime.send(p, "go")
    for ref in refs:
        wait_down(ref)
    exits = [m for m in node.mailbox.peek(100) if isinstance(m, runtime.Exit)]
    assert len(exits) == 3
    assert {e.pid for e in exits} < set(pids)
    for _ in range(3):
        runtime.receive(timeout=1, match=lambda m: isinstance(m, runtime.Exit))
    assert node.mailbox.exits_queued() == 0


def test_link_to_a_dead_process_raises_unless_trapping():
    pid = runtime.spawn(sleeper)
    ref = runtime.monitor(pid)
    runtime.exit(pid, "kill")
    wait_down(ref)
    me = runtime.self()

    def non_trapping(parent, target):
        try:
            runtime.link(target)
        except runtime.NoProcError:
            runtime.send(parent, "raised noproc")

    runtime.spawn(non_trapping, me, pid)
    assert_receive("raised noproc")
    runtime.link(pid)  # the embedding process traps exits
    assert assert_receive(lambda m: isinstance(m, runtime.Exit) and m.pid == pid).reason == "noproc"


def test_unlink_stops_the_propagation():
    me = runtime.self()

    def starter(parent):
        child = runtime.spawn(crash_on, "go", link=True)
        runtime.unlink(child)
        ref = runtime.monitor(child)
        runtime.send(child, "go")
        down = runtime.receive(timeout=30, match=lambda m: isinstance(m, runtime.Down))
        runtime.send(parent, ("survived", down.ref == ref))

    runtime.spawn(starter, me)
    assert assert_receive(tagged("survived")) == ("survived", True)


def test_exit_propagates_along_a_chain_of_links():
    me = runtime.self()

    def middle(parent):
        tail = runtime.spawn(sleeper, link=True)
        runtime.send(parent, ("tail", tail))
        sleeper()

    head = runtime.spawn(crash_on, "go", link=True)  # linked to the embedding process
    runtime.unlink(head)
    mid = runtime.spawn(middle, me)
    _, tail = assert_receive(tagged("tail"))
    refs = [runtime.monitor(p) for p in (mid, tail)]

    def linker(a, b, parent):
        runtime.link(a)
        runtime.link(b)
        runtime.send(parent, "linked")
        runtime.trap_exit(False)
        sleeper()

    link_proc = runtime.spawn(linker, head, mid, me)
    assert_receive("linked")
    runtime.send(head, "go")
    reasons = [wait_down(ref).reason for ref in refs]
    assert all(isinstance(r, runtime.Crash) or r == "killed" for r in reasons), reasons
    ref = runtime.monitor(link_proc)
    wait_down(ref)


def test_trap_exit_returns_the_previous_setting():
    me = runtime.self()

    def flip(parent):
        runtime.send(parent, ("flags", runtime.trap_exit(True), runtime.trap_exit(False)))

    runtime.spawn(flip, me)
    assert assert_receive(tagged("flags")) == ("flags", False, True)
    assert runtime.trap_exit(False) is True  # the embedding process always traps
