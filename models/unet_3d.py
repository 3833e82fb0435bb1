"""3D U-Net denoiser over the dense guidance grid (DiffMIC-style, heterologous timesteps).

The network predicts the noise ``eps`` that the prior-shifted forward process
(``models/diffusion_process.py``) added to the class map ``y_t``. It owns no schedule: it
only sees integer timesteps, one per grid point (DiffMIC-v2's heterologous diffusion), and
two conditioning signals from the DCG priors:

* the dense guidance map ``M`` (B, C, H, W, D), concatenated to ``y_t`` at the input;
* the feature prior ``F`` (B, feature_dim), applied in every residual block by FiLM
  (Perez et al. 2018: ``h <- h * (1 + scale(F)) + shift(F)``).

The timestep is embedded per grid point (sinusoidal + MLP, Ho et al. 2020 / Vaswani et al.
2017) into a map (B, E, H, W, D) that is average-pooled alongside the features at every
down level and added inside every residual block, so each point is denoised at its own
noise level. GroupNorm everywhere (batches are small). Layout: (B, C, H, W, D), the seed's
order, with H = W = D = Np (the grid size).

Sections: config, helpers, blocks, model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from models.plain_config import PlainConfig

# config


@dataclass
class UNetConfig(PlainConfig):
    """Hyperparameters of :class:`UNet3D`.

    Args:
        num_classes: C, channels of ``y_t``, ``M`` and the predicted noise.
        grid_size: Np, side of the cubic grid the network is built for (informative: the
            network accepts any cubic grid divisible by ``2 ** (len(channel_mults) - 1)``).
        base_channels: channels of the first level; level i has
            ``base_channels * channel_mults[i]``.
        channel_mults: one multiplier per resolution level; the grid is halved between
            consecutive levels, so ``len(channel_mults) - 1`` downsamplings (Np=8 with three
            levels: 8 -> 4 -> 2).
        num_res_blocks: residual blocks per level on the way down (the way up has the same
            number, each fed one skip connection).
        time_dim: E, width of the per-point timestep embedding map.
        feature_dim: width of the feature prior ``F`` that conditions every block by FiLM.
        groups: GroupNorm groups; must divide every level's channel count.
        dropout: dropout rate inside residual blocks.
    """

    num_classes: int = 2
    grid_size: int = 8
    base_channels: int = 56
    channel_mults: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 1
    time_dim: int = 128
    feature_dim: int = 256
    groups: int = 8
    dropout: float = 0.0

    def __post_init__(self):
        self.channel_mults = tuple(int(m) for m in self.channel_mults)
        if self.num_classes < 2:
            raise ValueError(f"UNetConfig.num_classes must be >= 2, got {self.num_classes}")
        if not self.channel_mults or min(self.channel_mults) < 1:
            raise ValueError(f"UNetConfig.channel_mults must be positive ints, got {self.channel_mults}")
        if self.num_res_blocks < 1:
            raise ValueError(f"UNetConfig.num_res_blocks must be >= 1, got {self.num_res_blocks}")
        if self.time_dim % 2:
            raise ValueError(f"UNetConfig.time_dim must be even (sin/cos pairs), got {self.time_dim}")
        for mult in self.channel_mults:
            if (self.base_channels * mult) % self.groups:
                raise ValueError(
                    f"UNetConfig.groups={self.groups} must divide every level's channels "
                    f"(base_channels * mult = {self.base_channels * mult})"
                )
        check_grid_size(self.grid_size, len(self.channel_mults))



def check_grid_size(grid_size: int, num_levels: int) -> None:
    """Raise ValueError unless ``num_levels - 1`` halvings of ``grid_size`` stay exact and >= 1."""
    factor = 2 ** (num_levels - 1)
    if grid_size < factor or grid_size % factor:
        raise ValueError(
            f"grid size {grid_size} cannot be halved {num_levels - 1} times "
            f"({num_levels} U-Net levels): use a grid divisible by {factor} "
            f"or fewer channel_mults"
        )


# helpers


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Transformer sinusoidal embedding of integer timesteps of any shape.

    Args:
        t: timesteps, any shape S (here (B, H, W, D)).
        dim: even embedding width.

    Returns:
        (*S, dim) float tensor, ``[sin(t w_k), cos(t w_k)]`` with ``w_k = max_period^(-k/(dim/2))``.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float().unsqueeze(-1) * freqs  # (*S, half)
    return torch.cat([args.sin(), args.cos()], dim=-1)  # (*S, dim)


# blocks


class ResBlock3D(nn.Module):
    """GroupNorm-SiLU-Conv residual block with a per-point time map and FiLM on ``F``.

    ``h = conv1(silu(norm1(x))) + proj(temb)``;
    ``h = conv2(dropout(silu(norm2(h) * (1 + scale(F)) + shift(F))))``; returns ``h + skip(x)``.
    """

    def __init__(self, in_channels: int, out_channels: int, time_dim: int, feature_dim: int,
                 groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups_for(in_channels, groups), in_channels)
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, padding=1)
        self.time_proj = nn.Sequential(nn.SiLU(), nn.Conv3d(time_dim, out_channels, 1))
        self.film = nn.Sequential(nn.SiLU(), nn.Linear(feature_dim, 2 * out_channels))
        self.norm2 = nn.GroupNorm(groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv3d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, feat: torch.Tensor) -> torch.Tensor:
        """x (B, Cin, H, W, D), temb (B, E, H, W, D), feat (B, feature_dim) -> (B, Cout, H, W, D)."""
        h = self.conv1(F.silu(self.norm1(x)))  # (B, Cout, H, W, D)
        h = h + self.time_proj(temb)
        scale, shift = self.film(feat)[:, :, None, None, None].chunk(2, dim=1)  # 2 x (B, Cout, 1, 1, 1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return h + self.skip(x)


def _groups_for(channels: int, groups: int) -> int:
    """GroupNorm groups for a concatenated input whose width may not be a multiple of ``groups``."""
    return math.gcd(channels, groups)


# model


class UNet3D(nn.Module):
    """Noise predictor ``eps_theta(y_t, M, t, F)`` over the (Np, Np, Np) guidance grid.

    Input ``concat[y_t, M]`` (B, 2C, H, W, D) -> stem conv -> down levels (residual blocks,
    stride-2 conv between levels) -> two middle blocks -> up levels (each block consumes one
    skip connection; nearest upsampling + conv between levels) -> GroupNorm-SiLU-conv to C.
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        c = config
        chans = [c.base_channels * m for m in c.channel_mults]

        def block(cin: int, cout: int) -> ResBlock3D:
            return ResBlock3D(cin, cout, c.time_dim, c.feature_dim, c.groups, c.dropout)

        # per-point timestep embedding t -> (B, E, H, W, D)
        self.time_mlp = nn.Sequential(
            nn.Linear(c.time_dim, c.time_dim * 2), nn.SiLU(), nn.Linear(c.time_dim * 2, c.time_dim)
        )
        self.stem = nn.Conv3d(2 * c.num_classes, chans[0], 3, padding=1)

        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        skip_chans = []
        cin = chans[0]
        for level, cout in enumerate(chans):
            blocks = nn.ModuleList()
            for _ in range(c.num_res_blocks):
                blocks.append(block(cin, cout))
                cin = cout
                skip_chans.append(cout)
            self.down.append(blocks)
            last = level == len(chans) - 1
            self.downsample.append(nn.Identity() if last else nn.Conv3d(cout, cout, 3, stride=2, padding=1))

        self.mid = nn.ModuleList([block(cin, cin), block(cin, cin)])

        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for level in reversed(range(len(chans))):
            cout = chans[level]
            blocks = nn.ModuleList()
            for _ in range(c.num_res_blocks):
                blocks.append(block(cin + skip_chans.pop(), cout))
                cin = cout
            self.up.append(blocks)
            first = level == 0
            self.upsample.append(
                nn.Identity() if first
                else nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv3d(cout, cout, 3, padding=1))
            )

        self.out = nn.Sequential(
            nn.GroupNorm(c.groups, chans[0]), nn.SiLU(), nn.Conv3d(chans[0], c.num_classes, 3, padding=1)
        )

    def forward(self, y_t: torch.Tensor, M: torch.Tensor, t: torch.Tensor, F_prior: torch.Tensor) -> torch.Tensor:
        """Predict the noise in ``y_t``.

        Args:
            y_t: noisy class map (B, C, H, W, D).
            M: dense guidance map (B, C, H, W, D).
            t: integer timesteps, one per grid point (B, H, W, D).
            F_prior: feature prior (B, feature_dim).

        Returns:
            eps_hat (B, C, H, W, D).
        """
        c = self.config
        if y_t.ndim != 5 or y_t.shape[1] != c.num_classes or M.shape != y_t.shape:
            raise ValueError(
                f"UNet3D expects y_t and M of shape (B, {c.num_classes}, H, W, D), "
                f"got {tuple(y_t.shape)} and {tuple(M.shape)}"
            )
        B, _, H, W, D = y_t.shape
        if t.shape != (B, H, W, D):
            raise ValueError(f"UNet3D expects per-point timesteps t of shape {(B, H, W, D)}, got {tuple(t.shape)}")
        if F_prior.shape != (B, c.feature_dim):
            raise ValueError(f"UNet3D expects F of shape {(B, c.feature_dim)}, got {tuple(F_prior.shape)}")
        if not (H == W == D):
            raise ValueError(f"UNet3D expects a cubic grid, got {(H, W, D)}")
        check_grid_size(H, len(c.channel_mults))

        temb = self.time_mlp(sinusoidal_embedding(t, c.time_dim))  # (B, H, W, D, E)
        temb = temb.permute(0, 4, 1, 2, 3).contiguous()  # (B, E, H, W, D)

        h = self.stem(torch.cat([y_t, M], dim=1))  # (B, base, H, W, D)
        skips, time_maps = [], []
        last = len(self.down) - 1
        for level, (blocks, down) in enumerate(zip(self.down, self.downsample)):
            for blk in blocks:
                h = blk(h, temb, F_prior)
                skips.append(h)
            time_maps.append(temb)
            if level < last:
                h = down(h)  # (B, ch, H/2, W/2, D/2)
                temb = F.avg_pool3d(temb, 2)  # the time map follows the features down
        for blk in self.mid:
            h = blk(h, temb, F_prior)
        for blocks, up in zip(self.up, self.upsample):
            temb = time_maps.pop()
            for blk in blocks:
                h = blk(torch.cat([h, skips.pop()], dim=1), temb, F_prior)
            h = up(h)  # (B, ch, 2H, 2W, 2D) except at the top level
        return self.out(h)  # (B, C, H, W, D)
