"""Arrays or tensors in, checked numpy arrays out: the input conversion every plot shares.

Plots accept numpy arrays or torch tensors (on any device; they are copied to the CPU).
"""
from __future__ import annotations

import numpy as np
import torch


def as_numpy(x, name: str, ndim: int | tuple[int, ...] | None = None) -> np.ndarray:
    """``x`` as a float64 numpy array, with a clear ValueError when its rank is wrong."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x, dtype=np.float64)
    allowed = (ndim,) if isinstance(ndim, int) else ndim
    if allowed is not None and arr.ndim not in allowed:
        raise ValueError(f"{name} must have {' or '.join(f'{n}' for n in allowed)} dimensions, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr
