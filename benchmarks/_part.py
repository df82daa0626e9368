"""Runs one part in this (fresh) process: ``python -c`` calls :func:`main` with
the part's name, the output file, quick or not and the progress descriptor.

A fresh process per part: a part that grows thousands of processes leaves
nothing to the next, the start method can differ, and a ``multiprocessing``
child started by the spawn method re-imports no ``__main__`` (there is none).
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
import traceback
import warnings


def main(part: str, out: str, quick: bool, progress_fd: int | None, pin: int | None) -> int:
    if pin is not None:
        os.sched_setaffinity(0, {pin})  # inherited by every process the part starts
    # Forking a process that has threads is what these floors measure, on purpose.
    warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*fork.*")
    from benchmarks.harness import Recorder

    rec = Recorder(part, quick, progress_fd)
    t0 = time.monotonic()
    error = None
    try:
        module = importlib.import_module(f"benchmarks.{part}")
        module.run(rec)
    except BaseException as exc:  # reported in the results; the run goes on
        traceback.print_exc()
        error = f"{type(exc).__name__}: {exc}"
    finally:
        if "runtime" in sys.modules:
            import runtime

            runtime.shutdown()
    data = rec.dump()
    data["seconds"] = round(time.monotonic() - t0, 1)
    data["error"] = error
    with open(out, "w") as f:
        json.dump(data, f)
    return 0 if error is None else 1
