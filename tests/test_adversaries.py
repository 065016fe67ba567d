"""Malicious edge nodes against the round path: refused updates never take honest ones with them, robust rules
leave attackers out and say so in the block, recorded updates replay bit for bit (`verify --recompute`), and the
network gives the simulator's model hashes under attack. Real ledgers (SQLite and MariaDB), real gRPC."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import text

from chain.encoding import sha256_hex
from chain.updates import AGGREGATE, EXCLUDED, UPDATES_ROOT, excluded_of
from chain.validators import is_membership
from chain.verify import verify_chain
from config import Config, validate
from conftest import raw_connection
from fl.participant import FitIns, FitRes
from network import Network, model_hashes
from network import config as network_config
from node.engine.recompute import RecomputeError, recompute_chain
from node.sim.simulator import Simulation, prepare, simulate
from storage.store import LedgerStore

ROOT = Path(__file__).resolve().parent.parent


def config(root: Path, **over: Any) -> Config:
    """The network tests' settings (offline MNIST sample, the 2NN, 4 clients, 2 rounds) with ``over``, validated."""
    return validate(dataclasses.replace(network_config(root), **over))


class Subset:
    """An attack outside the catalogue: an update holding only some of the shared tensors (once it defined which
    tensors the average had, and every honest update was refused)."""

    def fit(self, train: Any, weights: dict[str, np.ndarray], ins: FitIns, num_classes: int,
            samples: int) -> FitRes:
        first = sorted(weights)[0]
        return FitRes({first: np.zeros_like(weights[first])}, samples, {})


def round_after_genesis(simulation: Simulation):
    simulation.coordinator.genesis(edges=[], validators=simulation.validators)
    return simulation.coordinator.run_round(1)


@pytest.mark.parametrize("record", [False, True], ids=["averaged-per-super-node", "forwarded"])
def test_a_subset_update_is_refused_and_every_honest_update_is_used(tmp_path: Path, record: bool) -> None:
    simulation = prepare(config(tmp_path, record_updates=record), fresh=True, super_nodes=2)
    try:
        attacker = simulation.edges[0]
        attacker.attack = Subset()
        report = round_after_genesis(simulation)
    finally:
        simulation.close()

    assert report.participants == 3
    assert [node_id for node_id, _ in report.excluded] == [attacker.node_id]
    assert "missing" in report.excluded[0][1]
    assert excluded_of(report.block.header.params) == report.excluded


def test_nan_updates_are_refused_with_their_reason_and_the_round_goes_on(tmp_path: Path) -> None:
    result = simulate(config(tmp_path, attack="nan", attackers=0.5, rounds=2), fresh=True, progress=False,
                      emit=lambda *_: None, super_nodes=2)
    store = LedgerStore(result["db"])
    try:
        blocks = [store.get_block(h) for h in range(1, result["head_height"] + 1)]
    finally:
        store.close()

    for block, records in blocks:
        reasons = [why for _, why in excluded_of(block.header.params)]
        assert len(records) == 2 and len(reasons) == 2
        assert all("NaN" in why for why in reasons)
    assert result["final_accuracy"] > 0.5


def test_multi_krum_leaves_a_boosted_sign_flip_out_and_the_block_says_why(tmp_path: Path) -> None:
    cfg = config(tmp_path, clients=6, partition_count=6, attack="sign-flip:scale=10", attackers=1 / 6,
                 aggregate="multi-krum:f=1", record_updates=True)
    simulation = prepare(cfg, fresh=True, super_nodes=2)
    try:
        attacker = next(e for e in simulation.edges if e.attack is not None)
        report = round_after_genesis(simulation)
        simulation.ledger.flush()
        recomputed = recompute_chain(simulation.ledger.store)
    finally:
        simulation.close()

    params = report.block.header.params
    assert params[AGGREGATE] == "multi-krum:f=1"
    assert [node_id for node_id, _ in report.excluded] == [attacker.node_id]
    assert "not selected by multi-krum" in report.excluded[0][1]
    assert params[EXCLUDED] == [list(item) for item in report.excluded]
    assert report.participants == 5
    assert recomputed.blocks == 1


def test_recording_updates_does_not_change_the_model_on_one_super_node(tmp_path: Path) -> None:
    def models(root: Path, **over: Any) -> list[str]:
        result = simulate(config(root, **over), fresh=True, progress=False, emit=lambda *_: None)
        store = LedgerStore(result["db"])
        try:
            return [store.get_block(h)[0].header.model_hash for h in range(result["head_height"] + 1)]
        finally:
            store.close()

    assert models(tmp_path / "plain") == models(tmp_path / "recorded", record_updates=True)


def recompute_cli(url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "main.py", "verify", "--db", url, "--recompute"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def change_one_update_byte(url: str, height: int, fix_digest: bool) -> None:
    """Flip one byte in the middle of the first recorded update's first chunk at ``height``; with ``fix_digest``
    also rewrite the chunk's digest, as someone with write access to the database would."""
    with raw_connection(url) as conn:
        row = conn.execute(text("SELECT position, seq, data FROM recorded_update_chunks WHERE height = :h "
                                "ORDER BY position, seq LIMIT 1"), {"h": height}).one()
        data = bytearray(row.data)
        data[len(data) - 5] ^= 0x01   # inside the last tensor's raw bytes: still a valid blob
        values = {"h": height, "p": row.position, "s": row.seq, "d": bytes(data), "g": sha256_hex(bytes(data))}
        conn.execute(text("UPDATE recorded_update_chunks SET data = :d" + (", digest = :g" if fix_digest else "")
                          + " WHERE height = :h AND position = :p AND seq = :s"), values)


@pytest.mark.parametrize("fix_digest", [False, True], ids=["byte", "byte-and-digest"])
def test_verify_recompute_passes_an_honest_chain_and_names_the_height_of_a_changed_update_byte(
        tmp_path: Path, backend: str, fix_digest: bool) -> None:
    result = simulate(config(tmp_path, db=backend, rounds=3, attack="scale", attackers=0.25,
                             aggregate="trimmed-mean:beta=0.25", record_updates=True),
                      fresh=True, progress=False, emit=lambda *_: None, super_nodes=2)
    store = LedgerStore(backend)
    try:
        assert verify_chain(store).head_height == result["head_height"]
        report = recompute_chain(store)
    finally:
        store.close()
    assert (report.blocks, report.skipped) == (3, 1)
    passed = recompute_cli(backend)
    assert passed.returncode == 0, passed.stderr
    assert "3 blocks re-aggregated" in passed.stdout

    change_one_update_byte(backend, 2, fix_digest)
    failed = recompute_cli(backend)

    assert failed.returncode == 1
    assert "height 2" in failed.stdout + failed.stderr
    store = LedgerStore(backend)
    try:
        verify_chain(store)   # the plain verification does not read updates; only --recompute finds this
        with pytest.raises(RecomputeError, match="height 2"):
            recompute_chain(store)
    finally:
        store.close()


@pytest.mark.slow
def test_attackers_under_median_over_grpc_give_the_model_hashes_of_the_simulator(tmp_path: Path) -> None:
    over = {"attack": "sign-flip:scale=10", "attackers": 0.25, "aggregate": "clip:norm=2+median",
            "record_updates": True}
    network = Network(tmp_path / "net", supernodes=2, edges=4, **over)
    try:
        progress = network.train(2)
        net_models = model_hashes(network.entry.ledger)
        peer = network.sns[1]
        peer_models = model_hashes(peer.ledger)
        recomputed = [recompute_chain(sn.ledger.store).blocks for sn in network.sns]
        head = network.entry.ledger.get_block(network.head().height)[0]
    finally:
        network.close()
    sim = simulate(config(tmp_path / "sim", **over), fresh=True, progress=False, emit=lambda *_: None,
                   super_nodes=2)
    store = LedgerStore(sim["db"])
    try:
        sim_models = [store.get_block(h)[0].header.model_hash for h in range(sim["head_height"] + 1)]
    finally:
        store.close()

    assert [p.participants for p in progress] == [4, 4]
    assert UPDATES_ROOT in head.header.params
    assert net_models == peer_models == sim_models
    assert recomputed == [2, 2]   # the updates reached the other super node with the blocks


def test_a_malicious_edge_node_over_grpc_is_excluded_by_multi_krum_and_the_console_line_says_so(
        tmp_path: Path) -> None:
    network = Network(tmp_path / "net", supernodes=1, edges=5, partition_count=5, clients=5,
                      attack="sign-flip:scale=10", attackers=0.2, aggregate="multi-krum:f=1")
    try:
        attacker = next(en for en in network.ens if en.core.attack is not None)
        progress = network.train(2)
        block = network.block(network.head().height)
    finally:
        network.close()

    assert [p.participants for p in progress] == [4, 4]
    for line in progress:
        assert [node_id for node_id, _ in line.excluded] == [attacker.key.node_id]
    assert [node_id for node_id, _ in excluded_of(block.header.params)] == [attacker.key.node_id]


@pytest.mark.slow
def test_cluster_of_real_processes_under_attack_matches_simulate_and_every_ledger_recomputes(tmp_path: Path) -> None:
    common = ["--rounds", "2", "--model", "2nn", "--seed", "5", "--reproducible", "--attack", "sign-flip:scale=10",
              "--attackers", "0.25", "--aggregate", "clip:norm=2+median", "--record-updates"]
    cluster = subprocess.run([sys.executable, "main.py", "cluster", "--sn", "2", "--en", "4", *common,
                              "--data-root", str(tmp_path / "net")], cwd=ROOT, capture_output=True, text=True,
                             timeout=400)
    simulate_run = subprocess.run([sys.executable, "main.py", "simulate", "--sn", "2", "--clients", "4", *common,
                                   "--threads", "1", "--no-progress", "--data-root", str(tmp_path / "sim")],
                                  cwd=ROOT, capture_output=True, text=True, timeout=400)

    assert cluster.returncode == 0, cluster.stdout[-3000:] + cluster.stderr[-3000:]
    assert simulate_run.returncode == 0, simulate_run.stdout[-3000:] + simulate_run.stderr[-3000:]
    assert "attackers: 1 of 4" in cluster.stdout and "attackers: 1 of 4" in simulate_run.stdout
    ledgers = [tmp_path / "net" / "cluster" / "sn0" / "ledger.db", tmp_path / "net" / "cluster" / "sn1" / "ledger.db",
               tmp_path / "sim" / "ledger.db"]
    models = []
    for db in ledgers:
        store = LedgerStore(f"sqlite:///{db}")
        try:
            models.append([h.model_hash for h in (store.get_block(i)[0].header for i in range(store.count()))
                           if not is_membership(h)])
        finally:
            store.close()
        recomputed = recompute_cli(f"sqlite:///{db}")
        assert recomputed.returncode == 0, recomputed.stdout + recomputed.stderr
        assert "2 blocks re-aggregated" in recomputed.stdout
    assert len(models[0]) == 3 and models[0] == models[1] == models[2]
