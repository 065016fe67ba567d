"""`python -m node.cli.health HOST:PORT [IDENTITY_DIR]`: probe a node with the standard gRPC health service (exit 0
when SERVING). A secure node is probed over mutual TLS with the certificate in IDENTITY_DIR, by default the node's
own (DATA_ROOT/tls, DATA_ROOT from FLEDGER_DATA_ROOT), so a container's HEALTHCHECK works in both modes."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from node.rpc.clients import probe_health
from node.security.pki import PkiError, TlsCredentials


def main(argv: list[str]) -> int:
    target = argv[0] if argv else "127.0.0.1:8080"
    identity = Path(argv[1]) if len(argv) > 1 else Path(os.environ.get("FLEDGER_DATA_ROOT", "fledger-data")) / "tls"
    security = None
    if TlsCredentials.exists(identity):
        try:
            security = TlsCredentials.load(identity)
        except PkiError as exc:
            print(f"health: {exc}", file=sys.stderr)
            return 1
    return 0 if probe_health(target, security=security) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
