"""Tests for the round loop: participants, strategies and run_round on real (small) MNIST data with real training."""
from __future__ import annotations

import importlib.util
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fl.data import Dataset, load_dataset
from fl.models import build_model, split_keys
from fl.participant import EvalRes, FitIns, FitRes, InProcessParticipant, Participant, Workbench
from fl.partition import local_split, partition
from fl.server import RoundFailed, evaluate_personalized, run_round
from fl.strategy import FedAvg, make_strategy
from fl.weights import load_numpy, state_to_numpy

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mnist() -> Dataset:
    return load_dataset("mnist", None)


def make_federation(dataset: Dataset, strategy: FedAvg, *, clients: int = 4, samples: int = 400, model: str = "2nn"):
    """Seeded initial model, IID parts over the first ``samples`` train images, one Workbench, InProcessParticipants."""
    torch.manual_seed(strategy.seed)
    bench = Workbench(build_model(model))
    global_weights = state_to_numpy(bench.model)
    shared = strategy.shared_keys(bench.model)
    personal_keys = [k for k in global_weights if k not in shared]
    parts = partition(dataset.train_y[:samples].numpy(), clients, "iid", strategy.seed)
    participants = []
    for i, part in enumerate(parts):
        train_idx, test_idx = local_split(part, 0.2, strategy.seed + i)
        personal = {k: global_weights[k] for k in personal_keys} if personal_keys else None
        participants.append(InProcessParticipant(f"c{i}", dataset, train_idx, test_idx, bench, shared, personal))
    return bench, global_weights, shared, participants


def run_loop(dataset: Dataset, name: str, seed: int, rounds: int = 2, max_workers: int = 1):
    strategy = make_strategy(name, seed=seed, lr=0.05, batch_size=16)
    _, global_weights, shared, participants = make_federation(dataset, strategy)
    for rnd in range(1, rounds + 1):
        outcome = run_round(rnd, participants, {k: global_weights[k] for k in shared},
                            lambda i, p, r=rnd: strategy.fit_ins(r, i), max_workers=max_workers)
        global_weights = {**global_weights, **outcome.weights}
    return global_weights, participants


def same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)


@pytest.mark.parametrize("name", ["fedavg", "fedper"])
def test_same_seed_gives_identical_weights(mnist: Dataset, name: str) -> None:
    first, _ = run_loop(mnist, name, seed=1)
    second, _ = run_loop(mnist, name, seed=1)
    assert same(first, second)


def test_other_seed_gives_other_weights(mnist: Dataset) -> None:
    first, _ = run_loop(mnist, "fedavg", seed=1)
    other, _ = run_loop(mnist, "fedavg", seed=2)
    assert not same(first, other)


def test_two_workers_give_bit_identical_weights(mnist: Dataset) -> None:
    serial, _ = run_loop(mnist, "fedavg", seed=3, rounds=1, max_workers=1)
    threaded, _ = run_loop(mnist, "fedavg", seed=3, rounds=1, max_workers=2)
    assert same(serial, threaded)


def test_fedper_shares_only_base_keys_and_keeps_personal_layers(mnist: Dataset) -> None:
    strategy = make_strategy("fedper", seed=0, batch_size=16)
    bench, initial, shared, participants = make_federation(mnist, strategy)
    base, personal = split_keys(bench.model)
    outcome = run_round(1, participants, {k: initial[k] for k in shared}, lambda i, p: strategy.fit_ins(1, i),
                        keep_weights=True)
    assert sorted(outcome.weights) == sorted(base)
    assert all(sorted(res.weights) == sorted(base) for _, res in outcome.results)
    states = [p.personal_state() for p in participants]
    assert all(sorted(s) == sorted(personal) for s in states)
    assert not np.array_equal(states[0]["fc3.weight"], initial["fc3.weight"])
    assert not np.array_equal(states[0]["fc3.weight"], states[1]["fc3.weight"])


def test_fedper_personal_state_survives_a_restore(mnist: Dataset) -> None:
    strategy = make_strategy("fedper", seed=0, batch_size=16)
    _, initial, shared, participants = make_federation(mnist, strategy)
    outcome = run_round(1, participants, {k: initial[k] for k in shared}, lambda i, p: strategy.fit_ins(1, i))
    trained = participants[0].personal_state()
    before = participants[0].evaluate(outcome.weights)
    participants[0].set_personal_state({k: initial[k] for k in trained})
    assert participants[0].evaluate(outcome.weights) != before
    participants[0].set_personal_state(trained)
    assert participants[0].evaluate(outcome.weights) == before


def test_fedavg_participant_returns_the_whole_model(mnist: Dataset) -> None:
    strategy = make_strategy("fedavg", seed=0, batch_size=16)
    _, initial, shared, participants = make_federation(mnist, strategy, clients=2)
    outcome = run_round(1, participants, initial, lambda i, p: strategy.fit_ins(1, i))
    assert sorted(outcome.weights) == sorted(initial) and participants[0].personal_state() is None
    assert outcome.total_samples == sum(p.num_train_samples for p in participants) == 320


class Broken:
    """A participant whose trainer crashes: the round must go on without it."""

    participant_id = "broken"

    def fit(self, weights: dict[str, np.ndarray], ins: FitIns) -> FitRes:
        raise RuntimeError("disk on fire")

    def evaluate(self, weights: dict[str, np.ndarray]) -> EvalRes:
        raise RuntimeError("disk on fire")


class Constant:
    """Returns fixed weights after a delay, with a receipt; lets tests control completion order."""

    def __init__(self, participant_id: str, value: float, delay: float, shape=(3,), samples: int = 2) -> None:
        self.participant_id, self.value, self.delay, self.shape, self.samples = participant_id, value, delay, shape, samples

    def fit(self, weights: dict[str, np.ndarray], ins: FitIns) -> FitRes:
        time.sleep(self.delay)
        return FitRes({"w": np.full(self.shape, self.value, np.float32)}, self.samples, {}, receipt=f"r-{self.participant_id}")

    def evaluate(self, weights: dict[str, np.ndarray]) -> EvalRes:
        return EvalRes(0.0, self.value, 1)


INS = FitIns(round=1, epochs=1, batch_size=1, lr=0.1, momentum=0.0, seed=0)
GLOBAL = {"w": np.zeros(3, np.float32)}


def test_failing_participant_is_recorded_and_round_completes(mnist: Dataset) -> None:
    strategy = make_strategy("fedavg", seed=0, batch_size=16)
    _, initial, _, participants = make_federation(mnist, strategy, clients=2)
    with_broken = run_round(1, [participants[0], Broken(), participants[1]], initial, lambda i, p: strategy.fit_ins(1, i))
    assert with_broken.failures == [("broken", "RuntimeError: disk on fire")]
    assert [pid for pid, _ in with_broken.results] == ["c0", "c1"]
    without = run_round(1, participants, initial, lambda i, p: strategy.fit_ins(1, [0, 2][i]))
    assert same(with_broken.weights, without.weights)
    assert isinstance(Broken(), Participant)


def test_all_participants_failing_raises_round_failed() -> None:
    with pytest.raises(RoundFailed, match="disk on fire"):
        run_round(1, [Broken(), Broken()], GLOBAL, lambda i, p: INS)


def test_malformed_result_is_rejected_as_a_failure() -> None:
    outcome = run_round(1, [Constant("good", 1.0, 0), Constant("bad", 5.0, 0, shape=(4,))], GLOBAL, lambda i, p: INS)
    assert outcome.weights["w"].tolist() == [1.0, 1.0, 1.0]
    assert outcome.failures[0][0] == "bad" and "shape" in outcome.failures[0][1]


def test_results_fold_in_participant_order_even_when_finishing_backwards() -> None:
    slow_first = [Constant(f"p{i}", float(i), delay=0.2 - 0.05 * i) for i in range(4)]
    seen: list[str] = []
    threads: set[str] = set()

    def record(pid: str, res: FitRes) -> None:
        seen.append(pid)
        threads.add(threading.current_thread().name)

    outcome = run_round(1, slow_first, GLOBAL, lambda i, p: INS, max_workers=4, on_result=record)
    assert seen == ["p0", "p1", "p2", "p3"] and [pid for pid, _ in outcome.results] == seen
    assert outcome.weights["w"].tolist() == [1.5, 1.5, 1.5]


def test_results_keep_receipt_and_samples_but_drop_weights() -> None:
    outcome = run_round(1, [Constant("a", 1.0, 0, samples=3)], GLOBAL, lambda i, p: INS)
    _, res = outcome.results[0]
    assert res.receipt == "r-a" and res.samples == 3 and res.weights == {}
    kept = run_round(1, [Constant("a", 1.0, 0)], GLOBAL, lambda i, p: INS, keep_weights=True)
    assert kept.results[0][1].weights["w"].tolist() == [1.0, 1.0, 1.0]


def test_evaluate_personalized_summarizes_and_skips_failures() -> None:
    summary = evaluate_personalized([Constant("a", 0.5, 0), Broken(), Constant("b", 0.9, 0)], GLOBAL)
    assert summary == {"mean": pytest.approx(0.7), "min": 0.5, "max": 0.9, "count": 2}


def test_select_takes_all_in_order_at_c_one_and_a_seeded_subset_otherwise() -> None:
    ids = [f"c{i}" for i in range(10)]
    strategy = make_strategy("fedavg", seed=4)
    assert strategy.select(1, ids, 1.0, 4) == ids
    subset = strategy.select(1, ids, 0.3, 4)
    assert len(subset) == 3 and subset == strategy.select(1, ids, 0.3, 4) and subset == sorted(subset, key=ids.index)
    assert len({tuple(strategy.select(r, ids, 0.3, 4)) for r in range(1, 9)}) > 1
    assert len(strategy.select(1, ids, 0.01, 4)) == 1


def test_fit_ins_seeds_differ_per_client_and_round() -> None:
    strategy = make_strategy("fedper", seed=9, lr=0.05, local_epochs=2)
    seeds = {strategy.fit_ins(r, i).seed for r in range(1, 4) for i in range(10)}
    assert len(seeds) == 30 and strategy.fit_ins(2, 3) == strategy.fit_ins(2, 3)
    assert strategy.fit_ins(1, 0).epochs == 2


def test_params_are_decimal_strings() -> None:
    params = make_strategy("fedavg", lr=0.05, momentum=0.9, fraction=0.1).params()
    assert params["lr"] == "0.05" and params["momentum"] == "0.9" and params["local_epochs"] == "1"
    assert params["strategy"] == "fedavg" and all(isinstance(v, str) for v in params.values())
    assert make_strategy("fedavg", lr=1e-5).params()["lr"] == "0.00001"


def test_unknown_strategy_names_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown strategy 'fedprox'.*fedavg, fedper"):
        make_strategy("fedprox")


def test_fl_reproduces_the_plain_pytorch_baseline(mnist: Dataset, capsys: pytest.CaptureFixture[str]) -> None:
    """One round of W1 through fl/ must reach exactly the accuracy of bench/plain_fedavg.py (same recipes, same seed)."""
    spec = importlib.util.spec_from_file_location("plain_fedavg", ROOT / "bench" / "plain_fedavg.py")
    plain = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plain)
    plain.main(["--rounds", "1", "--json"])
    baseline = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    strategy = make_strategy("fedavg", seed=0, lr=0.05, batch_size=32)
    torch.manual_seed(0)
    bench = Workbench(build_model("cnn"))
    global_weights = state_to_numpy(bench.model)
    parts = partition(mnist.train_y.numpy(), 10, "iid", 0)
    keys = strategy.shared_keys(bench.model)
    participants = [InProcessParticipant(f"c{i}", mnist, p, np.array([], np.int64), bench, keys) for i, p in enumerate(parts)]
    outcome = run_round(1, participants, global_weights, lambda i, p: strategy.fit_ins(1, i))
    load_numpy(bench.model, outcome.weights)
    from fl.train import evaluate

    assert evaluate(bench.model, mnist.test_x, mnist.test_y)["accuracy"] == baseline["final_accuracy"]
