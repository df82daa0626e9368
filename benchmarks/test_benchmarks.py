"""Smoke runs of the benchmarks at tiny sizes: they must run and print every figure.

Speed is never asserted here (the machine is shared and noisy); the full runs
are in the README.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def run(script: str) -> str:
    proc = subprocess.run([sys.executable, os.path.join(HERE, script), "--quick"],
                          capture_output=True, text=True, timeout=240,
                          cwd=os.path.dirname(HERE))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.timeout(300)
def test_runtime_benchmark_runs_and_reports_every_figure():
    output = run("runtime_bench.py")
    for figure in ("spawn to ready", "call round trip", "SIGKILL to Down"):
        assert output.count(figure) >= 2, output  # pinned and unpinned
    assert "floor" in output and "ratio" in output


@pytest.mark.timeout(300)
def test_kv_benchmark_runs_and_reports_every_figure():
    output = run("kv_bench.py")
    for figure in ("registry create", "lookup at", "name gone", "supervisor restart",
                   "kv.stop()"):
        assert figure in output, output


@pytest.mark.timeout(300)
def test_kv_server_benchmark_runs_and_reports_every_figure():
    output = run("kv_server_bench.py")
    for shape in ("1 x 1", "8 x 1", "1 x 8", "8 x 8", "1 x 16", "8 x 16"):
        assert len(re.findall(rf"^\s+{shape}\s+(put|get)\s", output, re.M)) == 2, output
    for column in ("ours", "floor", "bound", "ours/floor", "ours/bound", "vs floor x1"):
        assert column in output, output
