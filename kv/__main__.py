"""Command line: ``python -m kv demo`` runs the crash-recovery demo; ``python -m kv
serve`` runs the TCP server until SIGINT or SIGTERM; ``python -m kv chaos`` runs the
server under load while it injects faults, and checks what the store promises;
``python -m kv top`` shows its processes (``python -m runtime top``)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
from typing import Any

# Set in the service process that ``python -m kv serve`` starts (see _serve_front).
_SERVICE = "KV_SERVE_SERVICE"

SERVE_HELP = """\
Serve the kv store over TCP (the guide's protocol: CREATE, PUT, GET, DELETE, one
command per line), until SIGINT or SIGTERM, sent to this process or to its process
group. Then it stops accepting, answers the complete lines it has read, closes every
connection, stops every process and exits with status 0. Any line-based client
works, e.g. `nc 127.0.0.1 4040`.
"""

CHAOS_HELP = """\
Run the kv tree and the TCP server (as `serve` does, on 127.0.0.1), drive load from
several clients (PUT, GET, DELETE over TCP, each on buckets of its own, each
checking what it reads back against what it wrote), and meanwhile SIGKILL or crash
buckets, the registry, the bucket supervisor, connection processes, the task
supervisor and the acceptor at random intervals. Live progress goes to stderr; at
the end a report (operations, faults by kind, recovery times, the checks) goes to
stdout. Exits with status 1 if any violation was found (a lookup that returns a
bucket known dead, a value that was not written to that bucket since it was
created, a stretch with no request answered, a process, zombie, descriptor or file
left behind), and says which.
"""


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def parser() -> argparse.ArgumentParser:
    from .server import HOST, MAX_CONNECTIONS, MAX_LINE, PORT

    top = argparse.ArgumentParser(prog="python -m kv", description=__doc__)
    sub = top.add_subparsers(dest="command")
    sub.add_parser("demo", help="a narrated crash-recovery demo (the default)")
    sub.add_parser("top", help="a live tree of the running kv node's processes")
    serve = sub.add_parser("serve", help="serve the kv store over TCP", description=SERVE_HELP,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    serve.add_argument("--host", default=HOST,
                       help="the address to listen on (default: %(default)s, this machine "
                            "only; 0.0.0.0 for every interface)")
    env_port = os.environ.get("PORT")
    serve.add_argument("--port", type=_port,
                       default=_port(env_port) if env_port else PORT,
                       help="the TCP port; 0 picks a free one and prints it (default: "
                            f"$PORT if set, else {PORT}; now %(default)s)")
    serve.add_argument("--max-line", type=_positive, default=MAX_LINE, metavar="BYTES",
                       help="the longest request line, in bytes before its newline; a "
                            "longer one gets ERROR and the connection is closed "
                            "(default: %(default)s)")
    serve.add_argument("--max-connections", type=_positive, default=MAX_CONNECTIONS,
                       metavar="N",
                       help="clients served at once (each is a process); one more gets "
                            "ERROR and is closed (default: %(default)s)")
    chaos = sub.add_parser("chaos", help="crash-recovery under load, with checks",
                           description=CHAOS_HELP,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    chaos.add_argument("--seconds", type=_positive_float, default=30.0,
                       help="how long the load and the faults last (default: %(default)s)")
    chaos.add_argument("--clients", type=_positive, default=8,
                       help="clients, each a thread with one connection at a time "
                            "(default: %(default)s)")
    chaos.add_argument("--seed", type=int, default=None,
                       help="makes the faults (kinds, targets, order, intervals) and the "
                            "clients' requests reproducible, timing aside (default: random, "
                            "printed in the report)")
    chaos.add_argument("--port", type=_port, default=0,
                       help="the TCP port on 127.0.0.1 (default: 0, a free one)")
    chaos.add_argument("--buckets", type=_positive, default=4,
                       help="buckets per client (default: %(default)s)")
    chaos.add_argument("--interval", type=_positive_float, default=0.25, metavar="SECONDS",
                       help="mean time between faults (default: %(default)s)")
    chaos.add_argument("--max-gap", type=_positive_float, default=2.0, metavar="SECONDS",
                       help="the longest stretch with no request answered that is not a "
                            "violation (default: %(default)s)")
    chaos.add_argument("--kinds", type=_kinds, default=None, metavar="KIND,...",
                       help="only these faults (default: all of "
                            + ", ".join(_chaos_kinds()) + ")")
    chaos.add_argument("--log", default=None, metavar="FILE",
                       help="keep the processes' log (crash reports) in FILE (default: read "
                            "for restart failures, then removed)")
    chaos.add_argument("--json", default=None, metavar="FILE",
                       help="also write the report as JSON to FILE")
    return top


def _chaos_kinds() -> tuple[str, ...]:
    from .chaos import KINDS

    return KINDS


def _kinds(text: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in kinds if k not in _chaos_kinds()]
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(f"unknown fault kinds: {', '.join(unknown) or text!r}")
    return kinds


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0: {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["top"]:  # the runtime's own command, on kv's node (runtime.top)
        from runtime.top import main as top

        return top(argv[1:], prog="python -m kv top")
    args = parser().parse_args(argv)
    if args.command in (None, "demo"):
        from .demo import main as demo

        return demo()
    if args.command == "chaos":
        return _chaos(args)
    if os.environ.get(_SERVICE) == "1":
        return _serve_service(args)
    return _serve_front(argv)


def _chaos(args: argparse.Namespace) -> int:
    from .chaos import KINDS, Options, run

    return run(Options(seconds=args.seconds, clients=args.clients, seed=args.seed,
                       port=args.port, buckets=args.buckets, interval=args.interval,
                       max_gap=args.max_gap, kinds=args.kinds or KINDS, log=args.log,
                       json=args.json))


def _serve_front(argv: list[str]) -> int:
    """Run the service in a session of its own and pass SIGINT and SIGTERM on to it.

    Why two processes: the runtime's processes end at once when a SIGTERM reaches
    them, and its root then ends the whole node (that is how it cleans up after
    ``timeout`` or a service manager). In a session of its own, the service gets
    the signal only from here, and stops gracefully. If this process dies, the
    service's stdin closes, and it stops too. A second signal kills the service at
    once (SIGKILL); the runtime's root then ends every process of its node and
    removes the node's directory.
    """
    env = dict(os.environ, **{_SERVICE: "1"})
    service = subprocess.Popen([sys.executable, "-m", "kv", *argv], env=env,
                               stdin=subprocess.PIPE, start_new_session=True)
    signals = 0

    def forward(signo: int, frame: Any) -> None:
        nonlocal signals
        signals += 1
        try:
            if signals == 1:
                service.send_signal(signal.SIGTERM)
            else:
                service.kill()
        except OSError:
            pass

    for signo in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signo, forward)
    return service.wait()


def _serve_service(args: argparse.Namespace) -> int:
    import runtime

    from .server import serve

    logging.basicConfig(level=logging.WARNING, format="kv: %(levelname)s %(message)s")

    def ready(address: tuple[str, int]) -> None:
        print(f"kv: accepting connections on {address[0]}:{address[1]}", flush=True)

    # The front process holds our stdin: its end (even by SIGKILL) stops us.
    threading.Thread(target=_stop_at_eof, name="kv-front-watch", daemon=True).start()
    try:
        serve(args.host, args.port, max_line=args.max_line,
              max_connections=args.max_connections, ready=ready)
    except OSError as exc:
        print(f"kv: {exc}", file=sys.stderr, flush=True)
        return 1
    except runtime.ProcessError as exc:
        print(f"kv: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        runtime.shutdown()
    print("kv: stopped", flush=True)
    return 0


def _stop_at_eof() -> None:
    try:
        while os.read(0, 4096):
            pass
    except OSError:
        pass
    os.kill(os.getpid(), signal.SIGTERM)


if __name__ == "__main__":
    sys.exit(main())
