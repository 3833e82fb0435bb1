"""Building blocks of the DCG (``models/dcg_model.py``); the denoiser reuses the global encoder.

* :class:`ConvPoolEncoder3d`: the global encoder, 3D conv / BatchNorm / ReLU / max-pool stages
  (VGG-style, like the Keras 3D CNN of the MosMedData example), stride 16.
* :class:`ResNetEncoder3d`: the local encoder of the ROI crops, GroupNorm bottleneck residual
  blocks (:class:`Bottleneck3d`, He et al. 2016).
* :class:`GatedAttentionMIL`: gated-attention MIL pooling (Ilse et al., ICML 2018, eq. 9).

Layout (B, Ch, H, W, D), as in the seed.

Why BatchNorm and max pooling in the global encoder (measured, see the README's "Model"):
with 64 training phantoms a GroupNorm ResNet with strided convolutions fits the training
split while its held-out AUC stays below 0.5, and the same plain CNN with GroupNorm instead
of BatchNorm does not learn at all, whereas conv / BatchNorm / max-pool blocks reach held-out
AUC 0.74-0.83 at the demo budget. BatchNorm over batches of 4 volumes has poor running
statistics (a known pitfall of BatchNorm with small batches), so the training code recomputes
them over the training split with the current weights before every evaluation and before the
guidance is cached ("precise BN", ``utils.training.precise_bn``); the local encoder (a batch
of B * K crops) keeps GroupNorm.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


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
