"""Convert between a torch model's state and the plain ``dict[str, numpy.ndarray]`` weights used at every fl
interface."""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch
from torch import nn

from fl.aggregate import Weights


def state_to_numpy(model: nn.Module, keys: Iterable[str] | None = None) -> Weights:
    """Copy the model's state (or only ``keys``) into fresh C-contiguous numpy arrays with torch's dtypes."""
    state = model.state_dict()
    names = list(state) if keys is None else list(keys)
    out: Weights = {}
    for name in names:
        if name not in state:
            raise ValueError(f"model has no state entry {name!r}")
        out[name] = np.array(state[name].detach().cpu().numpy(), order="C", copy=True)
    return out


_NUMPY_DTYPES: dict[torch.dtype, np.dtype] = {}


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """The numpy dtype torch maps ``dtype`` to (cached: building a tensor per check showed up in profiles)."""
    if dtype not in _NUMPY_DTYPES:
        _NUMPY_DTYPES[dtype] = torch.empty((), dtype=dtype).numpy().dtype
    return _NUMPY_DTYPES[dtype]


def load_numpy(model: nn.Module, weights: Mapping[str, np.ndarray], strict_keys: bool = True) -> None:
    """Copy ``weights`` into the model in place, checking every name, shape and dtype first.

    With ``strict_keys`` the names must be exactly the model's state keys; without it ``weights`` may be a
    subset (e.g. FedPer's base layers) but still may not name anything the model lacks.
    """
    state = model.state_dict()
    unknown = sorted(set(weights) - set(state))
    if unknown:
        raise ValueError(f"weights name tensors the model does not have: {unknown[:5]}")
    if strict_keys:
        missing = sorted(set(state) - set(weights))
        if missing:
            raise ValueError(f"weights lack tensors the model needs: {missing[:5]}")
    for name, array in weights.items():
        target = state[name]
        array = np.asarray(array)
        if tuple(array.shape) != tuple(target.shape):
            raise ValueError(f"tensor {name!r} has shape {tuple(array.shape)}, model expects {tuple(target.shape)}")
        expected = _numpy_dtype(target.dtype)
        if array.dtype != expected:
            raise ValueError(f"tensor {name!r} has dtype {array.dtype}, model expects {expected}")
    with torch.no_grad():
        for name, array in weights.items():
            array = np.asarray(array)
            if not (array.flags.c_contiguous and array.flags.writeable):
                array = np.array(array, order="C")  # torch.from_numpy wants a writeable array; copy only then
            state[name].copy_(torch.from_numpy(array))  # one copy, straight into the model's tensor
