"""Command line: ``python -m kv demo`` runs the crash-recovery demo."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kv", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("demo", help="a narrated crash-recovery demo (the default)")
    args = parser.parse_args(argv)
    if args.command in (None, "demo"):
        from .demo import main as demo

        return demo()
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
