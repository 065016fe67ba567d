"""The scenario's bandwidth model checked against the kernel: an entry super node and one edge node in two network
namespaces, their veth link limited to 16 Mbit/s each way by tc tbf, both started `--no-link-shaping` (only compute
is paced; the models cross the real, slow link) under a scenario whose link says 16 Mbit/s. Each round's measured
time, less the proposer's global evaluation (which the time model does not count), must match the virtual clock's
``sim_round_s`` within 10%; and the link must really have been slow, so the test cannot pass without tbf."""
from __future__ import annotations

import pytest
from netns import (DEVICE_GFLOPS, SHARES, NetnsUnavailable, probe_namespaces, raw_goodput_mbit, shaped_link,
                   train_over_link, write_scenario)

RATE_MBIT = 16.0
ROUNDS = 2
TOLERANCE = 0.10
SAMPLES = 4000 // SHARES   # edge share 0 of the offline MNIST sample's 4,000 training images (iid)


@pytest.fixture(scope="module")
def namespaces() -> None:
    try:
        probe_namespaces()
    except NetnsUnavailable as exc:
        pytest.skip(f"cannot create network namespaces here: {exc}")


def model_facts() -> tuple[int, float]:
    """(bytes of the MNIST CNN's encoded weights, seconds of its padded training on the edge's device)."""
    from chain.tensors import encode_weights
    from fl.cost import train_flops_per_sample
    from fl.models import build_model
    model = build_model("cnn")
    weights = {k: v.numpy() for k, v in model.state_dict().items()}
    return len(encode_weights(weights)), SAMPLES * train_flops_per_sample(model, (1, 28, 28)) / (DEVICE_GFLOPS * 1e9)


@pytest.mark.slow
def test_round_time_under_tbf_matches_the_virtual_clock(namespaces, tmp_path):
    # Prepare
    model_bytes, compute_s = model_facts()
    wire_s = 8 * model_bytes / (RATE_MBIT * 1e6)   # one model, one way, at the nominal rate
    scenario = write_scenario(tmp_path / "scenario.toml", RATE_MBIT)
    with shaped_link(RATE_MBIT) as link:
        # Execute
        goodput = raw_goodput_mbit(link, 2_000_000)
        rounds = train_over_link(link, tmp_path, scenario, ROUNDS)
        stats = [link.stats(0), link.stats(1)]

    # Assert
    rows = [(r["round"], r["round_s"] - r["evaluate_s"], r["sim_round_s"], r["evaluate_s"]) for r in rounds]
    report = "\n".join(f"round {n}: measured (round_s - evaluate_s) {m:.3f} s, sim_round_s {s:.3f} s, ratio "
                       f"{m / s:.3f}; link share (measured - {compute_s:.2f} s compute) {m - compute_s:.3f} s vs "
                       f"{2 * wire_s:.3f} s at the nominal rate; evaluate_s {e:.3f} s" for n, m, s, e in rows)
    report += (f"\nraw TCP goodput over the tbf link {goodput:.2f} Mbit/s (nominal {RATE_MBIT:g}); tbf sent "
               f"{stats[0].sent_bytes} B (SN side, overlimits {stats[0].overlimits}) and {stats[1].sent_bytes} B "
               f"(EN side, overlimits {stats[1].overlimits}); model {model_bytes} B")
    print("\n" + report)
    assert [n for n, *_ in rows] == list(range(1, ROUNDS + 1)), f"not every round finished:\n{report}"
    # The shaping was real: the kernel held plain TCP to the rate, every model crossed a tbf qdisc that had to
    # hold packets back, and each round spent at least 90% of two models' time at the rate on the link.
    assert goodput <= RATE_MBIT * 1.02, f"tbf did not limit the link:\n{report}"
    for side in stats:
        assert side.sent_bytes >= ROUNDS * model_bytes and side.overlimits > 0, f"a model bypassed tbf:\n{report}"
    for n, measured, _, _ in rows:
        assert measured - compute_s >= 0.9 * 2 * wire_s, f"round {n} was faster than the link allows:\n{report}"
    # The model: every round within 10% of the virtual clock's prediction.
    for n, measured, sim, _ in rows:
        assert abs(measured - sim) <= TOLERANCE * sim, f"round {n} is off the model by more than 10%:\n{report}"
