"""Float32 islands inside mixed-precision (autocast) training.

Under ``torch.autocast`` convolutions and matrix products run in float16/bfloat16. Parts whose
values can leave float16's range (max 65504) or whose rounding changes a decision run in
float32 instead: the prior generator (probability blending, gated fusion), the classification
heads (saliency maps, ROI attention, classifiers) and the denoiser's per-point head (the y_t path,
where the noise schedule's 1/sqrt(alpha_bar) factors live). The losses take float32 outputs.

:func:`float32_forward` decorates a module's ``forward``: autocast is switched off and every
floating-point tensor argument is cast to float32. Outside autocast it only casts (a no-op for
float32 inputs), so CPU runs are unchanged.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch

Fn = TypeVar("Fn", bound=Callable)


def _to_float32(value):
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float32:
        return value.float()
    return value


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (torch >= 2.4 API, with the older fallback)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: one flag per device family
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()
    except RuntimeError:  # a device type autocast does not know (e.g. meta): never on there
        return False


def float32_forward(forward: Fn) -> Fn:
    """Run ``forward(self, *args, **kwargs)`` in float32 with autocast off (see module docstring)."""

    @functools.wraps(forward)
    def wrapper(self, *args, **kwargs):
        device = next((a.device for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if device is None or not autocast_enabled(device.type):
            return forward(self, *map(_to_float32, args), **{k: _to_float32(v) for k, v in kwargs.items()})
        with torch.autocast(device.type, enabled=False):
            return forward(self, *map(_to_float32, args), **{k: _to_float32(v) for k, v in kwargs.items()})

    return wrapper
