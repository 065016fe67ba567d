"""Tests for fl.models and fl.weights: architectures, FedPer key split, seeded init and numpy weight round trips."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fl.models import build_model, default_model_for, split_keys
from fl.weights import load_numpy, state_to_numpy


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_mcmahan_cnn_has_1663370_parameters() -> None:
    assert n_params(build_model("cnn")) == 1_663_370


def test_mcmahan_2nn_has_199210_parameters() -> None:
    assert n_params(build_model("2nn")) == 199_210


@pytest.mark.parametrize(("name", "shape"), [("cnn", (1, 28, 28)), ("2nn", (1, 28, 28)), ("cifar-cnn", (3, 32, 32))])
def test_models_map_a_batch_to_class_logits(name: str, shape: tuple[int, ...]) -> None:
    out = build_model(name, num_classes=10, input_shape=shape)(torch.zeros(2, *shape))
    assert out.shape == (2, 10)


def test_cifar_cnn_carries_batchnorm_buffers() -> None:
    state = build_model("cifar-cnn").state_dict()
    assert state["bn2.num_batches_tracked"].dtype == torch.int64 and "bn2.running_mean" in state


def test_split_keys_puts_the_classifier_in_personal() -> None:
    base, personal = split_keys(build_model("cnn"))
    assert personal == ["fc2.weight", "fc2.bias"]
    assert base == ["conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias", "fc1.weight", "fc1.bias"]


def test_split_keys_keeps_batchnorm_buffers_in_base() -> None:
    base, personal = split_keys(build_model("cifar-cnn"))
    assert "bn2.num_batches_tracked" in base and personal == ["fc3.weight", "fc3.bias"]


def test_same_seed_same_init_other_seed_other_init() -> None:
    torch.manual_seed(5)
    a = state_to_numpy(build_model("2nn"))
    torch.manual_seed(5)
    b = state_to_numpy(build_model("2nn"))
    torch.manual_seed(6)
    c = state_to_numpy(build_model("2nn"))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["fc1.weight"], c["fc1.weight"])


def test_default_models_and_unknown_names() -> None:
    assert default_model_for("mnist") == "cnn" and default_model_for("cifar") == "cifar-cnn"
    with pytest.raises(ValueError, match="unknown model 'resnet'.*cnn, 2nn, cifar-cnn"):
        build_model("resnet")


def test_state_to_numpy_gives_contiguous_copies_with_torch_dtypes() -> None:
    model = build_model("cifar-cnn")
    weights = state_to_numpy(model)
    assert weights["conv1.weight"].dtype == np.float32 and weights["bn2.num_batches_tracked"].dtype == np.int64
    assert all(w.flags.c_contiguous for w in weights.values())
    weights["fc3.bias"][:] = 7.0
    assert not torch.equal(model.fc3.bias.detach(), torch.full((10,), 7.0))


def test_load_numpy_round_trips_into_another_model() -> None:
    torch.manual_seed(1)
    source = state_to_numpy(build_model("cifar-cnn"))
    source["bn2.num_batches_tracked"] = np.array(42, dtype=np.int64)
    target = build_model("cifar-cnn")
    load_numpy(target, source)
    back = state_to_numpy(target)
    assert all(np.array_equal(source[k], back[k]) for k in source)


def test_load_numpy_subset_needs_non_strict_keys() -> None:
    model = build_model("2nn")
    base, _ = split_keys(model)
    subset = {k: np.zeros_like(v) for k, v in state_to_numpy(model, base).items()}
    with pytest.raises(ValueError, match="lack tensors"):
        load_numpy(model, subset)
    load_numpy(model, subset, strict_keys=False)
    assert float(model.fc1.weight.detach().abs().sum()) == 0.0 and float(model.fc3.weight.detach().abs().sum()) > 0.0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda w: w.update({"fc1.bias": np.zeros(3, np.float32)}), "shape"),
        (lambda w: w.update({"fc1.bias": w["fc1.bias"].astype(np.float64)}), "dtype float64"),
        (lambda w: w.update({"extra.weight": np.zeros(1, np.float32)}), "does not have"),
    ],
)
def test_load_numpy_rejects_mismatches(change, message: str) -> None:
    model = build_model("2nn")
    weights = state_to_numpy(model)
    change(weights)
    with pytest.raises(ValueError, match=message):
        load_numpy(model, weights)
