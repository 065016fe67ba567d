"""Entry point: `python main.py simulate|cluster|verify ...`, or a node: `python main.py --port 8080 --nt SN -z`."""
from __future__ import annotations

import sys

from node.cli.main import run

if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))


def main() -> None:
    """Console-script entry point (`fledger ...`)."""
    sys.exit(run(sys.argv[1:]))
