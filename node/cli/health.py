"""`python -m node.cli.health HOST:PORT`: probe a node with the standard gRPC health service (exit 0 when SERVING)."""
from __future__ import annotations

import sys

from node.rpc.clients import probe_health


def main(argv: list[str]) -> int:
    target = argv[0] if argv else "127.0.0.1:8080"
    return 0 if probe_health(target) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
