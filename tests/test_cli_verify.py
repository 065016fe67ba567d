"""`python main.py verify` as a real process: exit 0 and the head on an intact chain, 1 and the height on damage,
2 on user errors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import text

from conftest import raw_connection

ROOT = Path(__file__).resolve().parent.parent


def verify(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "main.py", "verify", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_cli_verify_passes_an_untouched_chain_and_prints_the_head_hash(chain_template, chain_copy):
    result = verify("--db", chain_copy, "--checkpoint", str(chain_template.checkpoint))
    assert (result.returncode, chain_template.heads[-1].hash in result.stdout) == (0, True), result.stderr


def test_cli_verify_json_reports_the_head(chain_template, chain_copy):
    result = verify("--db", chain_copy, "--checkpoint", str(chain_template.checkpoint), "--json")
    report = json.loads(result.stdout)
    assert (result.returncode, report["ok"], report["head_height"], report["head_hash"], report["models_checked"]) \
        == (0, True, 5, chain_template.heads[-1].hash, 6)


def test_cli_verify_fails_a_bad_block_signature_at_its_height(chain_template, chain_copy):
    with raw_connection(chain_copy) as conn:
        conn.execute(text("UPDATE blocks SET signature = :s WHERE height = 3"), {"s": b"\x01" * 64})
    result = verify("--db", chain_copy, "--checkpoint", str(chain_template.checkpoint))
    assert (result.returncode, "height 3" in result.stdout, "signature" in result.stdout) == (1, True, True), \
        result.stdout + result.stderr


def test_cli_verify_json_names_the_height_and_check_of_a_changed_record(chain_template, chain_copy):
    with raw_connection(chain_copy) as conn:
        conn.execute(text("UPDATE update_records SET samples = samples + 1 WHERE height = 2 AND position = 0"))
    result = verify("--db", chain_copy, "--json")
    report = json.loads(result.stdout)
    assert (result.returncode, report["ok"], report["height"], report["check"]) == (1, False, 2, "record-index")


def test_cli_verify_fails_a_deleted_newest_block_with_the_checkpoint(chain_template, chain_copy):
    with raw_connection(chain_copy) as conn:
        for table in ("cosignatures", "model_chunks", "update_records", "blocks"):
            conn.execute(text(f"DELETE FROM {table} WHERE height = 5"))
    result = verify("--db", chain_copy, "--checkpoint", str(chain_template.checkpoint))
    assert (result.returncode, "height 5" in result.stdout) == (1, True), result.stdout + result.stderr


def test_cli_verify_skip_models_does_not_read_weights(chain_template, chain_copy):
    with raw_connection(chain_copy) as conn:
        conn.execute(text("DELETE FROM model_chunks WHERE height = 4"))
    full, skipped = verify("--db", chain_copy), verify("--db", chain_copy, "--skip-models")
    assert (full.returncode, "height 4" in full.stdout, skipped.returncode) == (1, True, 0)


def test_cli_verify_recompute_counts_blocks_without_recorded_updates_as_skipped(chain_template, chain_copy):
    result = verify("--db", chain_copy, "--recompute")
    assert (result.returncode, "recompute: 0 blocks re-aggregated" in result.stdout,
            "without recorded updates" in result.stdout) == (0, True, True), result.stdout + result.stderr


def test_cli_verify_missing_checkpoint_file_is_a_usage_error(tmp_path):
    result = verify("--db", f"sqlite:///{tmp_path}/ledger.db", "--checkpoint", str(tmp_path / "nope.json"))
    assert (result.returncode, "does not exist" in result.stderr) == (2, True)


def test_cli_verify_without_db_is_a_usage_error():
    result = verify()
    assert (result.returncode, "--db" in result.stderr) == (2, True)


@pytest.mark.parametrize("url", ["not a url", "postgresql://u@localhost/x",
                                 "mysql+pymysql://root:@127.0.0.1:1/fledger?charset=utf8mb4",
                                 "sqlite:////nonexistent-dir/sub/ledger.db"],
                         ids=["garbage", "unsupported", "unreachable-mysql", "sqlite-bad-dir"])
def test_cli_verify_bad_database_url_is_a_one_line_usage_error(url):
    result = verify("--db", url)
    lines = len(result.stderr.strip().splitlines())
    assert (result.returncode, lines, "Traceback" in result.stderr) == (2, 1, False), result.stderr
