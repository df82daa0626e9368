"""Every undocumented part of the standard library the runtime relies on
(runtime._compat) still behaves as the runtime expects, on this CPython."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys

import pytest

from runtime import _compat


class _Launched(_compat.ForkPopen):
    def launch(self, process_obj):
        r, w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            os._exit(7)
        os.close(w)
        self.sentinel = r


def test_a_fork_popen_starts_through_launch_and_keeps_multiprocessing_s_api():
    popen = _Launched(object())
    try:
        assert popen.wait(10) == 7  # poll() and wait() are multiprocessing's own
        assert popen.returncode == 7
    finally:
        os.close(popen.sentinel)


def test_a_spawned_child_starts_with_only_the_descriptors_given():
    r, w = os.pipe()
    try:
        executable, args = _compat.spawn_command(r)
        line = " ".join(map(os.fsdecode, args))
        assert os.fsdecode(executable) == os.fsdecode(multiprocessing.spawn.get_executable())
        assert "spawn_main" in line and f"pipe_handle={r}" in line
        code = f"import os; os.write({w}, str(os.listdir('/proc/self/fd')).encode())"
        pid = _compat.spawn_with_fds(sys.executable, [sys.executable, "-c", code], [w])
        given = w
        os.close(w)
        w = -1
        seen = eval(os.read(r, 4096).decode())
        os.waitpid(pid, 0)
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    extra = {int(fd) for fd in seen} - {0, 1, 2, given}
    assert len(extra) <= 1  # listdir's own descriptor


def test_a_spawn_popen_exposes_the_descriptors_its_child_inherits():
    class Probe(_compat.SpawnPopen):
        def launch(self, process_obj):
            self.seen = list(self.inherited_fds)
            self.duplicate_for_child(99)
            self.after = list(self.inherited_fds)
            self.pid = 0
            self.sentinel = -1

    probe = Probe(object())
    assert probe.seen == [] and probe.after == [99]


def test_the_current_process_can_be_replaced():
    original = multiprocessing.current_process()
    try:
        other = multiprocessing.Process(name="stand-in")
        _compat.set_current_process(other)
        assert multiprocessing.current_process() is other
    finally:
        _compat.set_current_process(original)
    assert multiprocessing.current_process() is original


def test_the_original_dir_is_where_the_program_started():
    assert os.path.isdir(_compat.original_dir())


def test_signal_handlers_and_masks_take_plain_numbers():
    seen = []
    old = signal.getsignal(signal.SIGUSR1)
    try:
        _compat.set_handler(int(signal.SIGUSR1), lambda signo, frame: seen.append(signo))
        before = _compat.sigmask(signal.SIG_BLOCK, {int(signal.SIGUSR1)})
        assert all(type(s) is int for s in before)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert seen == []  # blocked
        _compat.sigmask(signal.SIG_SETMASK, before)
        assert seen == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, old)
    assert int(signal.SIGKILL) in _compat.ALL_SIGNALS


@pytest.mark.parametrize("name", _compat.__all__)
def test_every_name_is_there(name):
    assert hasattr(_compat, name)
