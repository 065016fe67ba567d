"""Tests for the malicious edge nodes (fl.attacks): each attack's arithmetic against a stub honest trainer, the
ALIE coalition, parsing, the seeded choice of attackers, and one attacker signing its update on real training."""
from __future__ import annotations

import statistics

import numpy as np
import pytest
import torch

from chain.keys import NodeKey
from chain.tensors import model_hash
from fl.attacks import Attack, Coalition, Trainer, choose_attackers, parse_attack
from fl.data import Dataset, load_dataset
from fl.local import InProcessParticipant, Workbench
from fl.models import build_model
from fl.participant import FitIns, FitRes
from fl.weights import state_to_numpy
from node.engine.edge import EdgeCore

INS = FitIns(round=1, epochs=1, batch_size=16, lr=0.05, momentum=0.0, seed=1234)


def base_weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"w": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=4).astype(np.float32),
            "steps": np.array(5, dtype=np.int64)}


class StubTrainer:
    """An "honest" fit that returns fixed weights (base plus a fixed step) and records what it was asked."""

    def __init__(self, step: float = 0.25, metrics: dict[str, float] | None = None):
        self.step = step
        self.metrics = {"loss": 0.5, "accuracy": 0.75} if metrics is None else metrics
        self.calls: list[tuple[FitIns, np.ndarray | None]] = []

    def __call__(self, weights: dict[str, np.ndarray], ins: FitIns, label_map: np.ndarray | None) -> FitRes:
        self.calls.append((ins, label_map))
        out = {k: (v + np.asarray(self.step, dtype=v.dtype)) if v.dtype.kind == "f" else v + 1
               for k, v in weights.items()}
        return FitRes(out, samples=999, metrics=dict(self.metrics))


def run(attack: str, train: Trainer, weights: dict[str, np.ndarray] | None = None, ins: FitIns = INS,
        samples: int = 40) -> FitRes:
    return Attack(parse_attack(attack)).fit(train, base_weights() if weights is None else weights, ins, 10, samples)


def test_sign_flip_sends_base_minus_scale_times_the_honest_step_in_float32() -> None:
    base, stub = base_weights(), StubTrainer()
    honest = stub(base, INS, None)
    res = run("sign-flip:scale=10", StubTrainer(), base)
    for k in ("w", "b"):
        expected = (base[k].astype(np.float64) - 10 * (honest.weights[k].astype(np.float64)
                                                        - base[k].astype(np.float64))).astype(np.float32)
        assert res.weights[k].dtype == np.float32
        assert res.weights[k].tobytes() == expected.tobytes()
    assert res.weights["steps"] == honest.weights["steps"]   # integer tensors as trained
    assert res.samples == 40 and res.metrics == {"loss": 0.5, "accuracy": 0.75}


def test_scale_boosts_the_honest_step_by_its_factor() -> None:
    base = base_weights()
    res = run("scale:factor=4", StubTrainer(step=0.25), base)
    np.testing.assert_allclose(res.weights["w"], base["w"] + 1.0, rtol=1e-6)


def test_noise_is_seeded_by_the_clients_seed_and_never_trains() -> None:
    base = {"w": np.zeros((200, 500), dtype=np.float32), "b": np.zeros(3, dtype=np.float32)}
    stub = StubTrainer()
    first = run("noise:sigma=0.5", stub, base)
    again = run("noise:sigma=0.5", stub, base)
    other = run("noise:sigma=0.5", stub, base, ins=FitIns(1, 1, 16, 0.05, 0.0, seed=4321))
    assert model_hash(first.weights) == model_hash(again.weights) != model_hash(other.weights)
    assert first.weights["w"].dtype == np.float32 and first.metrics == {}
    assert float(np.std(first.weights["w"])) == pytest.approx(0.5, rel=0.01)
    assert stub.calls == []


def test_nan_sends_all_nan_floating_tensors_without_training() -> None:
    stub = StubTrainer()
    res = run("nan", stub)
    assert np.isnan(res.weights["w"]).all() and np.isnan(res.weights["b"]).all()
    assert res.weights["steps"] == 5 and res.metrics == {} and stub.calls == []


def test_free_ride_returns_the_received_weights_without_training() -> None:
    base, stub = base_weights(), StubTrainer()
    res = run("free-ride", stub, base)
    assert model_hash(res.weights) == model_hash(base) and stub.calls == []
    assert res.weights["w"] is not base["w"]


def test_stale_replays_its_first_update_on_a_later_base() -> None:
    attack, stub = Attack(parse_attack("stale")), StubTrainer()
    first = attack.fit(stub, base_weights(), INS, 10, 40)
    later_base = {k: v * 3 for k, v in base_weights().items()}
    later = attack.fit(stub, later_base, FitIns(2, 1, 16, 0.05, 0.0, seed=9), 10, 40)
    assert model_hash(later.weights) == model_hash(first.weights) == model_hash(stub(base_weights(), INS, None).weights)
    assert len(stub.calls) == 2 and later.metrics == first.metrics   # one by the attack, one above


def test_label_flip_trains_on_the_reversed_label_map() -> None:
    stub = StubTrainer()
    res = run("label-flip", stub)
    (_, label_map), = stub.calls
    assert label_map is not None and label_map.tolist() == [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    assert res.metrics == {"loss": 0.5, "accuracy": 0.75}


def test_metrics_that_are_not_finite_are_dropped() -> None:
    res = run("sign-flip", StubTrainer(metrics={"loss": float("nan"), "accuracy": 0.5}))
    assert res.metrics == {"accuracy": 0.5}


def test_alie_z_for_20_edge_nodes_and_6_attackers() -> None:
    coalition = Coalition(20)
    for share in range(6):
        coalition.join(StubTrainer(), share)
    z = Attack(parse_attack("alie"), coalition).z(coalition)
    assert z == pytest.approx(statistics.NormalDist().inv_cdf(0.75)) and z == pytest.approx(0.674, abs=1e-3)


def test_alie_members_send_one_vector_inside_the_honest_spread_and_train_once_per_round() -> None:
    coalition = Coalition(20)
    stubs = [StubTrainer(step=0.1 * (s + 1), metrics={"loss": float(s)}) for s in range(6)]
    for share, stub in enumerate(stubs):
        coalition.join(stub, share)
    attacks = [Attack(parse_attack("alie"), coalition, share=s) for s in range(6)]
    base = base_weights()
    results = [a.fit(StubTrainer(), base, INS, 10, 40) for a in attacks[:2]]
    assert model_hash(results[0].weights) == model_hash(results[1].weights)
    assert [len(s.calls) for s in stubs] == [1] * 6
    assert results[1].metrics == {"loss": 1.0}   # its own honest fit's metrics
    honest = np.stack([base["w"].astype(np.float64) + np.float32(0.1 * (s + 1)) for s in range(6)])
    sent = results[0].weights["w"].astype(np.float64)
    assert (sent >= honest.min(axis=0) - 1e-6).all() and (sent <= honest.max(axis=0) + 1e-6).all()
    assert (np.abs(sent - honest.mean(axis=0)) > 1e-3).all()   # shifted by z * std, not the mean itself
    attacks[2].fit(StubTrainer(), base, FitIns(2, 1, 16, 0.05, 0.0, seed=5), 10, 40)
    assert [len(s.calls) for s in stubs] == [2] * 6
    seeds = {ins.seed for s in stubs for ins, _ in s.calls[:1]}
    assert len(seeds) == 6   # each member trains with its own seed


def test_alie_needs_a_coalition() -> None:
    with pytest.raises(ValueError, match="Coalition"):
        Attack(parse_attack("alie"))


@pytest.mark.parametrize("text, fragment", [
    ("x", "unknown attack 'x'; choose label-flip, sign-flip[:scale=S]"),
    ("sign-flip:factor=2", "has no parameter 'factor'"),
    ("noise:sigma=abc", "is not a number"),
    ("noise:sigma=0", "sigma must be greater than 0"),
    ("scale:factor=inf", "must be finite"),
    ("alie:n=-1", "n must be a whole number"),
    ("alie:z=-0.5", "z must be at least 0"),
])
def test_a_bad_attack_is_refused_in_one_line_naming_it(text: str, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_attack(text)
    assert fragment in str(info.value) and "\n" not in str(info.value) and "alie[:z=Z,n=N]" in str(info.value)


def test_parse_fills_defaults_and_spells_the_spec_canonically() -> None:
    assert parse_attack("sign-flip:scale=10").text() == "sign-flip:scale=10"
    assert parse_attack("sign-flip").get("scale") == 1.0
    assert parse_attack("alie:n=20").params == (("n", 20.0), ("z", 0.0))
    assert parse_attack("noise:sigma=0.5").text() == "noise:sigma=0.5"
    assert parse_attack("nan").text() == "nan"


def test_choose_attackers_is_seeded() -> None:
    chosen = choose_attackers(0, 20, 0.3)
    assert chosen == choose_attackers(0, 20, 0.3) and len(chosen) == 6 and chosen == sorted(set(chosen))
    assert choose_attackers(1, 20, 0.3) != chosen
    assert choose_attackers(0, 20, 0.0) == [] and choose_attackers(0, 20, 1.0) == list(range(20))


@pytest.fixture(scope="module")
def mnist() -> Dataset:
    return load_dataset("mnist", None)


def edge(dataset: Dataset, attack: Attack | None) -> EdgeCore:
    torch.manual_seed(3)
    bench = Workbench(build_model("2nn"))
    keys = tuple(bench.keys)
    participant = InProcessParticipant("client-000", dataset, np.arange(96), np.arange(0), bench, keys)
    return EdgeCore(participant, NodeKey.from_seed(b"attacker"), share=0, attack=attack)


def test_a_sign_flipping_edge_signs_the_flipped_update_of_its_real_training(mnist: Dataset) -> None:
    honest_edge, bad_edge = edge(mnist, None), edge(mnist, Attack(parse_attack("sign-flip")))
    base = state_to_numpy(honest_edge.participant.workbench.model)
    honest, _, _, _ = honest_edge.fit(base, INS, model_hash(base))
    res, record, update_hash, _ = bad_edge.fit(base, INS, model_hash(base))
    assert record.record.update_hash == update_hash == model_hash(res.weights)
    assert res.samples == 96 == record.record.samples
    for k, b in base.items():
        b64 = b.astype(np.float64)
        expected = (b64 - (honest.weights[k].astype(np.float64) - b64)).astype(b.dtype)
        assert res.weights[k].tobytes() == expected.tobytes(), k
