"""Tests for the round loop: participants, strategies and run_round on real (small) MNIST data with real training."""
from __future__ import annotations

import importlib.util
import json
import threading
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import torch

from fl.aggregate import Accumulator, weighted_average
from fl.data import Dataset, load_dataset
from fl.local import InProcessParticipant, Workbench
from fl.models import build_model, split_keys
from fl.participant import EvalRes, FitIns, FitRes, Participant
from fl.partition import local_split, partition
from fl.server import RoundFailed, evaluate_personalised, run_round
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
                            lambda i, p, r=rnd: strategy.fit_ins(r, i), strategy.aggregator(),
                            max_workers=max_workers)
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
    returned: list[list[str]] = []

    def record_keys(p: Participant, res: FitRes) -> None:   # sees each result before its weights are dropped
        returned.append(sorted(res.weights))

    outcome = run_round(1, participants, {k: initial[k] for k in shared}, lambda i, p: strategy.fit_ins(1, i),
                        strategy.aggregator(), check=record_keys)
    assert sorted(outcome.weights) == sorted(base)
    assert returned == [sorted(base)] * len(participants)
    states = [p.personal_state() for p in participants]
    assert all(sorted(s) == sorted(personal) for s in states)
    assert not np.array_equal(states[0]["fc3.weight"], initial["fc3.weight"])
    assert not np.array_equal(states[0]["fc3.weight"], states[1]["fc3.weight"])


def test_fedper_personal_state_survives_a_restore(mnist: Dataset) -> None:
    strategy = make_strategy("fedper", seed=0, batch_size=16)
    _, initial, shared, participants = make_federation(mnist, strategy)
    outcome = run_round(1, participants, {k: initial[k] for k in shared}, lambda i, p: strategy.fit_ins(1, i),
                        strategy.aggregator())
    trained = participants[0].personal_state()
    before = participants[0].evaluate(outcome.weights)
    participants[0].set_personal_state({k: initial[k] for k in trained})
    assert participants[0].evaluate(outcome.weights) != before
    participants[0].set_personal_state(trained)
    assert participants[0].evaluate(outcome.weights) == before


def test_fedavg_participant_returns_the_whole_model(mnist: Dataset) -> None:
    strategy = make_strategy("fedavg", seed=0, batch_size=16)
    _, initial, shared, participants = make_federation(mnist, strategy, clients=2)
    outcome = run_round(1, participants, initial, lambda i, p: strategy.fit_ins(1, i), strategy.aggregator())
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
    """Returns fixed weights with a receipt."""

    def __init__(self, participant_id: str, value: float, shape=(3,), samples: int = 2) -> None:
        self.participant_id, self.value, self.shape, self.samples = participant_id, value, shape, samples

    def fit(self, weights: dict[str, np.ndarray], ins: FitIns) -> FitRes:
        return FitRes({"w": np.full(self.shape, self.value, np.float32)}, self.samples, {},
                      receipt=f"r-{self.participant_id}")

    def evaluate(self, weights: dict[str, np.ndarray]) -> EvalRes:
        return EvalRes(0.0, self.value, 1)


class Gated(Constant):
    """A Constant that finishes only after ``after`` is set, then sets ``done``: chains of these finish in a
    fixed order whatever the machine's load."""

    def __init__(self, participant_id: str, value: float, after: threading.Event | None, finished: list[str]) -> None:
        super().__init__(participant_id, value)
        self.after, self.done, self.finished = after, threading.Event(), finished

    def fit(self, weights: dict[str, np.ndarray], ins: FitIns) -> FitRes:
        if self.after is not None and not self.after.wait(timeout=30):
            raise TimeoutError(f"{self.participant_id}: the participant after it never finished")
        res = super().fit(weights, ins)
        self.finished.append(self.participant_id)
        self.done.set()
        return res


INS = FitIns(round=1, epochs=1, batch_size=1, lr=0.1, momentum=0.0, seed=0)
GLOBAL = {"w": np.zeros(3, np.float32)}


def test_failing_participant_is_recorded_and_round_completes(mnist: Dataset) -> None:
    strategy = make_strategy("fedavg", seed=0, batch_size=16)
    _, initial, _, participants = make_federation(mnist, strategy, clients=2)
    with_broken = run_round(1, [participants[0], Broken(), participants[1]], initial,
                            lambda i, p: strategy.fit_ins(1, i), strategy.aggregator())
    assert with_broken.failures == [("broken", "RuntimeError: disk on fire")]
    assert [pid for pid, _ in with_broken.results] == ["c0", "c1"]
    without = run_round(1, participants, initial, lambda i, p: strategy.fit_ins(1, [0, 2][i]), strategy.aggregator())
    assert same(with_broken.weights, without.weights)


def test_all_participants_failing_raises_round_failed() -> None:
    with pytest.raises(RoundFailed, match="disk on fire"):
        run_round(1, [Broken(), Broken()], GLOBAL, lambda i, p: INS, Accumulator())


def test_malformed_result_is_rejected_as_a_failure() -> None:
    outcome = run_round(1, [Constant("good", 1.0), Constant("bad", 5.0, shape=(4,))], GLOBAL, lambda i, p: INS,
                        Accumulator())
    assert outcome.weights["w"].tolist() == [1.0, 1.0, 1.0]
    assert outcome.failures[0][0] == "bad" and "shape" in outcome.failures[0][1]


def test_results_fold_in_participant_order_even_when_finishing_backwards() -> None:
    finished: list[str] = []
    backwards: list[Gated] = []
    after = None
    for i in reversed(range(4)):   # p3 finishes first, then p2 (which waits for p3), ..., p0 last
        backwards.insert(0, Gated(f"p{i}", float(i), after, finished))
        after = backwards[0].done
    seen: list[str] = []

    outcome = run_round(1, backwards, GLOBAL, lambda i, p: INS, Accumulator(), max_workers=4,
                        on_result=lambda pid, res: seen.append(pid))

    assert finished == ["p3", "p2", "p1", "p0"]
    assert seen == ["p0", "p1", "p2", "p3"] and [pid for pid, _ in outcome.results] == seen
    assert outcome.weights["w"].tolist() == [1.5, 1.5, 1.5]


def test_results_keep_receipt_and_samples_but_drop_weights() -> None:
    outcome = run_round(1, [Constant("a", 1.0, samples=3)], GLOBAL, lambda i, p: INS, Accumulator())
    _, res = outcome.results[0]
    assert res.receipt == "r-a" and res.samples == 3 and res.weights == {}


def test_check_sees_each_result_with_its_weights_before_they_are_dropped() -> None:
    seen: list[tuple[str, object, list[float]]] = []

    def check(p: Participant, res: FitRes) -> None:
        seen.append((p.participant_id, res.receipt, res.weights["w"].tolist()))

    run_round(1, [Constant("a", 1.0), Constant("b", 2.0)], GLOBAL, lambda i, p: INS, Accumulator(), check=check)

    assert seen == [("a", "r-a", [1.0, 1.0, 1.0]), ("b", "r-b", [2.0, 2.0, 2.0])]


def test_result_refused_by_check_is_a_failure_and_not_folded() -> None:
    def check(p: Participant, res: FitRes) -> None:
        if res.receipt == "r-bad":
            raise ValueError("receipt does not match")

    outcome = run_round(1, [Constant("good", 1.0), Constant("bad", 5.0), Constant("also", 3.0)], GLOBAL,
                        lambda i, p: INS, Accumulator(), check=check)

    assert outcome.failures == [("bad", "rejected: receipt does not match")]
    assert [pid for pid, _ in outcome.results] == ["good", "also"]
    assert outcome.weights["w"].tolist() == [2.0, 2.0, 2.0] and outcome.total_samples == 4


def test_all_results_refused_by_check_raises_round_failed() -> None:
    def refuse(p: Participant, res: FitRes) -> None:
        raise ValueError("receipt does not match")

    with pytest.raises(RoundFailed, match="receipt does not match"):
        run_round(1, [Constant("a", 1.0)], GLOBAL, lambda i, p: INS, Accumulator(), check=refuse)


def test_round_folds_with_the_aggregator_it_is_given() -> None:
    class Last(Accumulator):
        """Keeps only the last result, to tell it from the default average."""

        def add(self, weights: Mapping[str, np.ndarray], samples: int) -> None:
            self.last = dict(weights)
            super().add(weights, samples)

        def result(self) -> dict[str, np.ndarray]:
            return self.last

    outcome = run_round(1, [Constant("a", 1.0), Constant("b", 3.0)], GLOBAL, lambda i, p: INS, Last())

    assert outcome.weights["w"].tolist() == [3.0, 3.0, 3.0]


def test_evaluate_personalised_summarizes_and_skips_failures() -> None:
    summary = evaluate_personalised([Constant("a", 0.5), Broken(), Constant("b", 0.9)], GLOBAL)
    assert summary == {"mean": pytest.approx(0.7), "min": 0.5, "max": 0.9, "count": 2}


def test_select_takes_all_in_order_at_c_one_and_a_seeded_subset_otherwise() -> None:
    ids = [f"c{i}" for i in range(10)]
    assert FedAvg(fraction=1.0, seed=4).select(1, ids) == ids
    strategy = FedAvg(fraction=0.3, seed=4)
    subset = strategy.select(1, ids)
    assert len(subset) == 3 and subset == strategy.select(1, ids) and subset == sorted(subset, key=ids.index)
    assert len({tuple(strategy.select(r, ids)) for r in range(1, 9)}) > 1
    assert len(FedAvg(fraction=0.01, seed=4).select(1, ids)) == 1


def test_select_draws_depend_on_the_seed() -> None:
    ids = [f"c{i}" for i in range(10)]

    draws = {tuple(FedAvg(fraction=0.3, seed=s).select(1, ids)) for s in range(8)}

    assert len(draws) > 1


def test_combine_of_a_single_aggregate_returns_exactly_its_bits() -> None:
    rng = np.random.default_rng(0)
    # float64 values that a weighted average (x * 3 / 3) would not reproduce bit for bit
    aggregate: dict[str, np.ndarray] = {"a": rng.standard_normal(100), "b": rng.standard_normal(7).astype(np.float32),
                 "n": np.array([5], np.int64)}

    combined = FedAvg().combine([(aggregate, 3)])

    assert sorted(combined) == sorted(aggregate)
    assert all(combined[k].dtype == aggregate[k].dtype and combined[k].tobytes() == aggregate[k].tobytes()
               for k in aggregate)


def test_combine_of_several_aggregates_is_their_weighted_average() -> None:
    rng = np.random.default_rng(1)
    aggregates: list[tuple[Mapping[str, np.ndarray], int]] = [
        ({"a": rng.standard_normal(100), "b": rng.standard_normal(7).astype(np.float32), "n": np.array([n], np.int64)},
         samples) for n, samples in ((5, 3), (9, 10), (2, 1))]

    combined = FedAvg().combine(aggregates)

    assert same(combined, weighted_average(aggregates))


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
    """One round of W1 through fl/ reaches exactly the accuracy of bench/plain_fedavg.py (same recipes and seed)."""
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
    participants = [InProcessParticipant(f"c{i}", mnist, p, np.array([], np.int64), bench, keys)
                    for i, p in enumerate(parts)]
    outcome = run_round(1, participants, global_weights, lambda i, p: strategy.fit_ins(1, i), strategy.aggregator())
    load_numpy(bench.model, outcome.weights)
    from fl.train import evaluate

    assert evaluate(bench.model, mnist.test_x, mnist.test_y)["accuracy"] == baseline["final_accuracy"]
