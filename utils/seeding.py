"""Seeding and device choice for entry points (scripts, notebooks, CLIs) only.

Library code never seeds or reads global random state: it takes an ``np.random.Generator`` or
``torch.Generator`` as an argument. :func:`seed_everything` is for the one place a run starts,
to pin what library code cannot reach (weight initialisation and dropout draw from torch's
global generator; third-party code may use Python's ``random`` or numpy's legacy RNG).
"""
from __future__ import annotations

import os
import random
import warnings

import numpy as np
import torch

DEVICE_ENV_VAR = "MEDISCOPE_DEVICE"
"""Environment variable naming the device (``cpu``, ``cuda``, ``cuda:1``, ``mps``) when the
caller does not."""

NONDETERMINISTIC_WARNING = r".*does not have a deterministic implementation"
"""What torch's warning under ``use_deterministic_algorithms(..., warn_only=True)`` says."""


def seed_everything(seed: int, deterministic: bool = True) -> torch.Generator:
    """Seed every global RNG and choose deterministic kernels; return a seeded generator.

    Sets Python's ``random``, numpy's legacy global RNG, torch's CPU and all CUDA generators,
    ``torch.use_deterministic_algorithms(deterministic, warn_only=True)`` (ops without a
    deterministic kernel warn instead of failing), ``cudnn.deterministic = deterministic``
    and ``cudnn.benchmark = not deterministic``. With ``deterministic`` it also sets
    ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` unless already set, which cuBLAS needs for
    reproducible matrix products on CUDA >= 10.2 (it only takes effect if CUDA has not been
    initialised yet, so call this first). torch's warning that an op has no deterministic
    kernel is then silenced: it comes again at every validation pass (scikit-learn's metrics
    reset Python's once-per-place filter), 119 times in one ``full`` run on a GPU, where the
    3D pooling backwards have none; the README says which ops those are.

    Args:
        seed: integer in ``[0, 2**32)`` (numpy's legacy RNG accepts no more).
        deterministic: trade speed for run-to-run reproducibility on CUDA.

    Returns:
        a new CPU ``torch.Generator`` seeded with ``seed``, to pass to DataLoaders and samplers.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds the CPU and every CUDA device
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    if deterministic:
        warnings.filterwarnings("ignore", message=NONDETERMINISTIC_WARNING, category=UserWarning)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
    return torch.Generator().manual_seed(seed)


def pick_device(prefer: str | None = None) -> torch.device:
    """The device to run on.

    Order: ``prefer`` if given, else the ``MEDISCOPE_DEVICE`` environment variable if set,
    else CUDA when available, else CPU. ``"auto"`` in either place means the last rule.

    Raises:
        ValueError: the requested device is not a valid torch device or is not available
            (e.g. ``"cuda"`` on a machine without a GPU).
    """
    source = "prefer"
    if prefer is None and os.environ.get(DEVICE_ENV_VAR):
        prefer, source = os.environ[DEVICE_ENV_VAR], DEVICE_ENV_VAR
    if prefer is None or prefer.strip().lower() == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(prefer.strip().lower())
    except RuntimeError as err:
        raise ValueError(f"{source}={prefer!r} is not a torch device "
                         "(expected cpu, cuda, cuda:N, mps or auto)") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{source}={prefer!r} asks for CUDA but torch.cuda.is_available() is False")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{source}={prefer!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{source}={prefer!r} asks for MPS but torch.backends.mps.is_available() is False")
    return device


def amp_enabled(device: str | torch.device) -> bool:
    """Whether to use automatic mixed precision (autocast in :func:`amp_dtype`): only on CUDA; CPU runs stay float32."""
    return torch.device(device).type == "cuda"


def amp_dtype(device: str | torch.device) -> str:
    """The autocast dtype for ``device``: ``'bfloat16'`` on GPUs that compute in it natively
    (compute capability >= 8.0: A100, L4, H100; float32's range, no GradScaler needed), else
    ``'float16'`` (T4, P100, V100, CPU): float16 overflows past 65504, so the models keep their
    heads in float32 (``models/precision.py``) and the trainer uses a GradScaler."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8:
        return "bfloat16"
    return "float16"
