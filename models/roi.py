"""Pooling, ROI selection and cropping of the DCG (pure functions, testable on hand-made maps).

GMIC (Shen et al., "An interpretable classifier for high-resolution breast cancer screening
images", MedIA 2021), made 3D and used by ``models/dcg_model.py``:

* :func:`top_t_pool` / :func:`pool_maps`: class activation maps -> logits, top-t% pooling
  (GMIC eq. 2) or the spatial mean.
* :func:`roi_scores`, :func:`select_cells`, :func:`foreground_cells`: the K most salient cells,
  greedily with non-maximum suppression (GMIC section 3.2), among foreground cells.
* :func:`cells_to_boxes`, :func:`crop_rois`: fixed-size crops around the chosen cells, cut by
  one batched ``gather``.

Layouts follow the seed: a batch of volumes is (B, Ch, H, W, D), a saliency map (B, C, h, w, d).
Selection is by index and therefore not differentiable, as in GMIC.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def top_t_pool(maps: torch.Tensor, top_t: float) -> torch.Tensor:
    """Top-t% pooling (GMIC eq. 2): the mean of the ceil(t * N) largest cells of each map.

    Args:
        maps: (B, C, h, w, d) (any number of trailing spatial dims).
        top_t: fraction t in (0, 1]; at least one cell is averaged.
    Returns:
        (B, C)
    """
    flat = maps.flatten(2)  # (B, C, N)
    k = max(1, math.ceil(top_t * flat.shape[-1]))
    return flat.topk(k, dim=-1).values.mean(dim=-1)


def pool_maps(maps: torch.Tensor, pooling: str, top_t: float) -> torch.Tensor:
    """(B, C, h, w, d) -> (B, C) by ``'topt'`` (top_t_pool) or ``'mean'`` (spatial mean)."""
    if pooling == "topt":
        return top_t_pool(maps, top_t)
    if pooling == "mean":
        return maps.flatten(2).mean(dim=-1)
    raise ValueError(f"pooling must be 'topt' or 'mean', got {pooling!r}")


def roi_scores(saliency: torch.Tensor, eps: float = 1e-6,
               weights: torch.Tensor | None = None) -> torch.Tensor:
    """ROI selection score per cell: class maps min-max normalised to [0, 1] per sample and
    class (so no class dominates by scale), then summed over classes (GMIC), or, with
    ``weights``, averaged with those per-sample class weights.

    Args:
        saliency: (B, C, h, w, d)
        weights: optional (B, C) non-negative class weights (e.g. the global class
            probabilities: ``roi_weighting='probs'``).
    Returns:
        (B, h, w, d); a constant map normalises to 0.
    """
    flat = saliency.detach().flatten(2)  # (B, C, N)
    lo = flat.min(dim=-1, keepdim=True).values
    hi = flat.max(dim=-1, keepdim=True).values
    norm = (flat - lo) / (hi - lo).clamp_min(eps)  # (B, C, N) in [0, 1]
    if weights is not None:
        norm = norm * weights.detach().to(norm.dtype)[..., None]
    return norm.sum(dim=1).view(saliency.shape[0], *saliency.shape[2:])


def select_cells(scores: torch.Tensor, num_rois: int, nms_radius: int,
                 valid: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy top-K cells with non-maximum suppression (loop over K only, batched over B).

    Step k picks the highest-scoring cell that is neither chosen nor within Chebyshev distance
    ``nms_radius`` of a chosen cell. When suppression leaves no candidate (a map too small for
    K well separated cells), the best remaining unchosen cell is taken instead, so exactly K
    distinct cells are always returned. Ties go to the lowest flat index (deterministic).

    With ``valid`` (e.g. the foreground cells), invalid cells count as score -inf: every step
    prefers, in this order, a valid unsuppressed cell, a valid suppressed one, an invalid
    unsuppressed one, any unchosen one; so invalid cells are taken only when fewer than K
    valid cells exist, and then by score.

    Args:
        scores: (B, h, w, d)
        num_rois: K <= h * w * d
        nms_radius: suppression radius in cells (0: only no repeats)
        valid: optional (B, h, w, d) bool, the cells allowed as ROIs.
    Returns:
        (B, K, 3) int64 cell indices (i, j, k) in choice order.
    """
    b, *spatial = scores.shape
    n = math.prod(spatial)
    if not 1 <= num_rois <= n:
        raise ValueError(f"num_rois={num_rois} must be in [1, {n}] for a saliency map of "
                         f"shape {tuple(spatial)}")
    device = scores.device
    flat = scores.reshape(b, n)  # (B, N)
    grid = torch.stack(torch.meshgrid(*[torch.arange(s, device=device) for s in spatial],
                                      indexing="ij"), dim=-1).view(n, 3)  # (N, 3)
    chosen = torch.zeros(b, n, dtype=torch.bool, device=device)
    suppressed = torch.zeros_like(chosen)
    rows = torch.arange(b, device=device)
    ok = None if valid is None else valid.reshape(b, n).to(device=device, dtype=torch.bool)
    picks = []
    for _ in range(num_rois):
        free = ~chosen
        tiers = [free & ~suppressed, free] if ok is None else \
            [free & ok & ~suppressed, free & ok, free & ~suppressed, free]  # best first
        pick = flat.masked_fill(~tiers[-1], float("-inf")).argmax(dim=1)  # (B,)
        for tier in reversed(tiers[:-1]):
            candidate = flat.masked_fill(~tier, float("-inf")).argmax(dim=1)  # (B,)
            pick = torch.where(tier.any(dim=1), candidate, pick)
        picks.append(pick)
        chosen[rows, pick] = True
        dist = (grid[None] - grid[pick][:, None]).abs().amax(dim=-1)  # (B, N) Chebyshev
        suppressed |= dist <= nms_radius
    return grid[torch.stack(picks, dim=1)]  # (B, K, 3)


def foreground_cells(x: torch.Tensor, cell_stride: int, threshold: float,
                     fraction: float) -> torch.Tensor:
    """Which saliency cells cover foreground (batched, no loop): the fraction of voxels of each
    cell's input region whose intensity (mean over channels) exceeds ``threshold``, by average
    pooling with kernel = stride = ``cell_stride``, compared with ``fraction``.

    Args:
        x: (B, Ch, H, W, D) input volumes, each of H, W, D divisible by ``cell_stride``.
        cell_stride: voxels per cell along each axis.
        threshold: voxel intensity above which a voxel is foreground.
        fraction: minimal foreground fraction of a foreground cell.
    Returns:
        (B, H/s, W/s, D/s) bool.
    """
    voxels = (x.detach().float().mean(dim=1, keepdim=True) > threshold).float()  # (B, 1, H, W, D)
    share = F.avg_pool3d(voxels, kernel_size=cell_stride, stride=cell_stride)  # (B, 1, h, w, d)
    return share[:, 0] >= fraction


def cells_to_boxes(cells: torch.Tensor, cell_stride: tuple[int, int, int],
                   crop_size: tuple[int, int, int],
                   volume_shape: tuple[int, int, int]) -> torch.Tensor:
    """Map saliency cells to fixed-size crops centred on the cell centre, clamped inside.

    The centre of cell c along an axis with stride s is (c + 1/2) s voxels; the crop of size r
    starts at floor(centre - r/2), clamped to [0, size - r].

    Args:
        cells: (B, K, 3) int64 cell indices.
        cell_stride: voxels per cell along (H, W, D) of the volume cropped from.
        crop_size: (h, w, d) crop size, each <= the volume size.
        volume_shape: (H, W, D) of the volume cropped from.
    Returns:
        (B, K, 6) int64 half-open boxes (h0, w0, d0, h1, w1, d1).
    """
    stride = torch.tensor(cell_stride, device=cells.device)
    size = torch.tensor(crop_size, device=cells.device)
    limit = torch.tensor(volume_shape, device=cells.device) - size
    if (limit < 0).any():
        raise ValueError(f"crop size {crop_size} exceeds volume {volume_shape}")
    start = torch.div((2 * cells + 1) * stride - size, 2, rounding_mode="floor")
    start = torch.minimum(start.clamp_min(0), limit)  # (B, K, 3)
    return torch.cat([start, start + size], dim=-1).long()


def crop_rois(volume: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Batched crop of equally sized boxes by one ``gather`` (no Python loop over B, K, voxels).

    Args:
        volume: (B, Ch, H, W, D); every channel is cropped.
        boxes: (B, K, 6) int half-open boxes (h0, w0, d0, h1, w1, d1), all of the same size
            and inside the volume.
    Returns:
        (B, K, Ch, h, w, d)
    """
    if volume.dim() != 5 or boxes.dim() != 3 or boxes.shape[-1] != 6 \
            or boxes.shape[0] != volume.shape[0]:
        raise ValueError(f"crop_rois expects volume (B, Ch, H, W, D) and boxes (B, K, 6), got "
                         f"{tuple(volume.shape)} and {tuple(boxes.shape)}")
    b, ch, hh, ww, dd = volume.shape
    k = boxes.shape[1]
    boxes = boxes.long()
    sizes = boxes[..., 3:] - boxes[..., :3]  # (B, K, 3)
    rh, rw, rd = (int(v) for v in sizes[0, 0])
    inside = (boxes[..., :3] >= 0).all() and (boxes[..., 3:] <= torch.tensor(
        [hh, ww, dd], device=boxes.device)).all()
    if not bool((sizes == sizes[0, 0]).all()) or min(rh, rw, rd) < 1 or not bool(inside):
        raise ValueError("crop_rois: boxes must be non-empty, of equal size and inside the "
                         f"volume {(hh, ww, dd)}")
    dev = volume.device
    hi = boxes[..., 0, None] + torch.arange(rh, device=dev)  # (B, K, rh)
    wi = boxes[..., 1, None] + torch.arange(rw, device=dev)  # (B, K, rw)
    di = boxes[..., 2, None] + torch.arange(rd, device=dev)  # (B, K, rd)
    flat_index = (hi[..., :, None, None] * (ww * dd) + wi[..., None, :, None] * dd
                  + di[..., None, None, :])  # (B, K, rh, rw, rd)
    index = flat_index.reshape(b, 1, -1).expand(b, ch, -1)  # (B, Ch, K*rh*rw*rd)
    crops = volume.flatten(2).gather(2, index)  # (B, Ch, K*rh*rw*rd)
    return crops.view(b, ch, k, rh, rw, rd).transpose(1, 2)  # (B, K, Ch, rh, rw, rd)
