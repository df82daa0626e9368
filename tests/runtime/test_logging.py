"""What the runtime and kv say, and where: through ``logging`` only, under the
``runtime`` and ``kv`` loggers; a crash report names the process and carries its
traceback; nothing is printed to stdout by the library.

The processes that crash are other OS processes, so each test runs a script in a
subprocess and reads what it wrote.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=120)


CRASHES = """
    import logging, sys
    import runtime

    FMT = "LOG|%(name)s|%(levelname)s|%(process)d|%(message)s"

    class Boom(runtime.GenServer):
        def init(self, arg):
            logging.basicConfig(stream=sys.stderr, format=FMT)  # in the server's process
            return arg
        def handle_call(self, request, from_, state):
            raise KeyError("the-missing-key")

    def victim():
        logging.basicConfig(stream=sys.stderr, format=FMT)
        runtime.receive()
        raise ValueError("named-by-another")

    def down_of(ref):
        return runtime.receive(timeout=60, match=lambda m: getattr(m, "ref", None) == ref)

    if __name__ == "__main__":
        server = Boom.start(0, name="boom-server")
        ref = runtime.monitor(server)
        try:
            runtime.call(server, "go")
        except runtime.ExitError:
            pass
        down_of(ref)
        other = runtime.spawn(victim)
        runtime.register("the-victim", other)  # a name given by another process
        ref = runtime.monitor(other)
        runtime.send(other, "go")
        down_of(ref)
        print(server.os_pid, other.os_pid)
        runtime.shutdown()
"""


def _report(err: str, os_pid: int) -> list[str]:
    """The log record written by the process ``os_pid``, as lines (a record's first
    line carries the format's fields, its traceback follows)."""
    lines = err.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("LOG|") and line.split("|")[3] == str(os_pid):
            end = i + 1
            while end < len(lines) and not lines[end].startswith("LOG|"):
                end += 1
            return lines[i:end]
    raise AssertionError(f"no log record from OS pid {os_pid} in:\n{err}")


def test_a_crash_report_names_the_process_and_holds_its_traceback():
    proc = run(CRASHES)
    assert proc.returncode == 0, proc.stderr
    server, other = (int(x) for x in proc.stdout.split())

    report = _report(proc.stderr, server)
    _, logger, level, _, message = report[0].split("|", 4)
    assert (logger, level) == ("runtime", "ERROR")
    assert message.startswith(f"process <Pid {server}.") and "(boom-server) crashed:" in message
    assert "KeyError: 'the-missing-key'" in message
    text = "\n".join(report)
    assert "Traceback (most recent call last)" in text
    assert "in handle_call" in text and text.rstrip().endswith("KeyError: 'the-missing-key'")

    report = _report(proc.stderr, other)
    assert report[0].split("|")[1:3] == ["runtime", "ERROR"]
    assert f"<Pid {other}." in report[0] and "(the-victim) crashed:" in report[0]
    assert "in victim" in "\n".join(report)


SESSION = """
    import runtime, kv
    from runtime.testing import wait_until

    class Worker(runtime.GenServer):
        def init(self, arg):
            return arg
        def handle_call(self, request, from_, state):
            if request == "crash":
                raise RuntimeError("crash on purpose")
            return runtime.Reply(state, state)

    def echo(parent):
        runtime.send(parent, ("echo", runtime.receive()))

    if __name__ == "__main__":
        pid = runtime.spawn(echo, runtime.self())
        runtime.send(pid, "hello")
        assert runtime.receive(timeout=60) == ("echo", "hello")

        spec = {"id": "worker", "start": (Worker.start_link, (1,), {"name": "worker"})}
        sup = runtime.Supervisor.start_link([spec], strategy="one_for_one")
        first = runtime.whereis("worker")
        assert runtime.call("worker", "get") == 1
        try:
            runtime.call("worker", "crash")
        except runtime.ExitError:
            pass
        wait_until(lambda: runtime.whereis("worker") not in (None, first))
        assert runtime.call("worker", "get") == 1
        runtime.info(runtime.whereis("worker"))
        runtime.stop(sup)

        kv.start()
        bucket = kv.registry.create("kv.registry", "shopping")
        kv.bucket.put(bucket, "milk", 3)
        assert kv.bucket.get(bucket, "milk") == 3
        ref = runtime.monitor(bucket)
        runtime.exit(bucket, "kill")
        runtime.receive(timeout=60, match=lambda m: getattr(m, "ref", None) == ref)
        kv.stop()
        runtime.shutdown()
"""


def test_the_library_writes_nothing_to_stdout_in_a_typical_session():
    proc = run(SESSION)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    # The crash went to stderr, through logging (its last resort handler here).
    assert "crashed: RuntimeError: crash on purpose" in proc.stderr


def test_a_crash_in_code_from_the_user_s_script_shows_its_file_and_line(tmp_path):
    # Code of the script's __main__ travels by value (cloudpickle), which would name
    # its file "<dynamic-code>" and lose the source line.
    script = tmp_path / "service.py"
    script.write_text(textwrap.dedent("""
        import runtime

        class Boom(runtime.GenServer):
            def init(self, arg):
                return arg
            def handle_call(self, request, from_, state):
                raise KeyError("from the script")

        if __name__ == "__main__":
            server = Boom.start(0, name="boom")
            ref = runtime.monitor(server)
            try:
                runtime.call(server, "go")
            except runtime.ExitError as exc:
                print(exc.reason.traceback)
            runtime.receive(timeout=60, match=lambda m: getattr(m, "ref", None) == ref)
            runtime.shutdown()
    """))
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for text in (proc.stdout, proc.stderr):  # the caller's Crash, the crash report
        assert f'File "{script}", line 8, in handle_call' in text, text
        assert 'raise KeyError("from the script")' in text, text
        assert "<dynamic-code>" not in text
