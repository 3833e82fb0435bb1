"""DiffMIC-3D: the DCG-guided diffusion classifier for 3D CT, composed from its parts.

Pipeline (DiffMIC, Yang et al. MICCAI 2023, fig. 2, made 3D; DESIGN.md):

    scan (B, 1, H, W, D) --DCG (frozen in phase 2, run ONCE per volume)--> DCGOutput
        --PriorGenerator--> M (B, C, Np, Np, Np), F (B, feature_dim)
        --PriorShiftedDiffusion(UNet3D)--> y_0 (B, C, Np, Np, Np) --> probabilities (B, C)

Training is two-phase: phase 1 trains the DCG alone (``dcg_loss``: CE on its global and
local logits); phase 2 freezes it (``freeze_dcg``), caches its outputs per volume
(``guidance``) and trains the prior generator, the U-Net and the classifier head on
``diffusion_loss`` (heterologous denoising MSE + lambda CE of the head on F). Sampling
(``predict``) reuses one set of priors for every denoising step.

Checkpoints hold ``{'model_config': config.to_dict(), 'model_state_dict': state_dict()}``:

    checkpoint = torch.load(path, weights_only=True)
    model = DiffMIC3D(ModelConfig.from_dict(checkpoint['model_config']))
    model.load_state_dict(checkpoint['model_state_dict'])
    probs = model(scan, training=False)   # (B, C), rows sum to 1
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from models.dcg_model import DCG, DCGConfig, DCGOutput
from models.diffusion_process import DiffusionConfig, PriorShiftedDiffusion
from models.prior_generator import PriorConfig, PriorGenerator, Priors
from models.unet_3d import UNet3D, UNetConfig

# config

GUIDANCE_KEYS = ("global_probs", "local_probs", "global_features", "roi_features")
Guidance = Union[DCGOutput, Mapping]  # a DCGOutput, or a cache dict holding GUIDANCE_KEYS


@dataclass
class ModelConfig:
    """One config per concern, checked for consistency.

    Build it with :meth:`create` (or the presets :meth:`seed`, :meth:`tiny`), where the
    shared sizes -- num_classes, grid_size, feature_dim -- are given once and propagated;
    a hand-built inconsistent combination raises ValueError listing every mismatch.

    Args:
        dcg: the guidance network.
        prior: the prior generator; its num_classes / num_rois / global_dim / roi_dim must
            match the DCG, its grid_size / feature_dim the U-Net.
        unet: the denoiser.
        diffusion: schedule, loss weight and sampling defaults.
    """

    dcg: DCGConfig
    prior: PriorConfig
    unet: UNetConfig
    diffusion: DiffusionConfig

    def __post_init__(self):
        d, p, u = self.dcg, self.prior, self.unet
        pairs = [
            ("dcg.num_classes", d.num_classes, "prior.num_classes", p.num_classes),
            ("dcg.num_classes", d.num_classes, "unet.num_classes", u.num_classes),
            ("dcg.num_rois", d.num_rois, "prior.num_rois", p.num_rois),
            ("dcg.feature_dim", d.feature_dim, "prior.global_dim", p.global_dim),
            ("dcg.local_dim", d.local_dim, "prior.roi_dim", p.roi_dim),
            ("prior.grid_size", p.grid_size, "unet.grid_size", u.grid_size),
            ("prior.feature_dim", p.feature_dim, "unet.feature_dim", u.feature_dim),
        ]
        bad = [f"{a}={va} != {b}={vb}" for a, va, b, vb in pairs if va != vb]
        if bad:
            raise ValueError("inconsistent ModelConfig (build it with ModelConfig.create): " + "; ".join(bad))

    @property
    def num_classes(self) -> int:
        return self.dcg.num_classes

    @property
    def grid_size(self) -> int:
        return self.prior.grid_size

    @classmethod
    def create(cls, num_classes: int = 2, input_shape: tuple[int, int, int] = (128, 128, 64),
               grid_size: int = 8, feature_dim: int = 256, dcg: Optional[dict[str, Any]] = None,
               unet: Optional[dict[str, Any]] = None,
               diffusion: Optional[dict[str, Any]] = None) -> "ModelConfig":
        """The one place where shared sizes are set.

        Args:
            num_classes: C, for the DCG, the priors, the U-Net and the head.
            input_shape: (H, W, D) of the preprocessed volume.
            grid_size: Np of the guidance grid (priors and U-Net).
            feature_dim: width of the feature prior F (prior generator output, U-Net FiLM input).
            dcg, unet, diffusion: overrides of the remaining fields of each config (the shared
                fields above may not be overridden here).
        """
        reserved = {"dcg": {"num_classes", "input_shape"}, "unet": {"num_classes", "grid_size", "feature_dim"}}
        for name, overrides in (("dcg", dcg), ("unet", unet)):
            clash = reserved[name] & set(overrides or {})
            if clash:
                raise ValueError(f"ModelConfig.create: set {sorted(clash)} as create() arguments, not in {name}=")
        dcg_cfg = DCGConfig(num_classes=num_classes, input_shape=tuple(input_shape), **(dcg or {}))
        prior_cfg = PriorConfig(num_classes=num_classes, num_rois=dcg_cfg.num_rois, global_dim=dcg_cfg.feature_dim,
                                roi_dim=dcg_cfg.local_dim, feature_dim=feature_dim, grid_size=grid_size)
        unet_cfg = UNetConfig(num_classes=num_classes, grid_size=grid_size, feature_dim=feature_dim, **(unet or {}))
        return cls(dcg=dcg_cfg, prior=prior_cfg, unet=unet_cfg, diffusion=DiffusionConfig(**(diffusion or {})))

    @classmethod
    def seed(cls, num_classes: int = 2) -> "ModelConfig":
        """The seed's full size: 128x128x64 input, Np = 8, K = 5, T = 500, every default."""
        return cls.create(num_classes=num_classes)

    @classmethod
    def tiny(cls, num_classes: int = 2, input_shape: tuple[int, int, int] = (32, 32, 16)) -> "ModelConfig":
        """A few-hundred-thousand-parameter model for tests and CI (Np = 4, K = 2, 5 DDIM steps)."""
        return cls.create(
            num_classes=num_classes, input_shape=input_shape, grid_size=4, feature_dim=32,
            dcg=dict(global_channels=(8, 16, 16, 32), global_blocks=(1, 1, 1, 1), feature_dim=32, top_t=0.25,
                     num_rois=2, roi_size=(8, 8, 8), nms_radius=0, local_channels=(8, 16), local_blocks=(1, 1),
                     local_dim=16, attention_dim=16, norm_groups=4),
            unet=dict(base_channels=16, channel_mults=(1, 2), time_dim=32, groups=8),
            diffusion=dict(ddim_steps=5),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain nested data (JSON-serialisable; loads with ``torch.load(weights_only=True)``)."""
        return {f.name: getattr(self, f.name).to_dict() for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping) -> "ModelConfig":
        """Inverse of ``to_dict``; missing or unknown sections are an error."""
        expected = {"dcg": DCGConfig, "prior": PriorConfig, "unet": UNetConfig, "diffusion": DiffusionConfig}
        if set(data) != set(expected):
            raise ValueError(f"ModelConfig.from_dict needs exactly the sections {sorted(expected)}, got {sorted(data)}")
        return cls(**{name: kind.from_dict(dict(data[name])) for name, kind in expected.items()})


# model


def guidance_tensors(guidance: Guidance) -> dict[str, torch.Tensor]:
    """The four DCG outputs the priors need, from a DCGOutput or a cache mapping."""
    if isinstance(guidance, Mapping):
        missing = [k for k in GUIDANCE_KEYS if k not in guidance]
        if missing:
            raise ValueError(f"cached guidance is missing {missing} (save DCGOutput.as_dict())")
        return {k: guidance[k] for k in GUIDANCE_KEYS}
    return {k: getattr(guidance, k) for k in GUIDANCE_KEYS}


class DiffMIC3D(nn.Module):
    """DCG + prior generator + 3D U-Net denoiser + prior-shifted diffusion + classifier head.

    The head (Linear on F -> C) supplies the CE term of the phase-2 loss, which shapes the
    feature prior F; predictions come from the diffusion.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.dcg = DCG(config.dcg)
        self.prior_generator = PriorGenerator(config.prior)
        self.unet = UNet3D(config.unet)
        self.diffusion = PriorShiftedDiffusion(config.diffusion)
        self.head = nn.Linear(config.prior.feature_dim, config.num_classes)

    @classmethod
    def from_config_dict(cls, data: Mapping) -> "DiffMIC3D":
        """``DiffMIC3D(ModelConfig.from_dict(data))``."""
        return cls(ModelConfig.from_dict(data))

    # -- phase 1 -------------------------------------------------------------------------

    def dcg_loss(self, scan: torch.Tensor, labels: torch.Tensor, x_hires: Optional[torch.Tensor] = None,
                 label_smoothing: float = 0.0) -> dict[str, torch.Tensor]:
        """Phase-1 objective: CE(global logits) + CE(local logits).

        Returns dict(loss, global_ce, local_ce, output) with ``output`` the DCGOutput.
        """
        out = self.dcg(scan, x_hires)
        global_ce = F.cross_entropy(out.global_logits, labels, label_smoothing=label_smoothing)
        local_ce = F.cross_entropy(out.local_logits, labels, label_smoothing=label_smoothing)
        return {"loss": global_ce + local_ce, "global_ce": global_ce, "local_ce": local_ce, "output": out}

    def freeze_dcg(self) -> "DiffMIC3D":
        """Freeze the DCG for phase 2 (no gradients, eval mode); returns self."""
        self.dcg.requires_grad_(False)
        self.dcg.eval()
        return self

    # -- phase 2 and inference -----------------------------------------------------------

    @torch.no_grad()
    def guidance(self, scan: torch.Tensor, x_hires: Optional[torch.Tensor] = None) -> DCGOutput:
        """Run the (frozen) DCG once on ``scan`` (B, 1, H, W, D); cache the result per volume."""
        return self.dcg(scan, x_hires)

    def priors(self, global_probs: torch.Tensor, local_probs: torch.Tensor, global_features: torch.Tensor,
               roi_features: torch.Tensor) -> Priors:
        """M (B, C, Np, Np, Np) and F (B, feature_dim) from (cached) DCG tensors."""
        return self.prior_generator(global_probs, local_probs, global_features, roi_features)

    def diffusion_loss(self, guidance: Guidance, labels: torch.Tensor,
                       generator: Optional[torch.Generator] = None) -> dict[str, torch.Tensor]:
        """Phase-2 objective from cached guidance: dict(loss, mse, ce), see ``training_loss``."""
        priors = self.priors(**guidance_tensors(guidance))
        logits = self.head(priors.feature_prior)  # (B, C)
        return self.diffusion.training_loss(self.unet, priors.guidance_map, priors.feature_prior, logits,
                                            labels, generator=generator)

    @torch.no_grad()
    def predict(self, inputs: Union[torch.Tensor, Guidance], x_hires: Optional[torch.Tensor] = None,
                num_samples: Optional[int] = None, sampler: Optional[str] = None, steps: Optional[int] = None,
                eta: Optional[float] = None, generator: Optional[torch.Generator] = None,
                return_trajectory: bool = False) -> dict[str, torch.Tensor]:
        """Class probabilities with uncertainty.

        Args:
            inputs: a scan (B, 1, H, W, D) -- the DCG then runs once here -- or cached
                guidance (a DCGOutput or a mapping with GUIDANCE_KEYS).
            x_hires: the high-resolution copy for ``roi_scale > 1`` (scans only).
            num_samples, sampler, eta: override the DiffusionConfig defaults.
            steps: DDIM steps (default ``config.diffusion.ddim_steps``; ignored by DDPM).
            generator: the source of all sampling noise (same seed -> same output).
            return_trajectory: add per-step probabilities (S, steps + 1, B, C).

        Returns:
            dict(probs (B, C), std (B, C), entropy (B,), samples (S, B, C),
            y0_samples (S, B, C, Np, Np, Np)[, trajectory]);
            probabilities are the softmax of the grid-averaged final y_0 (``prob_from``).
        """
        if isinstance(inputs, torch.Tensor):
            guidance = self.guidance(inputs, x_hires)
        elif x_hires is not None:
            raise ValueError("DiffMIC3D.predict: x_hires is only used with a scan, not with cached guidance")
        else:
            guidance = inputs
        priors = self.priors(**guidance_tensors(guidance))
        sampler = sampler or self.config.diffusion.sampler
        if sampler == "ddim" and steps is None:
            steps = self.config.diffusion.ddim_steps
        return self.diffusion.predict_proba(self.unet, priors.guidance_map, priors.feature_prior,
                                            num_samples=num_samples, sampler=sampler, steps=steps, eta=eta,
                                            generator=generator, return_trajectory=return_trajectory)

    def forward(self, scan: torch.Tensor, training: bool = False, labels: Optional[torch.Tensor] = None,
                x_hires: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None):
        """``training=False``: probabilities (B, C). ``training=True``: the phase-2 loss dict
        (needs ``labels`` (B,)); the DCG is run without gradients either way."""
        if training:
            if labels is None:
                raise ValueError("DiffMIC3D.forward(training=True) needs labels (B,)")
            return self.diffusion_loss(self.guidance(scan, x_hires), labels, generator=generator)
        return self.predict(scan, x_hires=x_hires, generator=generator)["probs"]

    # -- reporting -----------------------------------------------------------------------

    def param_counts(self) -> dict[str, int]:
        """Parameters per component: dcg_global, dcg_local, prior_generator, unet, head, total."""
        dcg = self.dcg.param_counts()
        counts = {
            "dcg_global": dcg["global_encoder"] + dcg["saliency_head"],
            "dcg_local": dcg["local_encoder"] + dcg["attention"] + dcg["local_classifier"],
            "prior_generator": _count(self.prior_generator),
            "unet": _count(self.unet),
            "head": _count(self.head),
        }
        counts["total"] = sum(counts.values())
        return counts

    def format_param_table(self) -> str:
        """Markdown table of ``param_counts`` for the README."""
        names = {"dcg_global": "DCG global stream", "dcg_local": "DCG local stream + MIL",
                 "prior_generator": "Prior generator", "unet": "3D U-Net denoiser",
                 "head": "Classifier head", "total": "**Total**"}
        rows = ["| Component | Parameters |", "|---|---:|"]
        rows += [f"| {names[k]} | {_human(v)} ({v:,}) |" for k, v in self.param_counts().items()]
        return "\n".join(rows)


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _human(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"
