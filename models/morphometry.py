"""Shape descriptors of a scan, in torch, for the denoiser's condition (``DenoiserConfig.morphometry``).

Why: on AdrenalMNIST3D's training folds, a logistic readout of the out-of-fold DCG prior plus
shape descriptors of the thresholded scan scored above the prior on scans it did not fit (README,
"What a second reader can add"): the global shape of the mask is information neither the DCG
nor the denoiser's own encoder finds. These are the probe's descriptors that have a batched torch
form (``scripts/readout_probe.py`` also has convex-hull solidity and diameter and connected
components, through scipy); the depths come from repeated 3x3x3 erosion (chessboard distance) in
place of the Euclidean distance transform. All are invariant to flips and to an increasing affine
change of intensity (the mask is the scan above half its range), so training augmentation leaves
them unchanged.

:class:`ShapeDescriptors` standardises them with a mean and SD fitted once on the training split
(buffers, so a checkpoint holds them) and clips to +-5.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

DESCRIPTORS = ("log volume", "log surface", "sphericity", "log axis var 1", "log axis var 2", "log axis var 3",
               "elongation", "flatness", "extent 1", "extent 2", "extent 3", "box fill", "max depth",
               "mean depth", "surface / volume")
CLIP = 5.0


def _erosion_depth(mask: torch.Tensor) -> torch.Tensor:
    """(B, H, W, D) bool -> (B, H, W, D) float: how many 3x3x3 erosions (zero outside the volume)
    each voxel survives, plus one; 0 outside the mask."""
    m = mask[:, None].float()  # (B, 1, H, W, D)
    depth = torch.zeros_like(m)
    for _ in range((max(mask.shape[1:]) + 1) // 2 + 1):
        if not bool(m.any()):
            break
        depth += m
        m = -F.max_pool3d(-F.pad(m, (1,) * 6), 3, stride=1)  # min over the 3x3x3 window
    return depth[:, 0]


def shape_descriptors(scan: torch.Tensor) -> torch.Tensor:
    """Raw descriptors (B, len(DESCRIPTORS)), float32, of ``scan`` (B, 1, H, W, D) thresholded at
    half of each volume's intensity range.

    Volume and surface are voxel and exposed-face counts, sphericity pi^(1/3) (6V)^(2/3) / S; the
    axis variances are the eigenvalues of the voxel coordinates' covariance (descending),
    elongation and flatness the square roots of their ratios to the first; the extents are the
    bounding box's edges (descending), box fill V over the box's volume; the depths are the
    maximum and mean of :func:`_erosion_depth` over the mask. A volume whose mask holds fewer than
    two voxels (e.g. a constant one) gives zeros.
    """
    if scan.dim() != 5 or scan.shape[1] != 1:
        raise ValueError(f"shape_descriptors needs scans (B, 1, H, W, D), got {tuple(scan.shape)}")
    with torch.autocast(scan.device.type, enabled=False):
        x = scan[:, 0].float()  # (B, H, W, D)
        dims = x.shape[1:]
        low, high = x.flatten(1).amin(1), x.flatten(1).amax(1)
        mask = x > (0.5 * (low + high))[:, None, None, None]  # (B, H, W, D)
        maskf = mask.float()
        n = maskf.flatten(1).sum(1)  # (B,)
        safe_n = n.clamp(min=2)
        padded = F.pad(maskf, (1,) * 6)
        surface = sum((padded.diff(dim=a) != 0).flatten(1).sum(1).float() for a in (1, 2, 3))  # (B,)
        axes = [torch.arange(s, device=x.device, dtype=torch.float32) for s in dims]
        coords = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)  # (N, 3)
        w = maskf.flatten(1)  # (B, N)
        mean = w @ coords / safe_n[:, None]  # (B, 3)
        centred = coords[None] - mean[:, None]  # (B, N, 3)
        cov = torch.einsum("bn,bni,bnj->bij", w, centred, centred) / (safe_n - 1)[:, None, None]
        variances = torch.linalg.eigvalsh(cov.double()).float().flip(-1).clamp(min=0) + 1e-6  # (B, 3), descending
        extents = []
        for a in range(3):
            occupied = mask.any(dim=tuple(d for d in (1, 2, 3) if d != a + 1))  # (B, L_a)
            index = torch.arange(occupied.shape[1], device=x.device)
            first = torch.where(occupied, index, occupied.shape[1]).amin(1)
            last = torch.where(occupied, index, -1).amax(1)
            extents.append((last - first + 1).clamp(min=1).float())
        extents = torch.stack(extents, dim=1).sort(dim=1, descending=True).values  # (B, 3)
        depth = _erosion_depth(mask)
        surface = surface.clamp(min=1)
        out = torch.cat([
            torch.stack([safe_n.log(), surface.log(), math.pi ** (1 / 3) * (6 * safe_n) ** (2 / 3) / surface], 1),
            variances.log(), (variances[:, 1:] / variances[:, :1]).sqrt(), extents,
            torch.stack([safe_n / extents.prod(1), depth.flatten(1).amax(1), depth.flatten(1).sum(1) / safe_n,
                         surface / safe_n], 1)], dim=1)  # (B, len(DESCRIPTORS))
        return torch.where((n >= 2)[:, None], out, torch.zeros_like(out))


class ShapeDescriptors(nn.Module):
    """Standardised :func:`shape_descriptors`: ``(raw - mean) / sd`` clipped to +-CLIP, with the
    mean and SD fitted on the training split by :meth:`fit` (buffers: saved with the model)."""

    def __init__(self):
        super().__init__()
        k = len(DESCRIPTORS)
        self.register_buffer("mean", torch.zeros(k))
        self.register_buffer("sd", torch.ones(k))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def fit(self, raw: torch.Tensor) -> None:
        """Set the standardisation from raw descriptors (N, len(DESCRIPTORS)) of the training split."""
        if raw.dim() != 2 or raw.shape[1] != len(DESCRIPTORS) or raw.shape[0] < 2:
            raise ValueError(f"ShapeDescriptors.fit needs (N >= 2, {len(DESCRIPTORS)}) descriptors, "
                             f"got {tuple(raw.shape)}")
        raw = raw.float().to(self.mean.device)
        self.mean.copy_(raw.mean(0))
        self.sd.copy_(raw.std(0).clamp(min=1e-6))
        self.fitted.fill_(True)

    def forward(self, scan: torch.Tensor) -> torch.Tensor:
        """scan (B, 1, H, W, D) -> standardised descriptors (B, len(DESCRIPTORS)), float32."""
        if self.training and not bool(self.fitted):
            raise RuntimeError("ShapeDescriptors: fit the standardisation on the training split before training "
                               "(utils.training.diffusion.fit_shape_descriptors)")
        return ((shape_descriptors(scan) - self.mean) / self.sd).clamp(-CLIP, CLIP)
