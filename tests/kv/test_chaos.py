"""python -m kv chaos: a short seeded run finds no violation and injects every kind of
fault; the client's ledger catches the wrong values it is there to catch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kv.chaos import KINDS, MISSING, Ledger

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ------------------------------------------------------------------ the ledger


def written(ledger, name, key):
    value = ledger.value(name, key)
    ledger.sent_put(name, key, value)
    return value


def test_ledger_accepts_the_last_confirmed_write_and_a_missing_key():
    ledger = Ledger(0, 1)
    ledger.ok_create("c0.b0")
    v = written(ledger, "c0.b0", "k0")
    ledger.got("c0.b0", "k0", MISSING)  # (before the PUT's reply: not written yet)
    ledger.ok_put("c0.b0", "k0", v)
    ledger.got("c0.b0", "k0", v)
    ledger.got("c0.b0", "k1", MISSING)
    ledger.ok_delete("c0.b0", "k0")
    ledger.got("c0.b0", "k0", MISSING)
    assert ledger.violations == []
    assert ledger.checked == 4


def test_ledger_flags_a_value_of_an_earlier_incarnation():
    ledger = Ledger(0, 1)
    old = written(ledger, "c0.b0", "k0")
    ledger.ok_put("c0.b0", "k0", old)
    ledger.not_found("c0.b0")  # the bucket died; the client creates it again
    ledger.ok_create("c0.b0")
    ledger.got("c0.b0", "k0", old)
    [violation] = ledger.violations
    assert "earlier incarnation" in violation


def test_ledger_flags_a_value_of_another_bucket_or_key_or_never_written():
    ledger = Ledger(0, 2)
    other = written(ledger, "c0.b1", "k0")
    ledger.ok_put("c0.b1", "k0", other)
    mine = written(ledger, "c0.b0", "k1")
    ledger.ok_put("c0.b0", "k1", mine)
    ledger.got("c0.b0", "k0", other)
    ledger.got("c0.b0", "k0", mine)
    ledger.got("c0.b0", "k0", "3")
    assert ["another bucket" in v for v in ledger.violations] == [True, False, False]
    assert "another key" in ledger.violations[1]
    assert "no client wrote" in ledger.violations[2]


def test_ledger_flags_a_lost_write_but_not_one_whose_effect_is_unknown():
    ledger = Ledger(0, 1)
    first = written(ledger, "c0.b0", "k0")
    ledger.ok_put("c0.b0", "k0", first)
    ledger.got("c0.b0", "k0", MISSING)  # confirmed, then gone with no NOT FOUND: lost
    assert len(ledger.violations) == 1 and "lost write" in ledger.violations[0]
    unsure = written(ledger, "c0.b0", "k1")
    ledger.unsure_put("c0.b0", "k1", unsure)  # ERROR: it may or may not have happened
    ledger.got("c0.b0", "k1", MISSING)
    ledger.got("c0.b0", "k1", unsure)
    assert len(ledger.violations) == 1


# ------------------------------------------------------------------ a run


def chaos(*args, timeout=90):
    return subprocess.run([sys.executable, "-m", "kv", "chaos", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(120)
def test_a_short_seeded_run_injects_every_fault_and_finds_no_violation(tmp_path):
    report = tmp_path / "report.json"
    log = tmp_path / "processes.log"
    # (under the spawn start method a restart takes a fresh interpreter: more seconds
    # for the schedule to reach every kind)
    seconds = "30" if os.environ.get("RUNTIME_START_METHOD") == "spawn" else "8"
    proc = chaos("--seconds", seconds, "--clients", "4", "--seed", "7", "--json", str(report),
                 "--log", str(log))
    assert proc.returncode == 0, proc.stdout + proc.stderr + (
        log.read_text()[-6000:] if log.exists() else "")
    data = json.loads(report.read_text())
    assert data["violations"] == []
    for kind in KINDS:
        assert data["faults"].get(kind, {}).get("n", 0) >= 1, (kind, proc.stdout)
        assert data["faults"][kind]["recovered"] == data["faults"][kind]["n"], proc.stdout
    assert data["values_checked"] > 0 and data["lookups_checked"] > 0
    assert "violations: 0" in proc.stdout
    assert "kv chaos" in proc.stderr  # the progress, one line now and then off a terminal


def test_help_and_a_bad_kind():
    proc = chaos("--help", timeout=30)
    assert proc.returncode == 0
    for option in ("--seconds", "--clients", "--seed", "--port", "--kinds", "--json"):
        assert option in proc.stdout
    proc = chaos("--kinds", "bucket.kill,nope", timeout=30)
    assert proc.returncode == 2
    assert "nope" in proc.stderr
