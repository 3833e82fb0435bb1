"""Priors for the conditional diffusion classifier, computed from the (frozen) DCG's outputs.

Two priors condition the denoiser (DiffMIC, Yang et al. MICCAI 2023, section 2.2):

* Dense guidance map M (B, C, Np, Np, Np): every point of a 3D grid carries a class-probability
  vector interpolated between the global prior p_g and the local prior p_l by its distance from
  the grid centre,

      M[:, :, i, j, k] = (1 - d[i, j, k]) p_g + d[i, j, k] p_l,
      d[i, j, k] = || (i, j, k) - c || / || (0, 0, 0) - c ||,   c = ((Np-1)/2,) * 3,

  so the centre carries the global prior and the 8 corners the local one. This 3D rule is ours:
  DiffMIC-v2's dense map is a 2D grid indexed by ROI positions. Each M[:, :, i, j, k] is a
  convex combination of two probability vectors, so it sums to 1 over classes. For even Np no
  grid point lies exactly on the centre (the 2x2x2 central points have d = 1/(Np-1)).
  By default (``PriorConfig.blend='fitted'``) d is rescaled, keeping its order, so that its grid
  mean is the local prior's weight w that ranks the training split's out-of-fold priors best
  (fitted before phase 2; the design's d has grid mean 0.63 at Np = 8, and on AdrenalMNIST3D's
  training folds the fitted w was 0-0.15: its local prior ranks worse than its global one).
* Feature prior F (B, D): a per-channel convex combination of the global feature vector and
  the K ROI vectors, all projected to D channels,

      F = sum_{j=0..K} Q_j * f_j,  f_0 = P_g f_global,  f_j = P_r f_roi_j,
      Q = softmax over the K+1 sources of learnable gate logits (K+1, D).

``PriorGenerator.forward`` takes plain tensors so phase 2 can feed cached DCG outputs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import nn

from models.plain_config import PlainConfig, TensorFields
from models.precision import float32_forward


BLENDS = ("distance", "fitted")  # PriorConfig.blend
BLEND_WEIGHTS = tuple(round(0.05 * i, 2) for i in range(21))  # the candidate w of a fitted blend


@dataclass
class PriorConfig(PlainConfig):
    """Sizes of the prior generator.

    Args:
        num_classes: C.
        num_rois: K, ROI vectors per volume (DCGConfig.num_rois).
        global_dim: channels of the pooled global feature (DCGConfig.feature_dim).
        roi_dim: channels of each ROI vector (DCGConfig.local_dim).
        feature_dim: D, channels of the feature prior F.
        grid_size: Np, side of the dense guidance grid.
        blend: how M blends the two priors: ``'fitted'`` (the default): d rescaled so that its
            grid mean is a weight w of the local prior fitted on the training split's out-of-fold
            priors before phase 2 (``PriorGenerator.fit_blend``; a buffer saved with the model),
            centre still the most global and corners the most local (:func:`blend_distance`); or
            ``'distance'`` (the design: d as above, whose grid mean is 0.63 at Np = 8; what
            checkpoints written before the option have).
        fold_dcgs: how many out-of-fold DCGs the model keeps besides its final DCG (0: none).
            Phase 2 trains on the priors these DCGs gave the training scans they did not see;
            at inference the priors of a scan come from every member (the final DCG and the
            fold DCGs), one member per sampling chain, so the denoiser sees at test time the
            kind of prior it was trained on (``DiffMIC3D.predict``).
    """

    num_classes: int = 2
    num_rois: int = 5
    global_dim: int = 256
    roi_dim: int = 128
    feature_dim: int = 256
    grid_size: int = 8
    fold_dcgs: int = 0
    blend: str = "fitted"

    def __post_init__(self) -> None:
        if self.blend not in BLENDS:
            raise ValueError(f"PriorConfig.blend must be one of {BLENDS}, got {self.blend!r}")
        if int(self.fold_dcgs) < 0 or self.fold_dcgs == 1:
            raise ValueError(f"PriorConfig.fold_dcgs must be 0 or >= 2 (out-of-fold DCGs), got {self.fold_dcgs}")
        for f in fields(self):
            if f.name not in ("fold_dcgs", "blend") and int(getattr(self, f.name)) < 1:
                raise ValueError(f"PriorConfig.{f.name} must be >= 1, got {getattr(self, f.name)}")
        if self.num_classes < 2:
            raise ValueError(f"PriorConfig.num_classes must be >= 2, got {self.num_classes}")



@dataclass
class Priors(TensorFields):
    """The priors of one batch.

    Attributes:
        guidance_map: M, (B, C, Np, Np, Np), class probabilities per grid point (sum 1 over C).
        feature_prior: F, (B, D).
        gates: Q, (K+1, D), softmax weights of [global, roi_1..roi_K] per channel (sum 1 over
            the K+1 sources); shared by the batch.
    """

    guidance_map: torch.Tensor
    feature_prior: torch.Tensor
    gates: torch.Tensor



def guidance_distance_map(grid_size: int, device: torch.device | str | None = None,
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """d[i, j, k]: Euclidean distance of grid point (i, j, k) from the grid centre
    ((Np-1)/2 per axis), divided by the centre-to-corner distance, so d is in [0, 1] with 1 at
    the 8 corners (exactly) and 0 at the centre (a grid point only for odd Np; Np = 1 gives 0).

    Returns:
        (Np, Np, Np)
    """
    if grid_size < 1:
        raise ValueError(f"grid_size must be >= 1, got {grid_size}")
    centre = (grid_size - 1) / 2
    axis = torch.arange(grid_size, device=device, dtype=torch.float64) - centre
    hh, ww, dd = torch.meshgrid(axis, axis, axis, indexing="ij")
    dist = torch.sqrt(hh ** 2 + ww ** 2 + dd ** 2)  # (Np, Np, Np)
    corner = centre * 3 ** 0.5
    dist = dist / corner if corner > 0 else torch.zeros_like(dist)
    return dist.to(dtype)


def blend_distance(distance: torch.Tensor, weight: torch.Tensor | float) -> torch.Tensor:
    """The distance map rescaled so that its grid mean is ``weight`` (the local prior's share of
    M's grid mean), keeping its order (centre lowest, corners highest) and its range in [0, 1]:
    ``d w / mean(d)`` for w <= mean(d), else ``1 - (1 - d)(1 - w) / (1 - mean(d))``; a constant
    ``w`` where d is (Np = 1). ``distance`` (Np, Np, Np), ``weight`` a scalar in [0, 1]."""
    weight = torch.as_tensor(weight, dtype=distance.dtype, device=distance.device)
    mean = distance.mean()  # in [0, 1): 0 only for Np = 1, where both branches give w
    tiny = torch.finfo(distance.dtype).tiny  # no branch on a value: the memory estimate runs on fake tensors
    return torch.where(weight <= mean, distance * weight / mean.clamp_min(tiny),
                       1 - (1 - distance) * (1 - weight) / (1 - mean).clamp_min(tiny))


def dense_guidance_map(global_probs: torch.Tensor, local_probs: torch.Tensor, grid_size: int,
                       distance: torch.Tensor | None = None) -> torch.Tensor:
    """M = (1 - d) p_g + d p_l on an Np^3 grid (module docstring; our 3D rule).

    Args:
        global_probs: p_g (B, C).
        local_probs: p_l (B, C).
        grid_size: Np.
        distance: optional precomputed ``guidance_distance_map(Np)`` (Np, Np, Np).
    Returns:
        (B, C, Np, Np, Np)
    """
    if global_probs.dim() != 2 or global_probs.shape != local_probs.shape:
        raise ValueError("dense_guidance_map expects global and local probabilities of the "
                         f"same shape (B, C), got {tuple(global_probs.shape)} and "
                         f"{tuple(local_probs.shape)}")
    if distance is None:
        distance = guidance_distance_map(grid_size, global_probs.device, global_probs.dtype)
    elif tuple(distance.shape) != (grid_size,) * 3:
        raise ValueError(f"distance map must be {(grid_size,) * 3}, got {tuple(distance.shape)}")
    d = distance.to(global_probs.dtype)[None, None]  # (1, 1, Np, Np, Np)
    p_g = global_probs[:, :, None, None, None]  # (B, C, 1, 1, 1)
    p_l = local_probs[:, :, None, None, None]
    return (1 - d) * p_g + d * p_l  # (B, C, Np, Np, Np)


def gated_fusion(sources: torch.Tensor, gate_logits: torch.Tensor) -> tuple[torch.Tensor,
                                                                             torch.Tensor]:
    """Per-channel convex combination of S sources: F = sum_j softmax_j(gate_logits)_j * f_j.

    Args:
        sources: (B, S, D)
        gate_logits: (S, D)
    Returns:
        F (B, D) and the gates Q = softmax over S (S, D).
    """
    if sources.dim() != 3 or tuple(sources.shape[1:]) != tuple(gate_logits.shape):
        raise ValueError(f"gated_fusion expects sources (B, S, D) and gates (S, D), got "
                         f"{tuple(sources.shape)} and {tuple(gate_logits.shape)}")
    gates = gate_logits.softmax(dim=0)  # (S, D)
    return (gates[None] * sources).sum(dim=1), gates


class PriorGenerator(nn.Module):
    """Builds the dense guidance map M and the gated feature prior F (module docstring).

    Learnable parameters: the global projection P_g (global_dim -> D), the ROI projection P_r
    (roi_dim -> D, shared by the K ROIs) and the gate logits (K+1, D), initialised to zero
    (equal weights 1/(K+1)). The distance map d is a non-persistent buffer built once.
    """

    def __init__(self, config: PriorConfig):
        super().__init__()
        self.config = config
        c = config
        self.global_proj = nn.Linear(c.global_dim, c.feature_dim)
        self.roi_proj = nn.Linear(c.roi_dim, c.feature_dim)
        self.gate_logits = nn.Parameter(torch.zeros(c.num_rois + 1, c.feature_dim))
        self.register_buffer("distance", guidance_distance_map(c.grid_size), persistent=False)
        if c.blend == "fitted":  # the design's grid mean (M is the design's map) until fit_blend; saved
            self.register_buffer("local_weight", self.distance.mean().clone())

    @torch.no_grad()
    def fit_blend(self, global_probs: torch.Tensor, local_probs: torch.Tensor, labels, score) -> float:
        """``blend='fitted'``: the local prior's weight w (of ``BLEND_WEIGHTS``) whose blend
        ``(1 - w) p_g + w p_l`` of the given (out-of-fold) priors (N, C) ranks ``labels`` (N,) best
        by ``score(labels, probs) -> float`` (e.g. ROC-AUC; ties: the smaller w). Where no
        candidate has a finite score (one class only: the AUC is undefined) w is the design's,
        the grid mean of d, so M is the distance blend. Returns w."""
        if self.config.blend != "fitted":
            raise ValueError("fit_blend needs PriorConfig.blend='fitted'")
        g, loc = global_probs.float().cpu(), local_probs.float().cpu()
        scores = [float(score(labels, ((1 - w) * g + w * loc).numpy())) for w in BLEND_WEIGHTS]
        finite = [i for i, s in enumerate(scores) if math.isfinite(s)]
        best = (BLEND_WEIGHTS[max(finite, key=lambda i: (scores[i], -i))] if finite
                else float(self.distance.mean()))
        self.local_weight.fill_(best)
        return best

    def blend_map(self) -> torch.Tensor:
        """The distance map M is built with (Np, Np, Np): the design's, or the fitted blend's."""
        if self.config.blend == "distance":
            return self.distance
        return blend_distance(self.distance, self.local_weight)

    @float32_forward
    def forward(self, global_probs: torch.Tensor, local_probs: torch.Tensor,
                global_features: torch.Tensor, roi_features: torch.Tensor) -> Priors:
        """Args:
            global_probs: p_g (B, C).
            local_probs: p_l (B, C).
            global_features: (B, global_dim) pooled global features.
            roi_features: (B, K, roi_dim) ROI vectors.
        Returns:
            Priors(guidance_map (B, C, Np, Np, Np), feature_prior (B, D), gates (K+1, D)).
        """
        c = self.config
        b = global_probs.shape[0]
        expected = {"global_probs": (b, c.num_classes), "local_probs": (b, c.num_classes),
                    "global_features": (b, c.global_dim),
                    "roi_features": (b, c.num_rois, c.roi_dim)}
        given = {"global_probs": global_probs, "local_probs": local_probs,
                 "global_features": global_features, "roi_features": roi_features}
        for name, shape in expected.items():
            if tuple(given[name].shape) != shape:
                raise ValueError(f"PriorGenerator: {name} must be {shape}, got "
                                 f"{tuple(given[name].shape)}")
        guidance = dense_guidance_map(global_probs, local_probs, c.grid_size, self.blend_map())
        sources = torch.cat([self.global_proj(global_features)[:, None],  # (B, 1, D)
                             self.roi_proj(roi_features)], dim=1)  # (B, K+1, D)
        feature_prior, gates = gated_fusion(sources, self.gate_logits)
        return Priors(guidance_map=guidance, feature_prior=feature_prior, gates=gates)
