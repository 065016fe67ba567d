"""Regenerate proto/fledger_pb2*.py and .pyi from proto/fledger.proto: ``python -m proto.regen``."""
from __future__ import annotations

import argparse
import logging
import re
import shutil
import sys
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

PROTO_DIR = Path(__file__).resolve().parent
PROTO_FILE = "fledger.proto"
OUTPUTS = ("fledger_pb2.py", "fledger_pb2.pyi", "fledger_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    """Run protoc on fledger.proto into ``out_dir`` and make the grpc module import ``proto.fledger_pb2``."""
    import grpc_tools
    from grpc_tools import protoc  # imported here: only needed at generation time

    include = str(Path(grpc_tools.__file__).parent / "_proto")
    with tempfile.TemporaryDirectory() as tmp:
        args = ["grpc_tools.protoc", f"-I{PROTO_DIR}", f"-I{include}", f"--python_out={tmp}",
                f"--pyi_out={tmp}", f"--grpc_python_out={tmp}", str(PROTO_DIR / PROTO_FILE)]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {PROTO_DIR / PROTO_FILE}")
        grpc_module = Path(tmp) / "fledger_pb2_grpc.py"
        text = grpc_module.read_text()
        text = re.sub(r"^import fledger_pb2 as fledger__pb2$", "from proto import fledger_pb2 as fledger__pb2",
                      text, flags=re.M)
        grpc_module.write_text(text)
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for name in OUTPUTS:
            shutil.copyfile(Path(tmp) / name, out_dir / name)
            written.append(out_dir / name)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=PROTO_DIR, help="output folder (default: proto/)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for path in generate(args.out):
        log.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
