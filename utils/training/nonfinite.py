"""Name the module where a forward pass first produced a non-finite value.

A NaN/inf loss says little on its own: under float16 autocast it is usually one layer whose
output left float16's range (max 65504) and everything after it inherits the inf/NaN.
:func:`first_nonfinite_module` re-runs the failing computation once with a forward hook on
every submodule and reports the first one (in execution order) whose output held a non-finite
value. The trainer calls it only after a loss went non-finite, so training pays nothing for it.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
from torch import nn


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif hasattr(value, "__dataclass_fields__"):
        for name in value.__dataclass_fields__:
            yield from _tensors(getattr(value, name))


def _nonfinite(value) -> Optional[torch.dtype]:
    """The dtype of the first floating-point tensor in ``value`` with a NaN or inf, else None."""
    for t in _tensors(value):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return t.dtype
    return None


def first_nonfinite_module(model: nn.Module, run: Callable[[], object]) -> Optional[str]:
    """Run ``run()`` (a forward pass through ``model``) with hooks on every submodule and return
    ``"name (Class, dtype)"`` of the first module whose output was non-finite, or None when every
    module output was finite (the loss arithmetic itself overflowed). Hooks are removed on return."""
    found: list[str] = []

    def hook(name: str):
        def check(module, inputs, output):
            if not found:
                dtype = _nonfinite(output)
                if dtype is not None:
                    found.append(f"{name or type(model).__name__} ({type(module).__name__}, "
                                 f"{str(dtype).replace('torch.', '')})")
        return check

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


def nonfinite_message(stage: str, amp: bool, amp_dtype: str, epoch: int, batch: int, loss: torch.Tensor,
                      model: nn.Module, replay: Callable[[], object], autocast: Callable) -> str:
    """The trainer's error text for a non-finite loss of ``stage``: where, and the first module
    whose output was non-finite when the same batch is replayed with the same noise under the
    same ``autocast`` (:func:`first_nonfinite_module`)."""
    with torch.no_grad(), autocast():
        culprit = first_nonfinite_module(model, replay)
    precision = f"{amp_dtype} autocast" if amp else "float32"
    where = (f"first non-finite output: {culprit}" if culprit else
             "every module output was finite (the loss arithmetic overflowed)")
    hint = "; retry with --set amp=False" if amp else "; lower the learning rate or check the inputs"
    return f"[{stage}] epoch {epoch + 1} batch {batch}: loss is {loss.item()} under {precision}; {where}{hint}"
