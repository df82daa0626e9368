"""The README's example runs as written (it is kept in examples/quickstart.py)."""

import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_readme_example_is_the_quickstart_and_runs():
    readme = open(os.path.join(REPO, "README.md")).read()
    block = re.findall(r"```python\n(.*?)```", readme, re.S)[0]
    quickstart = open(os.path.join(REPO, "examples", "quickstart.py")).read()
    assert block in quickstart
    proc = subprocess.run([sys.executable, os.path.join(REPO, "examples", "quickstart.py")],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr


def test_the_demo_runs_and_leaves_nothing_behind():
    proc = subprocess.run([sys.executable, "-m", "kv", "demo"], capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for marker in ("SIGKILL the 'work' bucket", "reason='killed'", "runtime.Crash",
                   "one_for_all restarts", "left behind: 0"):
        assert marker in out, out
    assert "KeyError" in proc.stderr and "Traceback" in proc.stderr  # the crash is logged


def test_the_readme_embedding_example_is_examples_embedding_and_runs():
    readme = open(os.path.join(REPO, "README.md")).read()
    section = readme[readme.index("## Embedding in a service"):]
    block = re.findall(r"```python\n(.*?)```", section, re.S)[0]
    example = open(os.path.join(REPO, "examples", "embedding.py")).read()
    assert block in example
    proc = subprocess.run([sys.executable, os.path.join(REPO, "examples", "embedding.py")],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("waiting"), proc.stdout


def test_the_asyncio_service_keeps_state_in_buckets_and_survives_their_crash():
    import signal
    import socket

    import psutil

    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "examples", "aio_service.py")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        port = int(proc.stdout.readline())
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            lines = sock.makefile("rw", newline="\n")

            def ask(line):
                lines.write(line + "\n")
                lines.flush()
                return lines.readline().rstrip("\n")

            assert ask("SET ada colour green") == "OK"
            assert ask("SET bob colour blue") == "OK"
            assert ask("GET ada colour") == "green"
            os.kill(int(ask("WHO ada")), signal.SIGKILL)  # ada's bucket crashes
            assert ask("GET ada colour") == ""  # her state went with it; the service lives
            assert ask("GET bob colour") == "blue"
            assert ask("SET ada colour red") == "OK"
            assert ask("GET ada colour") == "red"
        family = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, proc.stderr.read()
        gone, alive = psutil.wait_procs(family, timeout=5)
        assert not alive
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
