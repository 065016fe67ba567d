"""Tests for fl.robust: known values per rule, clipping, FedAvg parity, spec parsing, determinism and purity."""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pytest

import fl.robust
from fl.aggregate import weighted_average
from fl.robust import RULES, Rule, aggregate, parse_rule

Update = tuple[Mapping[str, np.ndarray], int]


def column(*values: float) -> list[Update]:
    """One single-coordinate float32 update per value, one sample each."""
    return [({"w": np.array([v], np.float32)}, 1) for v in values]


def zero_base(shape: tuple[int, ...] = (1,)) -> dict[str, np.ndarray]:
    return {"w": np.zeros(shape, np.float32)}


def random_updates(seed: int, count: int) -> tuple[dict[str, np.ndarray], list[Update]]:
    rng = np.random.default_rng(seed)
    shapes = {"conv.weight": (4, 3, 3), "conv.bias": (4,), "fc.weight": (10, 7)}
    base = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    base["bn.num_batches_tracked"] = np.array(5, np.int64)
    updates: list[Update] = []
    for _ in range(count):
        weights = {name: (base[name] + rng.standard_normal(shape)).astype(np.float32) for name, shape in shapes.items()}
        weights["bn.num_batches_tracked"] = np.array(rng.integers(5, 50), np.int64)
        updates.append((weights, int(rng.integers(1, 100))))
    return base, updates


def krum_updates() -> list[Update]:
    """Five close updates (0.0 .. 0.4) and two far outliers at inputs 1 and 4; the three central ones score lowest."""
    values = [0.0, 100.0, 0.1, 0.2, -100.0, 0.3, 0.4]
    return [({"w": np.array([v, 1.0], np.float32), "n": np.array(i, np.int64)}, i + 1) for i, v in enumerate(values)]


def krum_base() -> dict[str, np.ndarray]:
    return {"w": np.zeros(2, np.float32), "n": np.array(0, np.int64)}


# --- median and trimmed mean -------------------------------------------------------------------------------------

def test_median_of_odd_count_ignores_the_outlier() -> None:
    out = aggregate(Rule("median"), zero_base(), column(1.0, 100.0, 2.0))
    assert out.weights["w"].tolist() == [2.0] and out.used == [True] * 3 and out.notes == [""] * 3


def test_median_of_even_count_averages_the_two_middle_values() -> None:
    out = aggregate(Rule("median"), zero_base(), column(100.0, 1.0, 3.0, 2.0))
    assert out.weights["w"].tolist() == [2.5]


def test_trimmed_mean_drops_min_and_max_of_every_coordinate() -> None:
    rows = [[1.0, 40.0], [100.0, 10.0], [3.0, -50.0], [2.0, 30.0], [4.0, 20.0]]
    updates: list[Update] = [({"w": np.array(r, np.float32)}, 1) for r in rows]
    out = aggregate(Rule("trimmed-mean", beta=0.2), zero_base((2,)), updates)
    assert out.weights["w"].tolist() == [3.0, 20.0]   # mean of {2, 3, 4} and of {10, 20, 30}


def test_trimmed_mean_refuses_to_trim_every_update() -> None:
    with pytest.raises(ValueError, match="leaving none"):
        aggregate(Rule("trimmed-mean", beta=0.4999999999), zero_base(), column(1.0, 2.0))


@pytest.mark.parametrize("name", ["median", "trimmed-mean"])
def test_column_chunks_do_not_change_the_result(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    base, updates = random_updates(3, 9)
    whole = aggregate(Rule(name), base, updates).weights
    monkeypatch.setattr(fl.robust, "_CHUNK", 5)
    chunked = aggregate(Rule(name), base, updates).weights
    assert all(np.array_equal(whole[k], chunked[k]) for k in base)


# --- multi-krum ---------------------------------------------------------------------------------------------------

def test_multi_krum_selects_the_three_central_updates() -> None:
    out = aggregate(Rule("multi-krum", f=2, m=3), krum_base(), krum_updates())
    assert out.used == [False, False, True, True, False, True, False]
    expected = (0.1 * 3 + 0.2 * 4 + 0.3 * 6) / 13   # sample-weighted mean of inputs 2, 3, 5
    assert np.isclose(out.weights["w"][0], expected) and out.weights["w"][1] == 1.0


def test_multi_krum_notes_every_update_it_leaves_out() -> None:
    out = aggregate(Rule("multi-krum", f=2, m=3), krum_base(), krum_updates())
    for used, note in zip(out.used, out.notes, strict=True):
        assert note.startswith("not selected by multi-krum: score ") != used
    assert "rank 7 of 7 (keeps 3)" in out.notes[1] or "rank 7 of 7 (keeps 3)" in out.notes[4]


def test_multi_krum_breaks_score_ties_by_input_order() -> None:
    out = aggregate(Rule("multi-krum", f=1, m=2), zero_base(), column(1.0, 1.0, 1.0, 1.0, 1.0))
    assert out.used == [True, True, False, False, False]


def test_multi_krum_distance_blocks_do_not_change_the_result(monkeypatch: pytest.MonkeyPatch) -> None:
    base, updates = random_updates(4, 9)
    rule = parse_rule("clip:norm=4+multi-krum:f=2,m=4")
    whole = aggregate(rule, base, updates)
    monkeypatch.setattr(fl.robust, "_CACHE_BYTES", 8 * 70 * 2)   # fc.weight: two updates per block
    blocked = aggregate(rule, base, updates)
    assert whole.notes == blocked.notes and all(np.array_equal(whole.weights[k], blocked.weights[k]) for k in base)


def test_multi_krum_refuses_too_few_updates() -> None:
    with pytest.raises(ValueError, match=r"multi-krum with f=2 needs at least 2f\+3 = 7 updates, got 6"):
        aggregate(Rule("multi-krum", f=2), zero_base(), column(1, 2, 3, 4, 5, 6))


def test_multi_krum_refuses_to_keep_more_updates_than_given() -> None:
    with pytest.raises(ValueError, match="m=4"):
        aggregate(Rule("multi-krum", f=0, m=4), zero_base(), column(1, 2, 3))


def test_integer_tensors_take_the_maximum_of_used_updates_only() -> None:
    out = aggregate(Rule("multi-krum", f=2, m=3), krum_base(), krum_updates())
    assert out.weights["n"].dtype == np.int64 and int(out.weights["n"]) == 5   # input 6 (n=6) was left out


# --- clipping -----------------------------------------------------------------------------------------------------

def test_clip_scales_a_long_delta_to_the_bound() -> None:
    base = {"w": np.array([1.0, 1.0], np.float32)}
    out = aggregate(parse_rule("clip:norm=5"), base, [({"w": np.array([7.0, 9.0], np.float32)}, 1)])  # delta 6, 8
    delta = out.weights["w"].astype(np.float64) - 1.0
    assert np.isclose(np.sqrt(np.sum(np.square(delta))), 5.0) and np.allclose(delta, [3.0, 4.0])
    assert out.notes == ["clipped: norm 10 -> 5"]


def test_clip_leaves_a_short_delta_exactly_alone() -> None:
    base = {"w": np.array([1.0, 1.0], np.float32)}
    update = np.array([1.0, 4.0], np.float32)   # delta norm 3
    out = aggregate(parse_rule("clip:norm=5"), base, [({"w": update}, 1)])
    assert np.array_equal(out.weights["w"], update) and out.notes == [""]


def test_clip_applies_before_the_median() -> None:
    out = aggregate(parse_rule("median+clip:norm=5"), zero_base(), column(10.0, 20.0, 1.0))
    assert out.weights["w"].tolist() == [5.0]   # unclipped the median would be 10
    assert out.notes == ["clipped: norm 10 -> 5", "clipped: norm 20 -> 5", ""]


# --- FedAvg parity, dtypes, errors --------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fedavg_equals_weighted_average_bit_for_bit(seed: int) -> None:
    base, updates = random_updates(seed, 6 + seed)
    out = aggregate(Rule("fedavg"), base, updates)
    expected = weighted_average(updates)
    assert all(np.array_equal(out.weights[k], expected[k]) and out.weights[k].dtype == expected[k].dtype
               for k in base)
    assert out.used == [True] * len(updates)


def test_fedavg_refuses_zero_total_samples() -> None:
    with pytest.raises(ValueError, match="zero samples"):
        aggregate(Rule("fedavg"), zero_base(), [({"w": np.array([1.0], np.float32)}, 0)])


@pytest.mark.parametrize("spec", ["fedavg", "median", "trimmed-mean:beta=0.2", "multi-krum:f=1", "clip:norm=1+median"])
def test_outputs_have_the_base_dtypes_and_are_c_contiguous(spec: str) -> None:
    base = {"h": np.zeros((2, 3), np.float16), "s": np.zeros((3, 2), np.float32).T, "d": np.zeros(4, np.float64),
            "i": np.zeros(2, np.int32), "b": np.zeros(2, np.bool_)}
    rng = np.random.default_rng(7)
    updates: list[Update] = [({k: (v + rng.standard_normal(v.shape)).astype(v.dtype) for k, v in base.items()}, 3)
                             for _ in range(5)]
    out = aggregate(parse_rule(spec), base, updates).weights
    assert list(out) == list(base)
    assert all(out[k].dtype == base[k].dtype and out[k].shape == base[k].shape and out[k].flags.c_contiguous
               for k in base)


@pytest.mark.parametrize(("updates", "fragment"), [
    ([], "no updates"),
    ([({"v": np.zeros(1, np.float32)}, 1)], "different tensor names"),
    ([({"w": np.zeros(2, np.float32)}, 1)], "tensor 'w'"),
    ([({"w": np.zeros(1, np.float32)}, -1)], "non-negative integer"),
    ([({"w": np.zeros(1, np.float32)}, 1.5)], "non-negative integer"),
])
def test_bad_inputs_are_refused(updates: list[Update], fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        aggregate(Rule("median"), zero_base(), updates)


# --- determinism and purity ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", [*RULES, "clip:norm=3+trimmed-mean:beta=0.3", "clip:norm=4+multi-krum:f=2,m=5"])
def test_same_inputs_give_the_same_bits(spec: str) -> None:
    base, updates = random_updates(11, 12)
    first, second = aggregate(parse_rule(spec), base, updates), aggregate(parse_rule(spec), base, updates)
    assert all(np.array_equal(first.weights[k], second.weights[k]) for k in base)
    assert first.used == second.used and first.notes == second.notes


@pytest.mark.parametrize("spec", [*RULES, "clip:norm=2+median", "clip:norm=2+multi-krum"])
def test_inputs_are_not_modified(spec: str) -> None:
    base, updates = random_updates(5, 8)
    base_copy = {k: v.copy() for k, v in base.items()}
    updates_copy = [({k: v.copy() for k, v in w.items()}, s) for w, s in updates]
    aggregate(parse_rule(spec), base, updates)
    assert all(np.array_equal(base[k], base_copy[k]) for k in base)
    assert all(np.array_equal(w[k], wc[k]) and s == sc
               for (w, s), (wc, sc) in zip(updates, updates_copy, strict=True) for k in w)


# --- spec text ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "canonical"), [
    ("fedavg", "fedavg"),
    ("median", "median"),
    ("trimmed-mean", "trimmed-mean"),
    ("trimmed-mean:beta=0.1", "trimmed-mean"),
    ("trimmed-mean:beta=0.2", "trimmed-mean:beta=0.2"),
    ("trimmed-mean:beta=0", "trimmed-mean:beta=0"),
    ("multi-krum", "multi-krum"),
    ("multi-krum:f=2", "multi-krum:f=2"),
    ("multi-krum:m=10", "multi-krum:m=10"),
    ("multi-krum:m=10,f=2", "multi-krum:f=2,m=10"),
    ("clip:norm=5", "clip:norm=5"),
    ("clip:norm=5.0+fedavg", "clip:norm=5"),
    ("clip:norm=5+median", "clip:norm=5+median"),
    ("median+clip:norm=5", "clip:norm=5+median"),
    ("clip:norm=0.25+multi-krum:f=1", "clip:norm=0.25+multi-krum:f=1"),
    (" Multi-Krum : F = 2 , M = 10 + CLIP:Norm=2.5 ", "clip:norm=2.5+multi-krum:f=2,m=10"),
])
def test_spec_is_canonical_and_round_trips(text: str, canonical: str) -> None:
    rule = parse_rule(text)
    assert rule.spec() == canonical and parse_rule(canonical) == rule


@pytest.mark.parametrize("rule", [Rule("fedavg"), Rule("median", clip=1e-5), Rule("trimmed-mean", beta=1 / 3),
                                  Rule("multi-krum", f=0, m=1, clip=123456.75), Rule("fedavg", clip=1e20)])
def test_parse_of_spec_gives_the_rule_back(rule: Rule) -> None:
    assert parse_rule(rule.spec()) == rule


@pytest.mark.parametrize(("text", "fragment"), [
    ("mediun", "unknown aggregation rule 'mediun'; choose fedavg, median"),
    ("", "empty rule name"),
    ("median+", "empty rule name"),
    ("median:beta=0.2", "unknown parameter 'beta' for median"),
    ("multi-krum:k=2", "unknown parameter 'k' for multi-krum"),
    ("trimmed-mean:beta=0.5", "beta must be in [0, 0.5)"),
    ("trimmed-mean:beta=-0.1", "beta must be in [0, 0.5)"),
    ("trimmed-mean:beta=abc", "beta must be a number"),
    ("multi-krum:f=-1", "f must be an integer >= 0"),
    ("multi-krum:m=0", "m must be an integer >= 1"),
    ("multi-krum:f=2.5", "f must be an integer, got '2.5'"),
    ("multi-krum:f=2,f=3", "given twice"),
    ("multi-krum:f", "not key=value"),
    ("clip:norm=0", "clip norm must be a finite number > 0"),
    ("clip:norm=inf+median", "clip norm must be a finite number > 0"),
    ("clip:norm=nan", "clip norm must be a finite number > 0"),
    ("clip", "clip needs a norm"),
    ("clip:norm=1+clip:norm=2", "clip given twice"),
    ("median+trimmed-mean", "two rules joined"),
])
def test_parse_refuses_bad_specs_with_one_helpful_line(text: str, fragment: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_rule(text)
    message = str(caught.value)
    assert fragment in message and "\n" not in message and "clip:norm=C" in message


def test_rule_refuses_parameters_of_another_rule() -> None:
    with pytest.raises(ValueError, match="f applies to multi-krum only"):
        Rule("median", f=2)


@pytest.mark.parametrize("n", [1, 2, 5, 20])
def test_median_gives_numpys_median_bit_for_bit(n: int) -> None:
    rng = np.random.default_rng(n)
    base = {"w": rng.standard_normal((30, 40)).astype(np.float32)}
    updates = [({"w": (base["w"] + rng.standard_normal((30, 40))).astype(np.float32)}, 10) for _ in range(n)]

    out = aggregate(Rule("median"), base, updates)

    stack = np.stack([u["w"].astype(np.float64) for u, _ in updates])
    assert np.array_equal(out.weights["w"], np.median(stack, axis=0).astype(np.float32))
