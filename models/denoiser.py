"""The denoiser y0_theta(y_t, t | scan, M, F): a condition branch and a per-point head.

Why this shape (CARD, Han et al. 2022; DiffMIC-v2's 1x1 denoiser; measured failures of our
first version): the label must reach the output only through the image and the priors.

* Condition branch, run ONCE per volume (it does not depend on y_t or t):
    - its own trainable image encoder (conv-BN-ReLU-maxpool, the DCG global encoder's design)
      on the scan (B, 1, H, W, D) -> feature map resampled to the grid (B, E_img, Np, Np, Np);
    - the DCG feature prior F (B, feature_dim), LayerNorm-ed and projected to (B, E_f),
      broadcast over the grid;
    - the dense guidance map M (B, C, Np, Np, Np);
    - optionally (``morphometry``) 15 shape descriptors of the scan (``models/morphometry.py``),
      standardised on the training split and added to the image features through a
      zero-initialised linear map (B, E_img), so the option starts as the model without it;
  concatenated and mixed spatially by the 3D U-Net (``models/unet_3d.py``) into a
  GroupNorm-ed condition map (B, E, Np, Np, Np).
* Per-point head, run once per denoising step: for each grid point on its own (1x1x1 convs),
  ``h = W1 [y_t, M]``, FiLM by the point's timestep embedding, multiplied by the point's
  condition vector (CARD's y (*) x fusion), two more 1x1x1 layers -> a correction r; with
  ``prior_residual`` (the design) ``y0_hat = M + r`` and the last layer is zero-initialised, so
  an untrained denoiser returns its prior exactly and training learns where to depart from it
  (measured on AdrenalMNIST3D: a denoiser that predicted y0 from scratch ignored its priors,
  replacing them by uninformative ones changed its test AUC by +0.0006).
  The head runs in float32 even under autocast (``models/precision.py``); its FiLM starts as the
  identity (zero-initialised) and its scale is bounded by tanh, so no timestep can blow h up.
  A point's output depends on its own y_t and t only, so heterologous (per-point) timesteps
  cannot leak the label between points, and training and inference see the same computation.

Sections: config, blocks, model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.encoders import ConvPoolEncoder3d
from models.morphometry import DESCRIPTORS, ShapeDescriptors
from models.precision import float32_forward
from models.plain_config import PlainConfig
from models.unet_3d import UNet3D, UNetConfig

# config


@dataclass
class DenoiserConfig(PlainConfig):
    """Sizes of :class:`ConditionalDenoiser`; the U-Net's config is derived from them.

    Args:
        num_classes: C.
        grid_size: Np.
        feature_dim: width of the DCG feature prior F.
        encoder_channels / encoder_blocks: the own image encoder (``ConvPoolEncoder3d``).
        image_dim: E_img, image-feature channels on the grid.
        prior_dim: E_f, channels of the projected feature prior.
        cond_dim: E, width of the condition map and of the per-point head.
        unet_base / unet_mults: the condition U-Net's widths.
        time_dim: width of the sinusoidal timestep embedding.
        groups: GroupNorm groups (divides unet widths and cond_dim).
        use_image_encoder / use_feature_prior: ablation switches (the input is zero without).
        head_kernel: kernel of the per-point head's layers: 1 (the design: no point sees
            another's y_t) or 3, the first version's label leak, kept only for the ablation.
        film: ``'bounded'`` (FiLM scale through tanh, the design since the float16 hardening)
            or ``'unbounded'`` (the earlier head, ``h * (1 + s)``). A field, so a checkpoint of
            one variant is never loaded into the other.
        prior_residual: ``y0_hat = M + correction`` with a zero-initialised last layer (the
            design), or False: the head predicts y0_hat directly (the earlier head, ablation).
        image_ce_weight: deep supervision of the own image encoder: a linear classifier on its
            grid-mean features (``classify_image``) adds ``image_ce_weight * CE`` to the phase-2
            loss, so the encoder learns the classes from the scan itself instead of only through
            the small correction of the prior. Off by default (0: no classifier): measured on
            AdrenalMNIST3D (5 seeds, same DCGs), 0.5 lowered the mean validation AUC by 0.003 and
            the test AUC by 0.005 (README, "Benchmark"); kept as an option and an ablation.
        morphometry: the condition also reads the scan's shape descriptors (module docstring).
            Off by default: a retrained variant (``--ablations morphometry``) until the cross-fit
            decides it. The descriptors stay with ``use_image_encoder`` off.
    """

    num_classes: int = 2
    grid_size: int = 8
    feature_dim: int = 256
    encoder_channels: tuple[int, ...] = (32, 64, 128, 256)
    encoder_blocks: tuple[int, ...] = (1, 2, 2, 1)
    image_dim: int = 64
    prior_dim: int = 32
    cond_dim: int = 128  # E: the condition U-Net's output width
    unet_base: int = 64
    unet_mults: tuple[int, ...] = (1, 2)
    time_dim: int = 64  # sinusoidal embedding of the per-point t
    groups: int = 8
    use_image_encoder: bool = True
    use_feature_prior: bool = True
    head_kernel: int = 1
    film: str = "bounded"
    prior_residual: bool = True
    image_ce_weight: float = 0.0
    morphometry: bool = False

    def __post_init__(self):
        self.encoder_channels = tuple(int(c) for c in self.encoder_channels)
        self.encoder_blocks = tuple(int(b) for b in self.encoder_blocks)
        self.unet_mults = tuple(int(m) for m in self.unet_mults)
        if len(self.encoder_channels) != len(self.encoder_blocks) or not self.encoder_channels:
            raise ValueError("DenoiserConfig: encoder_channels and encoder_blocks need the same non-zero length")
        if self.num_classes < 2 or self.time_dim % 2:
            raise ValueError(f"DenoiserConfig needs num_classes >= 2 and an even time_dim, got "
                             f"{self.num_classes}, {self.time_dim}")
        if self.film not in ("bounded", "unbounded"):
            raise ValueError(f"DenoiserConfig.film must be 'bounded' or 'unbounded', got {self.film!r}")
        if not self.image_ce_weight >= 0:
            raise ValueError(f"DenoiserConfig.image_ce_weight must be >= 0, got {self.image_ce_weight}")
        if self.head_kernel not in (1, 3):
            raise ValueError(f"DenoiserConfig.head_kernel must be 1 or 3, got {self.head_kernel}")
        self.unet_config()  # validates widths and grid

    def unet_config(self) -> UNetConfig:
        """The condition U-Net: input [M, image features, feature prior], output E channels."""
        return UNetConfig(in_channels=self.num_classes + self.image_dim + self.prior_dim, out_channels=self.cond_dim,
                          grid_size=self.grid_size, base_channels=self.unet_base, channel_mults=self.unet_mults,
                          groups=self.groups)


# blocks


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Transformer embedding of integer timesteps of any shape S -> (*S, dim): [sin(t w_k), cos(t w_k)]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float().unsqueeze(-1) * freqs  # (*S, half)
    return torch.cat([args.sin(), args.cos()], dim=-1)


class PointHead(nn.Module):
    """Per-point y0 predictor: 1x1x1 layers only (no spatial mixing of y_t); ``kernel=3`` is
    the leaky variant of the ablation."""

    def __init__(self, num_classes: int, width: int, time_dim: int, kernel: int = 1, bounded: bool = True,
                 prior_residual: bool = True):
        super().__init__()
        self.time_dim, self.bounded, self.prior_residual = time_dim, bounded, prior_residual
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, width), nn.SiLU(), nn.Linear(width, 4 * width))
        self.inp = nn.Conv3d(2 * num_classes, width, kernel, padding=kernel // 2)
        self.mid = nn.Conv3d(width, width, kernel, padding=kernel // 2)
        self.out = nn.Conv3d(width, num_classes, kernel, padding=kernel // 2)
        nn.init.zeros_(self.time_mlp[-1].weight)  # FiLM starts as the identity (scale 1, shift 0)
        nn.init.zeros_(self.time_mlp[-1].bias)
        if prior_residual:  # the correction starts at zero: y0_hat = M before any training
            self.switch_off_correction()

    @torch.no_grad()
    def switch_off_correction(self) -> None:
        """Zero the correction's last layer, so the head returns its prior M exactly (what it
        starts from; ``check_correction``'s and the ablations' prior-only model). Only a head
        with ``prior_residual`` has a correction to switch off."""
        if not self.prior_residual:
            raise ValueError("a head without prior_residual predicts y0 itself: it has no correction to switch off")
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    @float32_forward
    def forward(self, y_t: torch.Tensor, M: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """y_t, M (B, C, *grid); t (B, *grid) per point, or (B,) one timestep for all the points
        of a row (sampling: the time MLP then runs once per row, not once per point); cond
        (B, E, *grid) -> y0_hat (B, C, *grid), in float32."""
        temb = self.time_mlp(sinusoidal_embedding(t, self.time_dim))  # (B, *grid, 4E) or (B, 4E)
        if t.dim() == 1:
            temb = temb[(...,) + (None,) * (y_t.dim() - 2)].movedim(1, -1)  # (B, 1, 1, 1, 4E): broadcast
        s1, b1, s2, b2 = temb.movedim(-1, 1).chunk(4, dim=1)  # 4 x (B, E, *grid or 1, 1, 1)
        if self.bounded:
            s1, s2 = torch.tanh(s1), torch.tanh(s2)  # bounded FiLM scale: h * (1 + s) stays within [0, 2] h
        h = self.inp(torch.cat([y_t, M], dim=1))  # (B, E, *grid)
        h = F.silu((h * (1 + s1) + b1) * cond)  # time FiLM, then the condition product
        h = self.mid(h)
        h = F.silu(h * (1 + s2) + b2)
        correction = self.out(h)  # (B, C, *grid)
        return M.float() + correction if self.prior_residual else correction


# model


class ConditionalDenoiser(nn.Module):
    """``condition`` once per volume, then ``forward`` (the per-point head) once per step."""

    def __init__(self, config: DenoiserConfig):
        super().__init__()
        self.config = c = config
        self.image_encoder = ConvPoolEncoder3d(1, c.encoder_channels, c.encoder_blocks)
        self.image_proj = nn.Sequential(nn.Conv3d(c.encoder_channels[-1], c.image_dim, 1),
                                        nn.GroupNorm(math.gcd(c.image_dim, c.groups), c.image_dim))
        self.prior_norm = nn.LayerNorm(c.feature_dim)
        self.prior_proj = nn.Linear(c.feature_dim, c.prior_dim)
        self.unet = UNet3D(c.unet_config())
        self.head = PointHead(c.num_classes, c.cond_dim, c.time_dim, c.head_kernel, bounded=c.film == "bounded",
                              prior_residual=c.prior_residual)
        # deep supervision of the image encoder (phase-2 training only; image_ce_weight)
        self.image_classifier = nn.Linear(c.image_dim, c.num_classes) if c.image_ce_weight > 0 else None
        self.shape = ShapeDescriptors() if c.morphometry else None
        self.shape_proj = nn.Linear(len(DESCRIPTORS), c.image_dim) if c.morphometry else None
        if self.shape_proj is not None:  # starts as the model without descriptors
            nn.init.zeros_(self.shape_proj.weight)
            nn.init.zeros_(self.shape_proj.bias)

    def encode_image(self, scan: torch.Tensor) -> torch.Tensor:
        """The own image encoder on the grid: scan (B, 1, H, W, D) -> (B, E_img, Np, Np, Np)
        (zeros without ``use_image_encoder``), plus the projected shape descriptors with
        ``morphometry`` (the same at every grid point). It does not depend on the priors, so
        several priors of one scan share it (``condition_from``)."""
        c = self.config
        grid = (c.grid_size,) * 3
        if not c.use_image_encoder:
            image = scan.new_zeros(scan.shape[0], c.image_dim, *grid)
        else:
            feats = self.image_encoder(scan)  # (B, ch, H/16, W/16, D/16)
            image = self.image_proj(F.interpolate(feats, size=grid, mode="trilinear", align_corners=False))
        if self.shape is not None:
            shape = self.shape_proj(self.shape(scan))  # (B, E_img)
            image = image + shape.to(image.dtype)[:, :, None, None, None]
        return image

    def classify_image(self, image: torch.Tensor) -> torch.Tensor:
        """Class logits (B, C) of the encoded scan ``image`` (B, E_img, Np, Np, Np) alone: the
        deep-supervision classifier on its grid mean (needs ``image_ce_weight > 0``)."""
        if self.image_classifier is None:
            raise ValueError("classify_image needs DenoiserConfig.image_ce_weight > 0 (no image classifier)")
        return self.image_classifier(image.float().mean(dim=(-3, -2, -1)))

    def condition(self, scan: torch.Tensor, M: torch.Tensor, F_prior: torch.Tensor) -> torch.Tensor:
        """scan (B, 1, H, W, D), M (B, C, Np, Np, Np), F_prior (B, feature_dim) -> cond (B, E, Np, Np, Np)."""
        return self.condition_from(self.encode_image(scan), M, F_prior)

    def condition_from(self, image: torch.Tensor, M: torch.Tensor, F_prior: torch.Tensor) -> torch.Tensor:
        """``condition`` from the encoded scan ``image`` (B, E_img, Np, Np, Np) (``encode_image``)."""
        c = self.config
        B, grid = M.shape[0], M.shape[2:]
        if c.use_feature_prior:
            prior = self.prior_proj(self.prior_norm(F_prior.float())).to(M.dtype)  # (B, E_f)
            prior = prior[:, :, None, None, None].expand(-1, -1, *grid)
        else:
            prior = M.new_zeros(B, c.prior_dim, *grid)
        return self.unet(torch.cat([M, image.to(M.dtype), prior], dim=1))  # (B, E, Np, Np, Np)

    def forward(self, y_t: torch.Tensor, M: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """y0_hat (B, C, Np, Np, Np) from y_t (B, C, Np^3), M, t per point (B, Np^3) or per row
        (B,), cond (B, E, Np^3)."""
        if y_t.shape != M.shape or t.shape not in ((y_t.shape[0], *y_t.shape[2:]), (y_t.shape[0],)) \
                or cond.shape[2:] != y_t.shape[2:]:
            raise ValueError(f"ConditionalDenoiser: y_t {tuple(y_t.shape)}, M {tuple(M.shape)}, t {tuple(t.shape)}, "
                             f"cond {tuple(cond.shape)} do not match (B, C, *grid) / (B, *grid) or (B,) / "
                             "(B, E, *grid)")
        return self.head(y_t, M, t, cond)
