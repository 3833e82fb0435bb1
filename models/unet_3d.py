"""3D U-Net over the guidance grid: the spatial part of the denoiser's condition branch.

The U-Net mixes information across the Np^3 grid, but it never sees the noisy label ``y_t``
or the timestep: its input is the condition only (``models/denoiser.py`` builds it),

    concat[M (C), image features on the grid (E_img), projected DCG feature prior (E_f)]
        (B, C_in, Np, Np, Np)  ->  U-Net  ->  condition map (B, E, Np, Np, Np),

and the per-point denoiser head then combines each grid point's ``y_t`` with that point's
condition vector only (1x1x1). This is the design that removes the label leak of the first
version, whose U-Net ran over ``y_t`` itself: with heterologous timesteps, 3x3x3 convolutions
read the label from neighbouring low-noise points instead of from the image.

GroupNorm-SiLU-Conv residual blocks (no batch statistics: the denoiser trains on small
batches), stride-2 conv down, nearest-upsample + conv up, GroupNorm on the output so the
condition has a bounded scale (it multiplies the y_t path, an fp16 hazard otherwise).
Layout (B, C, H, W, D) with H = W = D = Np.

Sections: config, blocks, model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from models.plain_config import PlainConfig

# config


@dataclass
class UNetConfig(PlainConfig):
    """Hyperparameters of :class:`UNet3D`.

    Args:
        in_channels: channels of the condition input (set by the denoiser that owns the U-Net).
        out_channels: E, width of the condition map.
        grid_size: Np (the network accepts any cubic grid divisible by ``2 ** (levels - 1)``).
        base_channels: channels of the first level; level i has ``base_channels * channel_mults[i]``.
        channel_mults: one multiplier per resolution level (the grid halves between levels).
        groups: GroupNorm groups; must divide every level's channel count.
        dropout: dropout rate inside residual blocks.
    """

    in_channels: int = 2
    out_channels: int = 64
    grid_size: int = 8
    base_channels: int = 32
    channel_mults: tuple[int, ...] = (1, 2)
    groups: int = 8
    dropout: float = 0.0

    def __post_init__(self):
        self.channel_mults = tuple(int(m) for m in self.channel_mults)
        if self.in_channels < 1 or self.out_channels < 1:
            raise ValueError(f"UNetConfig needs in_channels, out_channels >= 1, got {self.in_channels}, {self.out_channels}")
        if not self.channel_mults or min(self.channel_mults) < 1:
            raise ValueError(f"UNetConfig.channel_mults must be positive ints, got {self.channel_mults}")
        for width in [self.base_channels * m for m in self.channel_mults] + [self.out_channels]:
            if self.groups < 1 or width % self.groups:
                raise ValueError(f"UNetConfig.groups={self.groups} must be a positive divisor of every width, got {width}")
        check_grid_size(self.grid_size, len(self.channel_mults))


def check_grid_size(grid_size: int, num_levels: int) -> None:
    """Raise ValueError unless ``num_levels - 1`` halvings of ``grid_size`` stay exact and >= 1."""
    factor = 2 ** (num_levels - 1)
    if grid_size < factor or grid_size % factor:
        raise ValueError(f"grid size {grid_size} cannot be halved {num_levels - 1} times ({num_levels} U-Net "
                         f"levels): use a grid divisible by {factor} or fewer channel_mults")


# blocks


class ResBlock3D(nn.Module):
    """``h = conv2(dropout(silu(norm2(conv1(silu(norm1(x))))))) + skip(x)``, 3x3x3 convs."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(math.gcd(in_channels, groups), in_channels)
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv3d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, Cin, H, W, D) -> (B, Cout, H, W, D)."""
        h = self.conv1(torch.nn.functional.silu(self.norm1(x)))
        h = self.conv2(self.dropout(torch.nn.functional.silu(self.norm2(h))))
        return h + self.skip(x)


# model


class UNet3D(nn.Module):
    """Condition U-Net: (B, in_channels, Np, Np, Np) -> (B, out_channels, Np, Np, Np).

    Stem conv -> per level one residual block (stride-2 conv between levels) -> a middle
    block -> per level one block on [h, skip] (upsampling between levels) -> GroupNorm.
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = c = config
        chans = [c.base_channels * m for m in c.channel_mults]
        self.stem = nn.Conv3d(c.in_channels, chans[0], 3, padding=1)
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        for level, width in enumerate(chans):
            self.down.append(ResBlock3D(chans[max(level - 1, 0)], width, c.groups, c.dropout))
            last = level == len(chans) - 1
            self.downsample.append(nn.Identity() if last else nn.Conv3d(width, width, 3, stride=2, padding=1))
        self.mid = ResBlock3D(chans[-1], chans[-1], c.groups, c.dropout)
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for level in reversed(range(len(chans))):
            # h arrives with chans[level] channels (the middle block, or the upsampling conv)
            self.up.append(ResBlock3D(2 * chans[level], chans[level], c.groups, c.dropout))
            self.upsample.append(nn.Identity() if level == 0 else nn.Sequential(
                nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv3d(chans[level], chans[level - 1], 3, padding=1)))
        self.out = nn.Sequential(nn.Conv3d(chans[0], c.out_channels, 1), nn.GroupNorm(c.groups, c.out_channels))

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        """cond (B, in_channels, Np, Np, Np) -> condition map (B, out_channels, Np, Np, Np)."""
        c = self.config
        if cond.ndim != 5 or cond.shape[1] != c.in_channels or not cond.shape[2] == cond.shape[3] == cond.shape[4]:
            raise ValueError(f"UNet3D expects (B, {c.in_channels}, Np, Np, Np), got {tuple(cond.shape)}")
        check_grid_size(cond.shape[2], len(c.channel_mults))
        h = self.stem(cond)  # (B, base, Np, Np, Np)
        skips = []
        for block, down in zip(self.down, self.downsample):
            h = block(h)
            skips.append(h)
            h = down(h)  # halves the grid except at the last level
        h = self.mid(h)
        for block, up in zip(self.up, self.upsample):
            h = up(block(torch.cat([h, skips.pop()], dim=1)))
        return self.out(h)  # (B, E, Np, Np, Np)
