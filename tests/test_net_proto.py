"""The checked-in generated proto code matches what ``python -m proto.regen`` produces now."""
from __future__ import annotations

from pathlib import Path

from proto import regen


def test_checked_in_generated_files_are_not_stale(tmp_path: Path) -> None:
    regen.generate(tmp_path)

    stale = [name for name in regen.OUTPUTS
             if (tmp_path / name).read_bytes() != (regen.PROTO_DIR / name).read_bytes()]

    assert not stale, f"stale generated files {stale}: run `python -m proto.regen` and check them in"


def test_generated_grpc_module_imports_through_the_proto_package() -> None:
    text = (regen.PROTO_DIR / "fledger_pb2_grpc.py").read_text()

    assert "from proto import fledger_pb2 as fledger__pb2" in text
