"""Command line: ``python -m kv demo`` runs the crash-recovery demo; ``python -m kv
serve`` runs the TCP server until SIGINT or SIGTERM; ``python -m kv top`` shows its
processes (``python -m runtime top``)."""

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
    return top


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["top"]:  # the runtime's own command, on kv's node (runtime.top)
        from runtime.top import main as top

        return top(argv[1:], prog="python -m kv top")
    args = parser().parse_args(argv)
    if args.command in (None, "demo"):
        from .demo import main as demo

        return demo()
    if os.environ.get(_SERVICE) == "1":
        return _serve_service(args)
    return _serve_front(argv)


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
