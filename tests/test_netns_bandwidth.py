"""The scenario's bandwidth model checked against the kernel: an entry super node and one edge node in two network
namespaces, their veth link limited to 16 Mbit/s each way by tc tbf, both started `--no-link-shaping` (only compute
is paced; the models cross the real, slow link) under a scenario whose link says 16 Mbit/s. Each round's measured
time, less the proposer's global evaluation (which the time model does not count), must match the virtual clock's
``sim_round_s`` within 10%; and the link must really have been slow, so the check cannot pass without tbf.

One run (about 80 s) serves both tests. ``pytest -s`` prints its numbers; every assertion message carries them."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from netns import (
    NetnsUnavailable,
    QdiscStats,
    model_facts,
    probe_namespaces,
    raw_goodput_mbit,
    shaped_link,
    train_over_link,
    write_scenario,
)

RATE_MBIT = 16.0
ROUNDS = 2
TOLERANCE = 0.10


@dataclass
class Run:
    rows: list[tuple[int, float, float]]   # (round, measured round_s - evaluate_s, sim_round_s)
    goodput_mbit: float                    # plain TCP over the link, before the nodes ran
    stats: list[QdiscStats]                # tbf counters of the SN's end, then the EN's
    model_bytes: int
    compute_s: float                       # the edge's padded training per round
    report: str

    @property
    def wire_s(self) -> float:
        """One model, one way, at the nominal rate."""
        return 8 * self.model_bytes / (RATE_MBIT * 1e6)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Run:
    try:
        probe_namespaces()
    except NetnsUnavailable as exc:
        pytest.skip(f"cannot create network namespaces here: {exc}")
    root = tmp_path_factory.mktemp("netns")
    model_bytes, compute_s = model_facts()
    scenario = write_scenario(root / "scenario.toml", RATE_MBIT)
    with shaped_link(RATE_MBIT) as link:
        goodput = raw_goodput_mbit(link, 2_000_000)
        rounds = train_over_link(link, root, scenario, ROUNDS)
        stats = [link.stats(0), link.stats(1)]
    rows = [(r["round"], r["round_s"] - r["evaluate_s"], r["sim_round_s"]) for r in rounds]
    two_models_s = 2 * 8 * model_bytes / (RATE_MBIT * 1e6)
    lines = [f"round {n}: measured (round_s - evaluate_s) {m:.3f} s, sim_round_s {s:.3f} s, ratio {m / s:.3f}; "
             f"less the {compute_s:.2f} s of padded training {m - compute_s:.3f} s (two models at "
             f"{RATE_MBIT:g} Mbit/s: {two_models_s:.3f} s); evaluate_s {r['evaluate_s']:.3f} s"
             for (n, m, s), r in zip(rows, rounds, strict=True)]
    lines.append(f"plain TCP over the tbf link: {goodput:.2f} Mbit/s of payload (nominal {RATE_MBIT:g}); tbf sent "
                 f"{stats[0].sent_bytes} B from the SN (overlimits {stats[0].overlimits}), {stats[1].sent_bytes} B "
                 f"from the EN (overlimits {stats[1].overlimits}); the model is {model_bytes} B")
    report = "\n".join(lines)
    print("\n" + report)
    return Run(rows, goodput, stats, model_bytes, compute_s, report)


@pytest.mark.slow
def test_models_crossed_a_link_that_tbf_really_limited(run):
    assert [n for n, *_ in run.rows] == list(range(1, ROUNDS + 1)), f"not every round finished:\n{run.report}"
    assert run.goodput_mbit <= RATE_MBIT * 1.02, f"tbf did not hold plain TCP to the rate:\n{run.report}"
    for side in run.stats:
        assert side.sent_bytes >= ROUNDS * run.model_bytes and side.overlimits > 0, \
            f"the models did not all pass a tbf qdisc that held them back:\n{run.report}"
    for n, measured, _ in run.rows:
        assert measured - run.compute_s >= 0.9 * 2 * run.wire_s, \
            f"round {n} moved two models faster than the link allows:\n{run.report}"


@pytest.mark.slow
def test_round_time_under_tbf_is_within_10_percent_of_the_virtual_clock(run):
    assert run.rows, f"no round finished:\n{run.report}"
    for n, measured, sim in run.rows:
        assert abs(measured - sim) <= TOLERANCE * sim, f"round {n} is off the model by more than 10%:\n{run.report}"
