"""The in-process simulator: blocks per round, determinism, resume, FedPer state, both databases, bad input."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from sqlalchemy.engine import make_url

from chain.keys import NodeKey
from chain.verify import verify_chain
from config import Config
from conftest import mysql_admin_execute
from node.ledger import KEY_FILE
from node.sim.simulator import ResumeMismatch, simulate
from storage.engine import sibling_url
from storage.store import LedgerStore

ROOT = Path(__file__).resolve().parent.parent
# A small, fast run: the 2NN on the offline MNIST sample, 4 clients.
SMALL = Config(model="2nn", clients=4, rounds=2, batch_size=64, lr=0.05, seed=3, threads=1, reproducible=True)


def run(cfg: Config, **kw) -> dict:
    return simulate(cfg, progress=False, emit=lambda _line: None, **kw)


def block_model_hashes(url: str) -> list[str]:
    store = LedgerStore(url)
    try:
        return [store.get_block(h)[0].header.model_hash for h in range(store.count())]
    finally:
        store.close()


def test_simulate_writes_one_verified_block_per_round_on_each_backend(backend, tmp_path):
    result = run(replace(SMALL, data_root=str(tmp_path / "root"), db=backend), out_dir=str(tmp_path / "out"))

    store = LedgerStore(backend)
    report = verify_chain(store)
    block, records = store.get_block(2)
    store.close()
    assert (report.head_height, report.head_hash) == (2, result["head_hash"])
    assert len(records) == 4 and block.header.participants == 4
    assert block.header.metrics["accuracy_bp"] == round(result["final_accuracy"] * 10_000)
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {"metrics.csv", "metrics.json", "plot.svg"}


def test_same_seed_gives_same_model_hash_in_every_block(tmp_path):
    first = tmp_path / "a.db"
    second = tmp_path / "b.db"
    run(replace(SMALL, data_root=str(tmp_path / "a"), db=f"sqlite:///{first}"))
    run(replace(SMALL, data_root=str(tmp_path / "b"), db=f"sqlite:///{second}"))
    run(replace(SMALL, data_root=str(tmp_path / "c"), db=f"sqlite:///{tmp_path / 'c.db'}", seed=4))

    assert block_model_hashes(f"sqlite:///{first}") == block_model_hashes(f"sqlite:///{second}")
    assert block_model_hashes(f"sqlite:///{first}")[1:] != block_model_hashes(f"sqlite:///{tmp_path / 'c.db'}")[1:]


@pytest.mark.parametrize("algo", ["fedavg", "fedper"])
def test_resumed_run_ends_with_the_same_head_hash_as_an_uninterrupted_one(tmp_path, algo):
    root = str(tmp_path / "keys")   # same node key for both runs, separate databases
    whole = run(replace(SMALL, algo=algo, rounds=3, data_root=root, db=f"sqlite:///{tmp_path / 'whole.db'}"))
    run(replace(SMALL, algo=algo, rounds=1, data_root=root, db=f"sqlite:///{tmp_path / 'part.db'}"))
    resumed = run(replace(SMALL, algo=algo, rounds=3, data_root=root, db=f"sqlite:///{tmp_path / 'part.db'}"))

    assert resumed["rounds_run"] == 2
    assert resumed["head_hash"] == whole["head_hash"]


def test_resume_with_other_settings_is_refused(tmp_path):
    cfg = replace(SMALL, rounds=1, data_root=str(tmp_path), db=f"sqlite:///{tmp_path / 'l.db'}")
    run(cfg)
    with pytest.raises(ResumeMismatch, match="lr"):
        run(replace(cfg, lr=0.1, rounds=2))


def test_fresh_starts_a_new_chain(tmp_path):
    cfg = replace(SMALL, rounds=1, data_root=str(tmp_path), db=f"sqlite:///{tmp_path / 'l.db'}")
    run(cfg)
    result = run(replace(cfg, lr=0.1), fresh=True)
    assert result["head_height"] == 1 and result["rounds_run"] == 1


def test_fedper_beats_fedavg_on_personalised_accuracy_with_two_classes_per_client(tmp_path):
    base = replace(SMALL, model="2nn", clients=5, rounds=3, partition="shards", shards_per_client=2,
                   local_epochs=2, eval_local=True)
    avg = run(replace(base, algo="fedavg", data_root=str(tmp_path / "avg")))
    per = run(replace(base, algo="fedper", data_root=str(tmp_path / "per")))
    store = LedgerStore(per["db"])
    metrics = store.get_block(3)[0].header.metrics
    store.close()
    assert metrics["personal_accuracy_mean_bp"] == round(per["final_personal_accuracy_mean"] * 10_000)
    avg_store = LedgerStore(avg["db"])
    avg_metrics = avg_store.get_block(3)[0].header.metrics
    avg_store.close()
    assert metrics["personal_accuracy_mean_bp"] > avg_metrics["personal_accuracy_mean_bp"]


# Head hashes the simulator gave before the round engine was shared with the network (commit 7dc37fe), for the node
# key of seed b"fledger-regression", 4 clients, 2 rounds, the default CNN, 1 torch thread, --reproducible. Float
# results depend on the CPU kernels torch picks, so each CPU capability has its own pins, each computed by running
# 7dc37fe itself on such a machine (`git worktree add /tmp/old 7dc37fe`, then `main.py simulate --clients 4
# --rounds 2 --algo A --fraction F --threads 1 --reproducible --fresh --json` with that key in the data root).
BEFORE_THE_ENGINE_BY_CPU = {
    "AVX512": {
        ("fedavg", 1.0): "53b06972cb72c9d8cf125c1d87d54057f27cbb57de5d595122088afcaa9a5142",
        ("fedper", 1.0): "b0b0398d886ad31c34818a9b1440273c3617fb1e0daf2be07d1f4fb7387a3072",
        ("fedavg", 0.5): "367d806827e07b289bf88a39692f25ac3a085f251a554a37386ef9fe4546122c",
    },
    "AVX2": {
        ("fedavg", 1.0): "ceb24d0856afa275c0d086f6278edaf5b5b6635d5948a8228d42b89743141b4c",
        ("fedper", 1.0): "b8d018db82618e71e45c609375a16b2df6238db0f729bdf10de65a0ba77c6e08",
        ("fedavg", 0.5): "d7f2e1da753c40aa739c38390167138d6badeaf1d8d7e69a7a1023b5b5d22cec",
    },
}
BEFORE_THE_ENGINE = BEFORE_THE_ENGINE_BY_CPU["AVX2"]


def pinned_head(algo: str, fraction: float) -> str:
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in BEFORE_THE_ENGINE_BY_CPU:
        pytest.fail(f"no pinned hashes for CPU capability {capability}; compute them with 7dc37fe on this machine "
                    "(see the comment above BEFORE_THE_ENGINE_BY_CPU) and add them", pytrace=False)
    return BEFORE_THE_ENGINE_BY_CPU[capability][(algo, fraction)]


def write_key(root: Path, seed: bytes) -> None:
    root.mkdir(parents=True, exist_ok=True)
    pem = NodeKey.from_seed(seed).private.private_bytes(serialization.Encoding.PEM,
                                                        serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption())
    (root / KEY_FILE).write_bytes(pem)
    (root / KEY_FILE).chmod(0o600)


@pytest.mark.parametrize("algo, fraction", sorted(BEFORE_THE_ENGINE))
def test_one_super_node_keeps_the_head_hash_the_simulator_gave_before_the_engine(tmp_path, algo, fraction):
    write_key(tmp_path, b"fledger-regression")
    cfg = Config(clients=4, rounds=2, algo=algo, fraction=fraction, threads=1, reproducible=True,
                 data_root=str(tmp_path))

    result = run(cfg, fresh=True)

    assert result["head_hash"] == pinned_head(algo, fraction)


def test_two_simulated_super_nodes_each_store_every_block_with_both_cosignatures(tmp_path):
    cfg = replace(SMALL, data_root=str(tmp_path))

    result = run(cfg, super_nodes=2)

    urls = [f"sqlite:///{tmp_path / 'ledger.db'}", f"sqlite:///{tmp_path / 'sn1' / 'ledger.db'}"]
    assert result["heads"] == [result["head_hash"]] * 2
    for url in urls:
        store = LedgerStore(url)
        try:
            assert verify_chain(store).head_hash == result["head_hash"]
            assert [len(store.cosignatures(h)) for h in (1, 2)] == [2, 2]
        finally:
            store.close()


def test_two_simulated_super_nodes_keep_their_ledgers_side_by_side_on_each_backend(backend, tmp_path):
    peer_url = sibling_url(backend, "sn1")
    try:
        result = run(replace(SMALL, data_root=str(tmp_path), db=backend), super_nodes=2)

        for url in (backend, peer_url):
            store = LedgerStore(url)
            try:
                assert verify_chain(store).head_hash == result["head_hash"]
            finally:
                store.close()
    finally:
        if backend.startswith("mysql"):
            server = make_url(peer_url)
            mysql_admin_execute(server, f"DROP DATABASE IF EXISTS `{server.database}`")


def test_two_super_nodes_aggregate_in_two_levels_so_the_models_differ_from_one(tmp_path):
    one = run(replace(SMALL, data_root=str(tmp_path / "one")))
    two = run(replace(SMALL, data_root=str(tmp_path / "two")), super_nodes=2)

    assert block_model_hashes(one["db"])[0] == block_model_hashes(two["db"])[0]
    # averages of float32 averages round differently from one flat average
    assert block_model_hashes(one["db"])[1:] != block_model_hashes(two["db"])[1:]


def test_resuming_two_super_nodes_with_one_is_refused(tmp_path):
    cfg = replace(SMALL, rounds=1, data_root=str(tmp_path))
    run(cfg, super_nodes=2)
    with pytest.raises(ResumeMismatch, match="super_nodes"):
        run(replace(cfg, rounds=2))


def cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "main.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("args, needle", [
    (["--dataset", "imagenet"], "dataset"),
    (["--algo", "fedsgd"], "algo"),
    (["--partition", "zipf"], "partition"),
    (["--clients", "5000"], "clients"),
    (["--partition", "dirichlet", "--alpha", "0"], "alpha"),
    (["--data-dir", "{tmp}/empty"], "--data-dir"),
    (["--db", "mysql+pymysql://root:@127.0.0.1:1/nope"], "MySQL"),
    (["--sn", "0"], "--sn"),
    (["--sn", "5", "--clients", "4"], "--sn"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, args, needle):
    (tmp_path / "empty").mkdir()
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    proc = cli("simulate", "--rounds", "1", "--model", "2nn", "--data-root", str(tmp_path / "root"),
               "--no-progress", *args)

    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert needle in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    db = tmp_path / "root" / "ledger.db"
    assert not db.exists() or LedgerStore(f"sqlite:///{db}").count() == 0


def test_cli_json_summary_is_the_last_line_and_verify_accepts_the_chain(tmp_path):
    proc = cli("simulate", "--rounds", "1", "--model", "2nn", "--clients", "3", "--data-root", str(tmp_path),
               "--no-progress", "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"rounds", "final_accuracy", "wall_s", "head_height", "head_hash", "db"} <= set(summary)

    check = cli("verify", "--db", summary["db"], "--checkpoint", str(tmp_path / "checkpoint.json"))
    assert check.returncode == 0, check.stdout + check.stderr
    assert summary["head_hash"] in check.stdout
