"""Dual-granularity conditional guidance (DCG) for 3D CT volumes.

The DCG is the frozen guidance network of DiffMIC (Yang et al., MICCAI 2023), itself the
global/local design of GMIC (Shen et al., "An interpretable classifier for high-resolution
breast cancer screening images", MedIA 2021), adapted here from 2D images to 3D volumes.

Layouts follow the seed: a volume is (H, W, D), a batch (B, Ch, H, W, D).

* Global stream: a 3D conv / BatchNorm / ReLU / max-pool encoder (VGG-style, like the
  Keras 3D CNN of the MosMedData example) maps (B, Ch, H, W, D) -> (B, F, h, w, d) with
  stride 16 (a stride-2 stem, then three max pools); a bias-free 1x1x1 conv gives one class
  activation map per class, the saliency (B, C, h, w, d); the global logits are the top-t%
  pooling of each map (GMIC eq. 2: mean of the ceil(t * h * w * d) highest cells), not the
  spatial mean, so that a small lesion that lights up a few cells drives the logit.
* ROI retrieval (GMIC section 3.2, made 3D): each class map is min-max normalised per sample,
  the maps are summed over classes, and the K most salient cells are chosen greedily with
  non-maximum suppression, among FOREGROUND cells only (``roi_foreground``: a cell whose
  input region is air / background, e.g. outside the body, is never a ROI unless fewer than
  K foreground cells exist; see :func:`foreground_cells`); each cell is mapped to a fixed-size crop of the input volume (or of
  a copy at ``roi_scale`` times the in-plane resolution), clamped to lie inside it. Selection
  is by index and therefore not differentiable, as in GMIC.
* Local stream: a small 3D CNN encodes every crop to a vector (B, K, L); gated-attention MIL
  (Ilse et al., ICML 2018, eq. 9) pools the K vectors and a linear layer gives local logits.

``DCG.forward`` returns a ``DCGOutput``; nothing is stored on the module.

Phase-1 objective (:func:`dcg_objective`, measured on AdrenalMNIST3D and the blob test, see
the README): CE(global) + CE(local) with a curriculum over ``progress`` (fraction of phase 1
done). Top-t% pooling of an untrained saliency map trains only the few cells that happen to
be highest (often bright anatomy or air), so the global logits start from mean pooling and
anneal log-linearly to top-t% over the first ``pool_warmup`` of phase 1
(:func:`warmup_top_t`); the local CE, which can only learn from ROIs chosen by an informative
saliency, is switched on at ``local_start`` and ramped to full weight over ``local_ramp``
(:func:`local_ce_weight`). At ``progress = 1`` (the default, inference, validation) the
objective is exactly the design's.

Why BatchNorm and max pooling in the global encoder (measured, see the README's "Model"):
with 64 training phantoms a GroupNorm ResNet with strided convolutions fits the training
split while its held-out AUC stays below 0.5, and the same plain CNN with GroupNorm instead
of BatchNorm does not learn at all, whereas conv / BatchNorm / max-pool blocks reach held-out
AUC 0.74-0.83 at the demo budget. BatchNorm over batches of 4 volumes has poor running
statistics (a known pitfall of BatchNorm with small batches), so the training code recomputes them over the
training split with the current weights before every evaluation and before the guidance is
cached ("precise BN", ``utils.training.precise_bn``); the local encoder (a batch of B * K crops)
keeps GroupNorm.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.plain_config import PlainConfig, TensorFields
from models.precision import float32_forward

# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------

_TUPLE_FIELDS = ("input_shape", "global_channels", "global_blocks", "roi_size",
                 "local_channels", "local_blocks")


@dataclass
class DCGConfig(PlainConfig):
    """Hyperparameters of the DCG; every field is a constructor argument.

    Args:
        num_classes: C, number of classes (2: normal / COVID-19; 5: MosMedData CT-0..CT-4).
        in_channels: Ch, channels of the input volume (1 for CT).
        input_shape: (H, W, D) of the input volume; each must be divisible by the total
            encoder stride (16), so that saliency cells tile the volume exactly.
        global_channels: channels of the four global encoder stages; the stem (3x3x3,
            stride 2) has ``global_channels[0]`` channels and stages 1-3 end with a 2x2x2
            max pool, so the output is (B, global_channels[-1], H/16, W/16, D/16).
        global_blocks: conv-BatchNorm-ReLU layers per global stage (len == len(global_channels)).
        feature_dim: channels of the global feature map; must equal ``global_channels[-1]``
            (stated separately because downstream modules, e.g. the prior generator, size
            themselves from it).
        pooling: how class maps become global logits: ``'topt'`` (top-t% pooling, GMIC) or
            ``'mean'`` (global average pooling; kept only for the benchmark ablation).
        top_t: fraction t of saliency cells averaged by top-t% pooling (at least one cell).
        num_rois: K, number of regions of interest cropped per volume; must not exceed the
            number of saliency cells.
        roi_size: (h, w, d) voxel size of each crop at ``roi_scale == 1``.
        roi_scale: 1 crops from the input volume itself; s > 1 crops (s*h, s*w, d) from a copy
            of the volume at s times the in-plane resolution, ``x_hires`` (B, Ch, sH, sW, D),
            passed to ``forward`` (GMIC: low-resolution saliency, high-resolution crops).
        nms_radius: non-maximum suppression radius in saliency cells (Chebyshev distance): a
            cell within ``nms_radius`` of an already chosen cell is skipped, so 1 suppresses
            the 3x3x3 neighbourhood and 0 only forbids choosing the same cell twice.
        local_channels: channels of the local encoder stages (stem has local_channels[0]
            channels, stride 1; stages strides (1, 2, 2, ...)).
        local_blocks: bottleneck residual blocks per local stage.
        local_dim: L, dimension of each ROI vector; must equal ``local_channels[-1]``.
        attention_dim: hidden size of the gated-attention MIL (Ilse et al. 2018: V, U in R^{A x L}).
        bottleneck_divisor: a local bottleneck block with c output channels uses c // divisor
            channels in its 3x3x3 convolution.
        norm_groups: GroupNorm groups of the local encoder (the largest divisor of the
            channel count not above this is used).
        grad_checkpoint: recompute the global encoder stages in the backward pass
            (torch.utils.checkpoint) while training, trading compute for memory (e.g. on a T4).
        roi_foreground: choose ROIs only among foreground cells (:func:`foreground_cells`),
            so a saliency that lights up air outside the body cannot send crops there; when
            fewer than K foreground cells exist, background cells fill up the K.
        foreground_threshold: a voxel is foreground when its intensity (mean over input
            channels) exceeds this; 0.05 on CT scaled from the HU window [-1000, 400] to
            [0, 1] is -930 HU (air is ~0, lung parenchyma ~0.07-0.15), and MedMNIST shape
            masks have background exactly 0.
        foreground_fraction: a saliency cell is foreground when at least this fraction of
            the voxels of its input region (cell_stride^3) is foreground.
        roi_weighting: how the normalised class maps are combined into ROI scores:
            ``'sum'`` (GMIC: equal weights) or ``'probs'`` (weighted by the detached global
            class probabilities). With softmax classes one map is the "normal" class, whose
            maxima mark normal tissue; summing it in made the 2-ROI tiny DCG miss the lesion
            the class-1 map had found in up to 2 of 3 positive volumes of the blob test,
            weighting by the prediction follows the map of the class the DCG predicts.
    """

    num_classes: int = 2
    in_channels: int = 1
    input_shape: tuple[int, int, int] = (128, 128, 64)
    global_channels: tuple[int, ...] = (32, 64, 128, 256)
    global_blocks: tuple[int, ...] = (1, 2, 2, 1)
    feature_dim: int = 256
    pooling: str = "topt"
    top_t: float = 0.05
    num_rois: int = 5
    roi_size: tuple[int, int, int] = (16, 16, 8)
    roi_scale: int = 1
    nms_radius: int = 1
    local_channels: tuple[int, ...] = (32, 64, 128)
    local_blocks: tuple[int, ...] = (1, 2, 3)
    local_dim: int = 128
    attention_dim: int = 128
    bottleneck_divisor: int = 2
    norm_groups: int = 8
    grad_checkpoint: bool = False
    roi_foreground: bool = True
    foreground_threshold: float = 0.05
    foreground_fraction: float = 0.1
    roi_weighting: str = "probs"

    def __post_init__(self) -> None:
        for name in _TUPLE_FIELDS:
            setattr(self, name, tuple(int(v) for v in getattr(self, name)))
        if self.num_classes < 2:
            raise ValueError(f"DCGConfig.num_classes must be >= 2, got {self.num_classes}")
        if len(self.input_shape) != 3 or len(self.roi_size) != 3:
            raise ValueError("DCGConfig.input_shape and roi_size must be (H, W, D) triples")
        if len(self.global_blocks) != len(self.global_channels) or len(self.global_channels) != 4:
            raise ValueError("DCGConfig.global_channels and global_blocks must both have 4 "
                             f"entries (stride 16), got {self.global_channels} and "
                             f"{self.global_blocks}")
        if len(self.local_blocks) != len(self.local_channels) or not self.local_channels:
            raise ValueError("DCGConfig.local_channels and local_blocks must have the same, "
                             "non-zero length")
        if self.feature_dim != self.global_channels[-1]:
            raise ValueError(f"DCGConfig.feature_dim={self.feature_dim} must equal "
                             f"global_channels[-1]={self.global_channels[-1]}")
        if self.local_dim != self.local_channels[-1]:
            raise ValueError(f"DCGConfig.local_dim={self.local_dim} must equal "
                             f"local_channels[-1]={self.local_channels[-1]}")
        if any(n % self.cell_stride for n in self.input_shape):
            raise ValueError(f"DCGConfig.input_shape={self.input_shape} must be divisible by "
                             f"the encoder stride {self.cell_stride}")
        if self.pooling not in ("topt", "mean"):
            raise ValueError(f"DCGConfig.pooling must be 'topt' or 'mean', got {self.pooling!r}")
        if not 0.0 < self.top_t <= 1.0:
            raise ValueError(f"DCGConfig.top_t must be in (0, 1], got {self.top_t}")
        if self.roi_weighting not in ("sum", "probs"):
            raise ValueError(f"DCGConfig.roi_weighting must be 'sum' or 'probs', got {self.roi_weighting!r}")
        if self.roi_scale < 1 or self.nms_radius < 0:
            raise ValueError("DCGConfig.roi_scale must be >= 1 and nms_radius >= 0, got "
                             f"{self.roi_scale}, {self.nms_radius}")
        if not 0.0 <= self.foreground_fraction <= 1.0:
            raise ValueError("DCGConfig.foreground_fraction must be in [0, 1], got "
                             f"{self.foreground_fraction}")
        n_cells = math.prod(self.saliency_shape)
        if not 1 <= self.num_rois <= n_cells:
            raise ValueError(f"DCGConfig.num_rois={self.num_rois} must be in [1, {n_cells}] "
                             f"(saliency cells {self.saliency_shape} for input {self.input_shape})")
        if any(r > n for r, n in zip(self.crop_size, self.crop_source_shape)):
            raise ValueError(f"DCGConfig crop size {self.crop_size} does not fit in the "
                             f"volume it is cropped from {self.crop_source_shape}")

    # derived sizes ---------------------------------------------------------------------------
    @property
    def cell_stride(self) -> int:
        """Voxels per saliency cell along each axis of the input volume (stem 2 x 3 pools 2)."""
        return 16

    @property
    def saliency_shape(self) -> tuple[int, int, int]:
        """(h, w, d) of the saliency / global feature map."""
        return tuple(n // self.cell_stride for n in self.input_shape)

    @property
    def crop_source_shape(self) -> tuple[int, int, int]:
        """(H', W', D) of the volume ROIs are cropped from: (sH, sW, D) for roi_scale s."""
        h, w, d = self.input_shape
        return (h * self.roi_scale, w * self.roi_scale, d)

    @property
    def crop_size(self) -> tuple[int, int, int]:
        """(h, w, d) voxel size of each crop in the volume it is cropped from."""
        h, w, d = self.roi_size
        return (h * self.roi_scale, w * self.roi_scale, d)

    # plain-data round trip -------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------

@dataclass
class DCGOutput(TensorFields):
    """Everything one DCG forward pass produces (B batch, C classes, K ROIs).

    Attributes:
        global_logits: (B, C) top-t% (or mean) pooled class activation maps.
        local_logits: (B, C) from the attention-pooled ROI vectors.
        global_probs: (B, C) softmax(global_logits), the global prior p_g.
        local_probs: (B, C) softmax(local_logits), the local prior p_l.
        fused_probs: (B, C) the DCG's own prediction, (p_g + p_l) / 2 (used by the
            "DCG without diffusion" ablation).
        saliency: (B, C, h, w, d) class activation maps (raw scores; their top-t% mean is the
            global logit).
        roi_boxes: (B, K, 6) int64, half-open boxes (h0, w0, d0, h1, w1, d1) in voxel
            coordinates of the volume they were cropped from (x, or x_hires when roi_scale > 1).
        roi_cells: (B, K, 3) int64, the chosen saliency cells (i, j, k), in choice order.
        global_features: (B, F) global feature map pooled like the logits (top-t% or mean per
            channel), the global input of the feature prior.
        roi_features: (B, K, L) local encoder output per ROI.
        attention: (B, K) gated-attention MIL weights, >= 0, summing to 1 over K.
    """

    global_logits: torch.Tensor
    local_logits: torch.Tensor
    global_probs: torch.Tensor
    local_probs: torch.Tensor
    fused_probs: torch.Tensor
    saliency: torch.Tensor
    roi_boxes: torch.Tensor
    roi_cells: torch.Tensor
    global_features: torch.Tensor
    roi_features: torch.Tensor
    attention: torch.Tensor



# ---------------------------------------------------------------------------------------------
# pooling, ROI selection and cropping (pure functions, testable on hand-made maps)
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# building blocks
# ---------------------------------------------------------------------------------------------

def _norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= ``groups`` that divides ``channels``."""
    g = max(d for d in range(1, min(groups, channels) + 1) if channels % d == 0)
    return nn.GroupNorm(g, channels)


class Bottleneck3d(nn.Module):
    """3D bottleneck residual block (He et al. 2016): 1x1x1 -> 3x3x3 (stride) -> 1x1x1,
    GroupNorm + SiLU, projection shortcut when the shape changes."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, divisor: int, groups: int):
        super().__init__()
        mid = max(1, out_ch // divisor)
        self.body = nn.Sequential(
            nn.Conv3d(in_ch, mid, 1, bias=False), _norm(mid, groups), nn.SiLU(),
            nn.Conv3d(mid, mid, 3, stride=stride, padding=1, bias=False), _norm(mid, groups),
            nn.SiLU(),
            nn.Conv3d(mid, out_ch, 1, bias=False), _norm(out_ch, groups),
        )
        self.shortcut = nn.Identity() if (in_ch == out_ch and stride == 1) else nn.Sequential(
            nn.Conv3d(in_ch, out_ch, 1, stride=stride, bias=False), _norm(out_ch, groups))
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_ch, H, W, D) -> (B, out_ch, H/stride, W/stride, D/stride)."""
        return self.act(self.body(x) + self.shortcut(x))


class ResNetEncoder3d(nn.Module):
    """Stem conv (3x3x3, ``stem_stride``) then stages of bottleneck blocks; the first block of
    stage i has stride ``strides[i]``. No pooling head: returns the feature map."""

    def __init__(self, in_channels: int, channels: tuple[int, ...], blocks: tuple[int, ...],
                 stem_stride: int, strides: tuple[int, ...], divisor: int, groups: int):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv3d(in_channels, channels[0], 3, stride=stem_stride, padding=1, bias=False),
            _norm(channels[0], groups), nn.SiLU())
        stages, prev = [], channels[0]
        for ch, n_blocks, stride in zip(channels, blocks, strides):
            stage = [Bottleneck3d(prev, ch, stride, divisor, groups)]
            stage += [Bottleneck3d(ch, ch, 1, divisor, groups) for _ in range(n_blocks - 1)]
            stages.append(nn.Sequential(*stage))
            prev = ch
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor, grad_checkpoint: bool = False) -> torch.Tensor:
        """(B, in_channels, H, W, D) -> (B, channels[-1], H/S, W/S, D/S), S the total stride.
        With ``grad_checkpoint`` each stage is recomputed in the backward pass."""
        h = self.stem(x)
        for stage in self.stages:
            h = checkpoint(stage, h, use_reentrant=False) if grad_checkpoint else stage(h)
        return h


class ConvPoolEncoder3d(nn.Module):
    """The global encoder: stem conv (3x3x3, stride 2, BatchNorm, ReLU), then stages of
    ``blocks[i]`` conv (3x3x3) - BatchNorm - ReLU layers with ``channels[i]`` channels, every
    stage but the last followed by a 2x2x2 max pool. No pooling head: returns the feature map.

    With 4 stages the stride is 2 * 2^3 = 16:
    (B, in_channels, H, W, D) -> (B, channels[-1], H/16, W/16, D/16).
    """

    def __init__(self, in_channels: int, channels: tuple[int, ...], blocks: tuple[int, ...]):
        super().__init__()
        self.stem = _conv_bn_relu(in_channels, channels[0], stride=2)
        stages, prev = [], channels[0]
        for i, (ch, n_layers) in enumerate(zip(channels, blocks)):
            layers = []
            for _ in range(n_layers):
                layers.append(_conv_bn_relu(prev, ch))
                prev = ch
            if i < len(channels) - 1:
                layers.append(nn.MaxPool3d(2))
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor, grad_checkpoint: bool = False) -> torch.Tensor:
        """(B, in_channels, H, W, D) -> (B, channels[-1], H/16, W/16, D/16). With
        ``grad_checkpoint`` each stage is recomputed in the backward pass."""
        h = self.stem(x)
        for stage in self.stages:
            h = checkpoint(stage, h, use_reentrant=False) if grad_checkpoint else stage(h)
        return h


def _conv_bn_relu(in_ch: int, out_ch: int, stride: int = 1) -> nn.Sequential:
    """3x3x3 convolution (no bias: BatchNorm follows), BatchNorm3d, ReLU."""
    return nn.Sequential(nn.Conv3d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm3d(out_ch), nn.ReLU(inplace=True))


class GatedAttentionMIL(nn.Module):
    """Gated-attention MIL pooling (Ilse et al. 2018, eq. 9):
    a_k = softmax_k(w^T (tanh(V h_k) * sigmoid(U h_k))),  z = sum_k a_k h_k."""

    def __init__(self, in_dim: int, attention_dim: int):
        super().__init__()
        self.V = nn.Linear(in_dim, attention_dim)
        self.U = nn.Linear(in_dim, attention_dim)
        self.w = nn.Linear(attention_dim, 1)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h (B, K, L) -> (z (B, L), a (B, K))."""
        logits = self.w(torch.tanh(self.V(h)) * torch.sigmoid(self.U(h))).squeeze(-1)  # (B, K)
        a = logits.softmax(dim=-1)  # (B, K)
        return torch.einsum("bk,bkl->bl", a, h), a


# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------

class DCG(nn.Module):
    """Dual-granularity conditional guidance network (DiffMIC / GMIC, 3D).

    ``forward(x, x_hires=None) -> DCGOutput``; see the module docstring for the method.
    """

    def __init__(self, config: DCGConfig):
        super().__init__()
        self.config = config
        c = config
        self.global_encoder = ConvPoolEncoder3d(c.in_channels, c.global_channels, c.global_blocks)
        self.saliency_head = nn.Conv3d(c.feature_dim, c.num_classes, 1, bias=False)
        self.local_encoder = ResNetEncoder3d(
            c.in_channels, c.local_channels, c.local_blocks, stem_stride=1,
            strides=(1,) + (2,) * (len(c.local_channels) - 1), divisor=c.bottleneck_divisor,
            groups=c.norm_groups)
        self.attention = GatedAttentionMIL(c.local_dim, c.attention_dim)
        self.local_classifier = nn.Linear(c.local_dim, c.num_classes)

    def param_counts(self) -> dict[str, int]:
        """Trainable parameters per component and in total."""
        parts = ("global_encoder", "saliency_head", "local_encoder", "attention",
                 "local_classifier")
        counts = {p: sum(t.numel() for t in getattr(self, p).parameters()) for p in parts}
        counts["total"] = sum(counts.values())
        return counts

    def _check_inputs(self, x: torch.Tensor, x_hires: torch.Tensor | None) -> None:
        c = self.config
        expected = (c.in_channels, *c.input_shape)
        if x.dim() != 5 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"DCG input must be (B, {', '.join(map(str, expected))}) "
                             f"(B, Ch, H, W, D), got {tuple(x.shape)}")
        if c.roi_scale == 1:
            if x_hires is not None:
                raise ValueError("DCG: x_hires given but roi_scale == 1 (crops come from x)")
            return
        expected_hr = (x.shape[0], c.in_channels, *c.crop_source_shape)
        if x_hires is None or tuple(x_hires.shape) != expected_hr:
            got = None if x_hires is None else tuple(x_hires.shape)
            raise ValueError(f"DCG with roi_scale={c.roi_scale} needs x_hires of shape "
                             f"{expected_hr} (B, Ch, sH, sW, D), got {got}")

    @float32_forward
    def _global_head(self, feats: torch.Tensor, top_t: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """feats (B, F, h, w, d) -> saliency (B, C, h, w, d), global logits (B, C), pooled features (B, F)."""
        saliency = self.saliency_head(feats)  # (B, C, h, w, d)
        return saliency, pool_maps(saliency, self.config.pooling, top_t), pool_maps(feats, self.config.pooling,
                                                                                   self.config.top_t)

    @float32_forward
    def _local_head(self, roi_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """roi_features (B, K, L) -> attention (B, K), local logits (B, C)."""
        z, attention = self.attention(roi_features)  # (B, L), (B, K)
        return attention, self.local_classifier(z)

    def forward(self, x: torch.Tensor, x_hires: torch.Tensor | None = None,
                top_t: float | None = None) -> DCGOutput:
        """Run both streams.

        Args:
            x: (B, Ch, H, W, D) volumes matching ``config.in_channels`` / ``input_shape``.
            x_hires: (B, Ch, sH, sW, D) the same volumes at s = ``roi_scale`` times the
                in-plane resolution; required iff roi_scale > 1.
            top_t: overrides ``config.top_t`` for the global LOGITS only (the pooling warmup
                of :func:`dcg_objective`); ignored with ``pooling='mean'``. None (default):
                the configured top-t.
        Returns:
            DCGOutput (see its docstring for every field's layout).
        """
        self._check_inputs(x, x_hires)
        c = self.config
        b = x.shape[0]

        # global stream
        use_ckpt = c.grad_checkpoint and self.training and torch.is_grad_enabled()
        feats = self.global_encoder(x, grad_checkpoint=use_ckpt)  # (B, F, h, w, d)
        saliency, global_logits, global_features = self._global_head(feats, c.top_t if top_t is None else top_t)

        # ROI retrieval (index selection, not differentiable)
        with torch.no_grad():
            valid = (foreground_cells(x, c.cell_stride, c.foreground_threshold, c.foreground_fraction)
                     if c.roi_foreground else None)  # (B, h, w, d) or None
            weights = global_logits.softmax(dim=-1) if c.roi_weighting == "probs" else None  # (B, C)
            scores = roi_scores(saliency, weights=weights)  # (B, h, w, d)
            cells = select_cells(scores, c.num_rois, c.nms_radius, valid)  # (B, K, 3)
            stride = (c.cell_stride * c.roi_scale, c.cell_stride * c.roi_scale, c.cell_stride)
            boxes = cells_to_boxes(cells, stride, c.crop_size, c.crop_source_shape)  # (B, K, 6)
        source = x if x_hires is None else x_hires
        crops = crop_rois(source, boxes)  # (B, K, Ch, h', w', d')

        # local stream
        local_maps = self.local_encoder(crops.flatten(0, 1))  # (B*K, L, ...)
        roi_features = local_maps.float().flatten(2).mean(dim=-1).view(b, c.num_rois, -1)  # (B, K, L)
        attention, local_logits = self._local_head(roi_features)  # (B, K), (B, C)

        global_probs = global_logits.softmax(dim=-1)
        local_probs = local_logits.softmax(dim=-1)
        return DCGOutput(
            global_logits=global_logits, local_logits=local_logits,
            global_probs=global_probs, local_probs=local_probs,
            fused_probs=0.5 * (global_probs + local_probs),
            saliency=saliency, roi_boxes=boxes, roi_cells=cells,
            global_features=global_features, roi_features=roi_features, attention=attention)


def warmup_top_t(progress: float, top_t: float, pool_warmup: float) -> float:
    """Pooling fraction of the global logits at ``progress`` of phase 1: log-linear from 1
    (mean pooling) at progress 0 to ``top_t`` at ``progress >= pool_warmup``, i.e.
    ``top_t ** (progress / pool_warmup)``; exactly ``top_t`` when ``pool_warmup == 0``."""
    if not 0.0 <= pool_warmup <= 1.0:
        raise ValueError(f"pool_warmup must be in [0, 1], got {pool_warmup}")
    if pool_warmup == 0.0 or progress >= pool_warmup:
        return float(top_t)
    return float(top_t ** (max(0.0, progress) / pool_warmup))


def local_ce_weight(progress: float, local_start: float, local_ramp: float) -> float:
    """Weight of the local CE at ``progress``: 0 before ``local_start``, then linear to 1 over
    ``local_ramp`` (a step to 1 when ``local_ramp == 0``)."""
    if not (0.0 <= local_start <= 1.0 and local_ramp >= 0.0):
        raise ValueError(f"need 0 <= local_start <= 1 and local_ramp >= 0, got {local_start}, {local_ramp}")
    if progress < local_start:
        return 0.0
    if local_ramp == 0.0:
        return 1.0
    return float(min(1.0, (progress - local_start) / local_ramp))


def dcg_objective(dcg: DCG, scan: torch.Tensor, labels: torch.Tensor, x_hires: torch.Tensor | None = None,
                  label_smoothing: float = 0.0, progress: float = 1.0, pool_warmup: float = 0.3,
                  local_start: float = 0.3, local_ramp: float = 0.1) -> dict:
    """Phase-1 objective: CE(global logits) + w * CE(local logits), with a curriculum.

    Args:
        dcg: the DCG (train or eval mode).
        scan, labels, x_hires: (B, Ch, H, W, D), (B,) int64, optional high-resolution copy.
        label_smoothing: of both cross-entropies.
        progress: fraction of phase 1 done, in [0, 1] (global step / total steps); the
            default 1.0 (validation, inference) gives exactly the design's objective.
        pool_warmup: the global logits pool the top ``warmup_top_t(progress, top_t,
            pool_warmup)`` fraction of cells, annealed from mean pooling to top-t% until
            ``progress == pool_warmup`` (with ``pooling='topt'``).
        local_start / local_ramp: the local CE weight w is 0 before ``local_start`` and reaches
            1 after a linear ramp of ``local_ramp`` (``local_ce_weight``).

    Returns:
        dict(loss, global_ce, local_ce, output, top_t, local_weight): ``loss`` has the value
        ``global_ce + local_ce`` at every progress (so train losses stay comparable along the
        schedule and with the validation loss) but the gradient of ``global_ce + w *
        local_ce`` (the rest of the local CE is detached); ``output`` is the DCGOutput,
        ``top_t`` and ``local_weight`` (floats) the curriculum values used.
    """
    progress = float(min(max(progress, 0.0), 1.0))
    top_t = warmup_top_t(progress, dcg.config.top_t, pool_warmup)
    weight = local_ce_weight(progress, local_start, local_ramp)
    out = dcg(scan, x_hires, top_t=top_t)
    global_ce = F.cross_entropy(out.global_logits, labels, label_smoothing=label_smoothing)
    local_ce = F.cross_entropy(out.local_logits, labels, label_smoothing=label_smoothing)
    if weight >= 1.0:
        local_term = local_ce
    elif weight <= 0.0:
        local_term = local_ce.detach()  # no gradient at all into the local stream
    else:
        local_term = weight * local_ce + (1.0 - weight) * local_ce.detach()
    return {"loss": global_ce + local_term, "global_ce": global_ce, "local_ce": local_ce, "output": out,
            "top_t": top_t, "local_weight": weight}
