"""Peak GPU memory of a training step, estimated on the CPU without a GPU.

The model, its optimizer and a batch are built under PyTorch's ``FakeTensorMode``: tensors
carry shapes, dtypes and devices but no data, so nothing is computed and no memory is taken,
whatever the size. PyTorch's ``MemTracker`` (``torch.distributed._tools.mem_tracker``) follows
every tensor that is alive through two training steps (forward under float16 autocast as on a
T4, backward, AdamW step) and reports the peak by category: parameters, buffers, gradients,
optimizer state, activations and temporaries. The configuration is the GPU's (gradient
checkpointing on at the full size, ``TrainConfig.model_config('cuda')``).

This counts what ``torch.cuda.max_memory_allocated`` counts (tensor bytes), not the CUDA
context, cuDNN workspaces or the caching allocator's fragmentation; :data:`CUDA_OVERHEAD_GB`
is added for those before comparing with a card. Fake tensors live on the CPU device here
(this torch has no CUDA), so autocast follows the CPU's cast policy: convolutions and matrix
products in float16 as on CUDA, a few other ops may differ.
"""
from __future__ import annotations

import torch

GIB = 1024 ** 3
CUDA_OVERHEAD_GB = 1.0  # CUDA context (~0.3-0.5 GiB), cuDNN workspace, allocator fragmentation
T4_USABLE_GB = 14.5  # a 15 GB T4 as torch reports it (total_memory 15.6e9 bytes = 14.6 GiB)


def _fake_roi_retrieval():
    """Stand-ins for the DCG's data-dependent ROI retrieval (top-K cells, boxes, crops), which
    fake tensors cannot run (their values are unknown): the same shapes and dtypes, hence the
    same memory; the crops are cut from the input, which needs no gradient, so a fresh
    tensor of the crop shape costs what ``crop_rois``' gather costs."""
    import models.dcg_model as dcg_model

    def select_cells(scores, k, *args, **kwargs):  # (B, K, 3) cell indices
        return scores.new_zeros(scores.shape[0], k, 3, dtype=torch.long)

    def cells_to_boxes(cells, stride, crop_size, volume_shape):  # (B, K, 6) boxes
        return cells.new_zeros(*cells.shape[:2], 6)

    def crop_rois(volume, boxes, _size=None):  # (B, K, Ch, h, w, d)
        return volume.new_zeros(boxes.shape[0], boxes.shape[1], volume.shape[1], *_size)

    return dcg_model, select_cells, cells_to_boxes, crop_rois


def _unchecked_timesteps(self, t, y: torch.Tensor) -> torch.Tensor:
    """``PriorShiftedDiffusion._as_timesteps`` without its range check (the values of fake
    timesteps are unknown; the real ones are drawn in range)."""
    t = torch.as_tensor(t, dtype=torch.long, device=y.device)
    return t.expand(y.shape[0]) if t.ndim == 0 else t


def estimate_peak(stage: str, input_shape: tuple[int, int, int], preset: str, batch_size: int,
                  profile: str = "full", fake: bool = True) -> dict[str, float]:
    """GiB at the peak of two training steps of ``stage`` (``timing.training_step``) at
    ``batch_size``, by category (parameter, buffer, gradient, optstate, activation, temp,
    other) and ``total``. ``fake``: nothing is computed (module docstring); False runs the same
    steps on real CPU tensors under bfloat16 autocast (2 bytes, as float16) -- the check of
    the fake estimate, affordable at small sizes only."""
    from contextlib import ExitStack
    from unittest import mock

    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    from models.diffusion_process import PriorShiftedDiffusion
    from utils.benchmarking.timing import training_step
    from utils.training.profiles import get_profile

    config = get_profile(profile, input_shape=input_shape, model_preset=preset, batch_size=batch_size)
    dtype = torch.float16 if fake else torch.bfloat16
    with ExitStack() as stack:
        if fake:
            crop = config.model_config("cuda").dcg.crop_size
            module, select_cells, cells_to_boxes, crop_rois = _fake_roi_retrieval()
            stack.enter_context(FakeTensorMode())
            stack.enter_context(mock.patch.object(module, "select_cells", select_cells))
            stack.enter_context(mock.patch.object(module, "cells_to_boxes", cells_to_boxes))
            stack.enter_context(mock.patch.object(module, "crop_rois",
                                                  lambda volume, boxes: crop_rois(volume, boxes, crop)))
            stack.enter_context(mock.patch.object(PriorShiftedDiffusion, "_as_timesteps", _unchecked_timesteps))
        torch.manual_seed(0)
        x = torch.rand(batch_size, 1, *input_shape)
        y = torch.arange(batch_size) % 2
        model, params, step_loss = training_step(stage, config, x, y, "cuda", True, "cpu", amp_dtype=dtype)
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        tracker = MemTracker()
        tracker.track_external(model, optimizer)
        with tracker:
            for i in range(2):  # the second step has the optimizer state and the freed graph of the first
                if i:
                    tracker.reset_mod_stats()
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast("cpu", dtype=dtype):
                    loss = step_loss()
                loss.backward()
                optimizer.step()
        peak = next(iter(tracker.get_tracker_snapshot("peak").values()))
    return {str(getattr(kind, "value", kind)).lower(): value / GIB for kind, value in peak.items()}


def largest_batch(stage: str, input_shape: tuple[int, int, int], preset: str, budget_gb: float,
                  peaks: dict[int, float], limit: int = 64) -> tuple[int, float]:
    """The largest batch (<= ``limit``) whose estimated peak plus :data:`CUDA_OVERHEAD_GB` fits
    ``budget_gb``, and that peak; (0, peak at batch 1) when not even one volume fits.

    ``peaks``: estimated totals (GiB) at two or more batch sizes already measured. The peak
    is affine in the batch (fixed weights, gradients and optimizer state; activations per
    volume), so the line through the smallest and largest of them predicts the answer, which
    is then checked by estimating it (and stepped down while it does not fit)."""
    small, large = min(peaks), max(peaks)
    per_volume = (peaks[large] - peaks[small]) / (large - small)
    fixed = peaks[small] - small * per_volume
    room = budget_gb - CUDA_OVERHEAD_GB - fixed
    if peaks[small] + CUDA_OVERHEAD_GB > budget_gb and small == 1:
        return 0, peaks[small]
    b = limit if per_volume <= 0 else max(1, min(limit, int(room // per_volume)))
    while b >= 1:
        peak = peaks.get(b) or estimate_peak(stage, input_shape, preset, b)["total"]
        if peak + CUDA_OVERHEAD_GB <= budget_gb:
            return b, peak
        b -= 1
    return 0, peaks.get(1) or estimate_peak(stage, input_shape, preset, 1)["total"]
