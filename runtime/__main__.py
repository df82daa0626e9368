"""Command line: ``python -m runtime top`` shows a live tree of a running node's
processes (see ``runtime.top``)."""

from __future__ import annotations

import sys

USAGE = """usage: python -m runtime top [--node ID] [--once] [--interval S] [--timeout S]

commands:
  top    a live tree of a running node's processes (python -m runtime top --help)
"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["top"]:
        from .top import main as top

        return top(argv[1:])
    if argv[:1] in (["-h"], ["--help"]):
        sys.stdout.write(USAGE)
        return 0
    sys.stderr.write(USAGE)
    return 2


if __name__ == "__main__":
    sys.exit(main())
