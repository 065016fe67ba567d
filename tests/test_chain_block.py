"""Block headers and update records: a known block hash and signature, round trips, strict parsing, checkpoints."""
from __future__ import annotations

import dataclasses
import json

import pytest

from chain.block import (
    BlockHeader,
    Cosignature,
    MalformedError,
    SignedBlock,
    SignedRecord,
    UpdateRecord,
    build_header,
    records_root,
)
from chain.checkpoint import Checkpoint, CheckpointError
from chain.encoding import ZERO_HASH, canonical_bytes, sha256_hex
from chain.keys import NodeKey

SMALL_MODEL_HASH = "6370e0eecba0f799e967d556786d70b2f03786c4291e308375b34acaab7e7913"   # see test_chain_tensors
PROPOSER = NodeKey.from_seed(b"fledger-test-proposer")
PROPOSER_PUBLIC = "00819a4963a32fb76f9ef128709c9f311a86b2c90294e10b853b69bc364ef5c6"
PROPOSER_ID = "30b06b560f89f4bb43a65e45ac6a8c53"
GENESIS_HASH = "dbed8ed2c875afb8ee6a6a3067f1356165a7cbaac92a7dd8d2b43ade3825601e"
GENESIS_SIGNATURE = ("2597428726daa286a518dd4fc3c86e39d828c7f13adb570cb16f720d641d3269"
                     "706acf5f50527069b5c46a64fa6e7fc8f6a608adee3482bfef53747569a5d905")
TRAINER = NodeKey.from_seed(b"fledger-test-trainer")


def genesis_header() -> BlockHeader:
    return build_header(prev=None, prev_hash=None, timestamp_ms=1_700_000_000_000, round=0, algorithm="fedavg",
                        params={"lr": "0.05"}, model_hash=SMALL_MODEL_HASH, records=[],
                        metrics={"accuracy_bp": 9000}, proposer=PROPOSER)


def a_record(**changes) -> UpdateRecord:
    fields = dict(round=1, trainer_id=TRAINER.node_id, trainer_key=TRAINER.public_hex,
                  base_model_hash=SMALL_MODEL_HASH, update_hash="ab" * 32, samples=600, metrics={"loss_micro": 42})
    fields.update(changes)
    return UpdateRecord(**fields)


# ---- known values -----------------------------------------------------------------------------------------------

def test_seeded_node_key_has_the_known_public_key_and_node_id():
    assert (PROPOSER.public_hex, PROPOSER.node_id) == (PROPOSER_PUBLIC, PROPOSER_ID)


def test_genesis_block_hash_is_the_known_digest():
    block = SignedBlock.create(genesis_header(), PROPOSER)
    assert block.hash == GENESIS_HASH == sha256_hex(block.header_bytes)


def test_genesis_block_signature_is_the_known_deterministic_ed25519_signature():
    assert SignedBlock.create(genesis_header(), PROPOSER).signature.hex() == GENESIS_SIGNATURE


def test_genesis_header_commits_to_the_empty_records_root_and_its_own_model():
    header = genesis_header()
    assert (header.height, header.prev_hash, header.base_model_hash, header.records_root) == \
        (0, ZERO_HASH, SMALL_MODEL_HASH, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")


def test_next_header_links_to_previous_hash_and_model():
    genesis = SignedBlock.create(genesis_header(), PROPOSER)
    records = [SignedRecord.create(a_record(), TRAINER)]
    nxt = build_header(prev=genesis.header, prev_hash=genesis.hash, timestamp_ms=1, round=1, algorithm="fedavg",
                       params={}, model_hash="cd" * 32, records=records, metrics={}, proposer=PROPOSER)
    assert (nxt.height, nxt.prev_hash, nxt.base_model_hash, nxt.records_root, nxt.participants,
            nxt.total_samples) == (1, GENESIS_HASH, SMALL_MODEL_HASH, records_root(records), 1, 600)


# ---- round trips ------------------------------------------------------------------------------------------------

def test_block_header_round_trips_through_bytes():
    header = genesis_header()
    assert BlockHeader.from_bytes(header.to_bytes()) == header


def test_update_record_round_trips_through_bytes():
    record = a_record()
    assert UpdateRecord.from_bytes(record.to_bytes()) == record


def test_signed_record_checks_and_returns_its_record():
    record = a_record()
    assert SignedRecord.create(record, TRAINER).check() == record


def test_checkpoint_round_trips_through_its_file(tmp_path):
    checkpoint = Checkpoint.create(5, GENESIS_HASH, PROPOSER)
    checkpoint.write(tmp_path / "checkpoint.json")
    assert Checkpoint.read(tmp_path / "checkpoint.json") == checkpoint


def test_checkpoint_file_is_written_with_mode_0600(tmp_path):
    Checkpoint.create(5, GENESIS_HASH, PROPOSER).write(tmp_path / "checkpoint.json")
    assert (tmp_path / "checkpoint.json").stat().st_mode & 0o777 == 0o600


def test_checkpoint_signature_is_valid_and_fails_for_another_hash():
    checkpoint = Checkpoint.create(5, GENESIS_HASH, PROPOSER)
    assert checkpoint.valid() and not dataclasses.replace(checkpoint, hash="00" * 32).valid()


@pytest.mark.parametrize("body", ["", "{}", "not json",
                                  '{"height": 1, "hash": "zz", "signer_key": "", "signature": ""}',
                                  '{"height": -1, "hash": "' + "a" * 64 + '", "signer_key": "", "signature": ""}'])
def test_checkpoint_read_refuses_a_malformed_file(tmp_path, body):
    (tmp_path / "cp.json").write_text(body)
    with pytest.raises(CheckpointError):
        Checkpoint.read(tmp_path / "cp.json")


def test_checkpoint_read_names_a_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        Checkpoint.read(tmp_path / "missing.json")


# ---- strict parsing ---------------------------------------------------------------------------------------------

def _header_dict() -> dict:
    return genesis_header().to_dict()


def _without(d: dict, key: str) -> dict:
    return {k: v for k, v in d.items() if k != key}


@pytest.mark.parametrize("field", sorted(_header_dict()))
def test_block_header_from_bytes_refuses_a_missing_field(field):
    with pytest.raises(MalformedError):
        BlockHeader.from_bytes(canonical_bytes(_without(_header_dict(), field)))


def test_block_header_from_bytes_refuses_an_extra_field():
    with pytest.raises(MalformedError, match="unknown field"):
        BlockHeader.from_bytes(canonical_bytes({**_header_dict(), "extra": 1}))


@pytest.mark.parametrize("field,value", [("height", -1), ("height", True), ("prev_hash", "AB" * 32),
                                         ("algorithm", "sgd"), ("metrics", {"acc": "1"}), ("version", 2),
                                         ("proposer_key", "00" * 31)])
def test_block_header_from_bytes_refuses_a_bad_field_value(field, value):
    with pytest.raises(MalformedError, match=field):
        BlockHeader.from_bytes(canonical_bytes({**_header_dict(), field: value}))


def test_update_record_from_bytes_refuses_a_block_header():
    with pytest.raises(MalformedError, match="type"):
        UpdateRecord.from_bytes(genesis_header().to_bytes())


def test_block_header_from_bytes_refuses_non_canonical_bytes():
    pretty = json.dumps(_header_dict(), sort_keys=True, indent=1).encode()
    with pytest.raises(MalformedError):
        BlockHeader.from_bytes(pretty)


def test_signed_block_parses_its_header_once():
    block = SignedBlock.create(genesis_header(), PROPOSER)
    assert (block.header is block.header, block.header == genesis_header()) == (True, True)


def test_signed_record_parses_its_record_once():
    signed = SignedRecord.create(a_record(), TRAINER)
    assert (signed.record is signed.record, signed.record == a_record()) == (True, True)


def test_signed_block_with_a_malformed_header_raises_on_every_access():
    block = SignedBlock(canonical_bytes(_without(_header_dict(), "metrics")), b"\x00" * 64)
    with pytest.raises(MalformedError, match="missing field"):
        _ = block.header
    with pytest.raises(MalformedError, match="missing field"):   # a failed parse is not cached
        _ = block.header


def test_cached_header_leaves_equality_and_hashing_to_the_signed_bytes():
    block = SignedBlock.create(genesis_header(), PROPOSER)
    fresh = SignedBlock(block.header_bytes, block.signature)
    _ = block.header
    assert (block == fresh, hash(block) == hash(fresh)) == (True, True)


def test_signed_block_check_refuses_a_short_signature():
    block = SignedBlock.create(genesis_header(), PROPOSER)
    with pytest.raises(MalformedError, match="64 bytes"):
        SignedBlock(block.header_bytes, block.signature[:63]).check()


def test_signed_block_check_refuses_a_signature_by_another_key():
    header_bytes = genesis_header().to_bytes()
    with pytest.raises(MalformedError, match="bad proposer signature"):
        SignedBlock(header_bytes, TRAINER.sign(header_bytes)).check()


def test_signed_record_check_refuses_a_trainer_id_that_does_not_match_its_key():
    with pytest.raises(MalformedError, match="trainer_id"):
        SignedRecord.create(a_record(trainer_id=PROPOSER.node_id), TRAINER).check()


def test_cosignature_is_valid_only_for_its_height_and_hash():
    cosig = Cosignature.create(3, GENESIS_HASH, TRAINER)
    assert (cosig.valid_for(3, GENESIS_HASH), cosig.valid_for(4, GENESIS_HASH), cosig.valid_for(3, ZERO_HASH)) == \
        (True, False, False)
