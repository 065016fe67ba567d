"""Admin console for a super node: `python console.py --ip 127.0.0.1 --port 8080 [-c "status(); chain()"]`."""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from node.console.parse import ConsoleError
from node.console.repl import Console
from node.security.pki import PkiError, TlsCredentials


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="console.py", description="Interactive console of a fledger super node.")
    parser.add_argument("--ip", default="127.0.0.1", help="super node host (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="super node port (default 8080)")
    parser.add_argument("--identity", metavar="DIR",
                        help="operator identity for a secure network: the entry's DATA_ROOT/admin folder")
    parser.add_argument("-c", "--command", metavar="CMDS",
                        help='run ";"-separated commands without a prompt and exit (0 if all succeeded, else 1)')
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug output to stderr")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    identity = None
    if args.identity:
        try:
            identity = TlsCredentials.load(Path(args.identity))
        except PkiError as exc:
            print(f"--identity {args.identity}: {exc}", file=sys.stderr)
            return 2
    with Console(f"{args.ip}:{args.port}", identity=identity) as console:
        try:
            console.probe()
        except ConsoleError as exc:
            print(exc, file=sys.stderr)
            return 2
        try:
            if args.command is not None:
                return console.run_script(args.command)
            return console.repl()
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
