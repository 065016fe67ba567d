"""`main.py traces import-fedscale`: convert FedScale's device and behaviour traces into fledger's trace files."""
from __future__ import annotations

import argparse
from pathlib import Path

from node.engine.fedscale import import_fedscale


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def register(sub) -> None:
    """Add `traces` and its subcommands to main.py's subparsers."""
    p = sub.add_parser("traces", help="convert availability and device traces for simulated edges")
    # The sub-subparsers use the same parser class, so their errors stay one-line usage errors too.
    commands = p.add_subparsers(dest="traces_command", metavar="{import-fedscale}", required=True,
                                parser_class=type(p))
    imp = commands.add_parser("import-fedscale", help="convert FedScale's client_device_capacity and "
                                                      "client_behave_trace pickles")
    imp.add_argument("--device", metavar="FILE", help="FedScale device capacity pickle "
                                                      "({id: {computation, communication}})")
    imp.add_argument("--behaviour", metavar="FILE", help="FedScale behaviour trace pickle "
                                                         "({id: {finish_time, active, inactive, ...}})")
    imp.add_argument("--out", metavar="DIR", required=True,
                     help="folder for devices.csv, availability.json and clients.csv")
    imp.add_argument("--allow-pickle", action="store_true",
                     help="load the pickles with the restricted unpickler (plain dicts, lists, strings, numbers)")
    imp.add_argument("--limit", metavar="N", type=_positive_int, help="keep only the first N clients by id")


def cmd_traces(args: argparse.Namespace) -> int:
    """Run a `traces` subcommand and print one summary line.

    A bad trace file raises node.engine.traces.TraceError, a one-line user error that main.py lists in
    USER_ERRORS; it is not wrapped in node.cli.main.UsageError, since importing node.cli.main here would make an
    import cycle (main imports this module), which tests/test_layout.py refuses."""
    if args.traces_command != "import-fedscale":
        raise ValueError(f"unknown traces command {args.traces_command!r}")   # the parser allows no other
    summary = import_fedscale(args.device, args.behaviour, Path(args.out), args.allow_pickle, args.limit)
    parts = [f"{summary['devices']} device rows" if args.device else "",
             f"{summary['availability']} availability traces" if args.behaviour else ""]
    dropped = f" ({summary['dropped_by_limit']} more left out by --limit)" if summary["dropped_by_limit"] else ""
    print(f"imported {summary['clients']} FedScale clients as edges 0..{summary['clients'] - 1}: "
          f"{', '.join(p for p in parts if p)}{dropped}; wrote {', '.join(summary['written'])}")
    return 0
