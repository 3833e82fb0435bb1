"""Dual-granularity conditional guidance (DCG) for 3D CT volumes.

The DCG is the frozen guidance network of DiffMIC (Yang et al., MICCAI 2023), itself the
global/local design of GMIC (Shen et al., "An interpretable classifier for high-resolution
breast cancer screening images", MedIA 2021), adapted here from 2D images to 3D volumes.

Layouts follow the seed: a volume is (H, W, D), a batch (B, Ch, H, W, D).

* Global stream: a 3D conv / BatchNorm / ReLU / max-pool encoder (VGG-style, like the
  Keras 3D CNN of the MosMedData example; ``models/encoders.py`` says why BatchNorm) maps
  (B, Ch, H, W, D) -> (B, F, h, w, d) with stride 16 (a stride-2 stem, then three max pools);
  a bias-free 1x1x1 conv gives one class activation map per class, the saliency
  (B, C, h, w, d); the global logits are the top-t% pooling of each map (GMIC eq. 2: mean of
  the ceil(t * h * w * d) highest cells), not the spatial mean, so that a small lesion that
  lights up a few cells drives the logit.
* ROI retrieval (GMIC section 3.2, made 3D; the pure functions of ``models/roi.py``): each
  class map is min-max normalised per sample, the maps are summed over classes, and the K
  most salient cells are chosen greedily with non-maximum suppression, among FOREGROUND
  cells only (``roi_foreground``: a cell whose input region is air / background, e.g.
  outside the body, is never a ROI unless fewer than K foreground cells exist; see
  ``models.roi.foreground_cells``); each cell is mapped to a fixed-size crop of the input
  volume (or of a copy at ``roi_scale`` times the in-plane resolution), clamped to lie inside
  it. Selection is by index and therefore not differentiable, as in GMIC.
* Local stream: a small 3D CNN encodes every crop to a vector (B, K, L); gated-attention MIL
  (Ilse et al., ICML 2018, eq. 9) pools the K vectors and a linear layer gives local logits.

Hyperparameters: ``DCGConfig`` (``models/dcg_config.py``). ``DCG.forward`` returns a
``DCGOutput``; nothing is stored on the module.

Phase-1 objective (:func:`dcg_objective`, measured on AdrenalMNIST3D and the blob test, see
the README): CE(global) + CE(local) with a curriculum over ``progress`` (fraction of phase 1
done). Top-t% pooling of an untrained saliency map trains only the few cells that happen to
be highest (often bright anatomy or air), so the global logits start from mean pooling and
anneal log-linearly to top-t% over the first ``pool_warmup`` of phase 1
(:func:`warmup_top_t`); the local CE, which can only learn from ROIs chosen by an informative
saliency, is switched on at ``local_start`` and ramped to full weight over ``local_ramp``
(:func:`local_ce_weight`). At ``progress = 1`` (the default, inference, validation) the
objective is exactly the design's.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.dcg_config import DCGConfig
from models.encoders import ConvPoolEncoder3d, GatedAttentionMIL, ResNetEncoder3d
from models.plain_config import TensorFields
from models.precision import float32_forward
from models.roi import cells_to_boxes, crop_rois, foreground_cells, pool_maps, roi_scores, select_cells

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
