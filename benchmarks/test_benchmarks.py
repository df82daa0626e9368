"""The quick suite runs (``python -m benchmarks --quick``) and reports every figure.

Speed is never asserted (the machine is shared and noisy); the full runs are in
the README. This is what CI runs of the benchmarks on every change.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import psutil
import pytest

from benchmarks import __main__ as cli
from benchmarks import report
from benchmarks.harness import RATES, Recorder

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

# Every figure the quick suite must report (the full one reports more sizes).
EXPECTED = [
    *(f"spawn.{m}.embedding.{f}" for m in ("fork", "spawn")
      for f in ("os_fork", "mp_fork", "mp_forkserver", "mp_spawn")),
    "spawn.fork.runtime.os_fork", "spawn.spawn.runtime.os_fork",
    *(f"messaging.{w}.{op}.{p}.{f}" for w in ("embedding", "runtime")
      for op in ("call", "agent_get", "agent_update") for p in ("100B", "10KB", "1MB")
      for f in ("pipe", "manager")),
    *(f"messaging.{w}.cast.{p}.pipe" for w in ("embedding", "runtime")
      for p in ("100B", "10KB", "1MB")),
    *(f"cleanup.{k}.{n}" for k in ("kill_to_down", "kill_to_name_gone") for n in (10, 50)),
    *(f"cleanup.restart.{n}.{f}" for n in (10, 50) for f in ("sentinel", "restart")),
    "memory.uss", "memory.pss",
    "scale.create.10", "scale.create.100", "scale.create.100.embedding",
    "scale.at_n.create", "scale.at_n.lookup", "scale.at_n.down",
    "scale.teardown.10", "scale.teardown.100", "scale.teardown.largest",
    *(f"tcp.{s}.{p}.{f}" for s in ("1x1", "8x1", "1x8", "8x8") for p in ("put", "get")
      for f in ("floor", "bound")),
    "tcp.8x8.put.floor_x1", "tcp.8x8.get.floor_x1",
    "embedding.call", "embedding.spawn.isolated", "embedding.spawn.back_to_back",
    "embedding.threads", "embedding.acall",
]


def processes_naming(path: str) -> list[int]:
    """Processes whose command line names ``path``: a part's process and everything
    it forked (runtime processes, the floors' children) carry its command line."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        if any(path in arg for arg in p.info["cmdline"] or ()):
            found.append(p.pid)
    return found


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=85, cwd=REPO)
    logs = "".join(open(os.path.join(out, "logs", f)).read()[-2000:]
                   for f in sorted(os.listdir(os.path.join(out, "logs"))))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + logs
    with open(out / "results.json") as f:
        results = json.load(f)
    return out, results, proc


@pytest.mark.timeout(100)
def test_quick_suite_reports_every_figure_with_its_floor(quick_run):
    out, results, _ = quick_run
    figures = {f["key"]: f for f in results["figures"]}
    missing = [k for k in EXPECTED if k not in figures]
    assert not missing, missing
    for fig in figures.values():
        for side in ("ours", "floor"):
            assert fig[side]["n"] >= 1 and fig[side]["median"] > 0, fig
            assert fig[side]["p99"] >= fig[side]["median"] or fig["unit"] in RATES, fig
        assert fig["ratio"] > 0 and fig["floor"]["name"], fig
    md = (out / "results.md").read_text()
    for fig in figures.values():
        assert f"| {fig['name']} | {fig['floor']['name']} |" in md, fig["key"]


@pytest.mark.timeout(100)
def test_quick_suite_records_the_machine_and_says_whether_it_plotted(quick_run):
    out, results, proc = quick_run
    m = results["machine"]
    for key in ("cpu_model", "cpu_count", "python", "kernel", "start_method", "pinned_cpu",
                "git_commit"):
        assert key in m, key
    assert m["cpu_count"] >= 1 and m["python"] == sys.version.split()[0]
    if results["plots"]:
        assert all(os.path.exists(p) for p in results["plots"])
    else:
        assert "plots skipped" in results["plot_note"] and "plots skipped" in proc.stdout
    assert "%" in proc.stderr  # the progress bar
    assert all(not p["error"] for p in results["parts"].values()), results["parts"]


@pytest.mark.timeout(100)
def test_quick_suite_leaves_no_process_behind(quick_run):
    out, _, _ = quick_run
    assert processes_naming(str(out)) == []


def test_compare_sets_each_figure_beside_the_earlier_one(quick_run):
    _, results, _ = quick_run
    old = json.loads(json.dumps(results))
    old["figures"][0]["ours"]["median"] *= 2
    text = report.compare(old, results)
    assert "-50.0%" in text
    assert all(f["key"] in text for f in results["figures"])


def test_readme_section_is_generated_from_a_results_file(quick_run, tmp_path):
    out, results, _ = quick_run
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n## Performance\n\n{report.BEGIN}\nold\n{report.END}\n\n## Next\n")
    report.update_readme(str(out / "results.json"), str(readme), plots_dir=str(tmp_path))
    text = readme.read_text()
    assert "old" not in text and text.endswith("## Next\n")
    assert results["command"] in text
    for fig in results["figures"]:
        if fig["headline"]:
            assert fig["name"] in text, fig["key"]


@pytest.mark.timeout(100)
def test_quick_suite_runs_the_embedding_part_on_one_cpu_with_its_tail_targets(quick_run):
    out, results, _ = quick_run
    cpu = results["parts"]["embedding"]["pinned_cpu"]
    assert cpu is not None and results["machine"]["pinned_cpu"] is None
    md = (out / "results.md").read_text()
    assert "## embedding (" in md and f"pinned to CPU {cpu})" in md
    figures = {f["key"]: f for f in results["figures"]}
    assert [(t["q"], t["target"]) for t in figures["embedding.call"]["tails"]] == [(99, 2.0)]
    assert [(t["q"], t["target"]) for t in
            figures["embedding.spawn.back_to_back"]["tails"]] == [(90, 1.3)]
    assert f"p99 {report.ratio_text(figures['embedding.call']['tails'][0])} <= 2.0x" in md


def test_a_tail_target_is_checked_on_its_own_and_reported():
    rec = Recorder("t", quick=True)
    fig = rec.figure("k", "op", [1.0] * 98 + [9.0] * 2, [1.0] * 100, "floor", unit="s",
                     target=1.3, tail_targets={99: 2.0})
    assert fig["met"] is True and fig["ratio"] == 1.0
    assert fig["tails"] == [{"q": 99, "ours": 9.0, "floor": 1.0, "ratio": 9.0, "target": 2.0,
                             "met": False}]
    assert report.target_text(fig) == "<= 1.3x: met; p99 9.00x <= 2.0x: missed"
    assert [t["met"] for t in report.targets(fig)] == [True, False]
    with pytest.raises(ValueError):
        rec.figure("r", "rate", [1.0], [1.0], "floor", unit="req/s", tail_targets={99: 2.0})


def test_a_part_measured_pinned_is_pinned_unless_no_pin():
    job = next(j for j in cli.JOBS if j.part == "embedding")
    first = min(os.sched_getaffinity(0))
    assert job.pin(cli.parse_args([])) == first
    assert job.pin(cli.parse_args(["--no-pin"])) is None
    assert job.pin(cli.parse_args(["--pin", str(first)])) == first
    other = next(j for j in cli.JOBS if j.part == "messaging")
    assert other.pin(cli.parse_args([])) is None


def test_only_rejects_an_unknown_part():
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--only", "nope"],
                          capture_output=True, text=True, timeout=30, cwd=REPO)
    assert proc.returncode == 2 and "unknown part" in proc.stderr
