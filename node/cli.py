"""Command-line parsing for main.py: subcommands and the original node flags, each error one line, exit 2."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from chain.checkpoint import Checkpoint, CheckpointError
from chain.verify import VerificationError, verify_chain
from storage.engine import StorageUnavailable

log = logging.getLogger(__name__)


class UsageError(Exception):
    """A user error: printed as one line, exit code 2."""


def _verify_parser(sub) -> None:
    p = sub.add_parser("verify", help="walk a ledger and check every hash, link, signature and model")
    p.add_argument("--db", required=True, help="ledger URL (sqlite:///PATH or mysql+pymysql://...)")
    p.add_argument("--checkpoint", help="signed head checkpoint file written by the node")
    p.add_argument("--skip-models", action="store_true", help="skip the second pass that re-hashes stored weights")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")


def cmd_verify(args: argparse.Namespace) -> int:
    from storage.store import LedgerStore
    checkpoint = None
    if args.checkpoint:
        try:
            checkpoint = Checkpoint.read(args.checkpoint)
        except CheckpointError as exc:
            raise UsageError(str(exc)) from exc
    store = LedgerStore(args.db)
    try:
        report = verify_chain(store, check_models=not args.skip_models, checkpoint=checkpoint)
    except VerificationError as exc:
        if args.json:
            print(json.dumps({"ok": False, "height": exc.height, "check": exc.check, "detail": exc.detail}))
        else:
            print(f"FAIL at height {exc.height}: {exc.check} check failed: {exc.detail}")
        return 1
    finally:
        store.close()
    if args.json:
        print(json.dumps({"ok": True, "head_height": report.head_height, "head_hash": report.head_hash,
                          "blocks": report.blocks, "records": report.records,
                          "models_checked": report.models_checked}))
    else:
        print(f"OK: {report.blocks} blocks, {report.records} update records, {report.models_checked} models "
              f"checked; head height {report.head_height} hash {report.head_hash}")
    return 0


COMMANDS = {"verify": (_verify_parser, cmd_verify)}


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors become one-line UsageErrors (exit 2) instead of usage dumps."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="main.py", description=__doc__)
    sub = parser.add_subparsers(dest="command", parser_class=Parser)
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


def run(argv: Sequence[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        parser = build_parser()
        args = parser.parse_args(list(argv))
        if args.command is None:
            parser.print_help()
            return 2
        return COMMANDS[args.command][1](args)
    except (UsageError, StorageUnavailable, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
