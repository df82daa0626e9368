"""The layering of the code is a contract: ``lint-imports`` checks it (pyproject.toml,
``[tool.importlinter]``): public modules over the node's parts, the value types at
the bottom, no cycles, and ``kv`` on the runtime's public API only."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_import_layers_hold():
    command = shutil.which("lint-imports", path=os.path.dirname(sys.executable))
    assert command, "lint-imports is missing: pip install -e '.[test]'"
    proc = subprocess.run([command], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
