"""DiffMIC-3D: the DCG-guided diffusion classifier for 3D CT, composed from its parts.

Pipeline (DiffMIC, Yang et al. MICCAI 2023, fig. 2, made 3D; CARD, Han et al. 2022):

    scan (B, 1, H, W, D) --DCG (frozen in phase 2, run ONCE per volume)--> DCGOutput
        --PriorGenerator--> M (B, C, Np, Np, Np), F (B, feature_dim)
        --ConditionalDenoiser.condition(scan, M, F)--> cond (B, E, Np, Np, Np)   (once per volume)
        --PriorShiftedDiffusion.sample(per-point head)--> y_0 (B, C, Np, Np, Np)  (S chains)
        --softmax(grid mean of y_0 / temperature), mean over S--> probabilities (B, C)

Training is two-phase: phase 1 trains the DCG alone (``dcg_loss``); phase 2 freezes it
(``freeze_dcg``), caches its outputs per volume and trains the prior generator and the
denoiser (its own image encoder, the condition U-Net, the per-point head) on
``diffusion_loss``: heterologous y_0-prediction MSE + CE, with prior dropout (a share of the
volumes see a uniform guidance map and no feature prior, so the denoiser must read the scan).
The softmax temperature is learned state of this model, fitted on the validation split by
the training code (``set_temperature``); the noise schedule holds none.

Checkpoints hold ``{'model_config': config.to_dict(), 'model_state_dict': state_dict()}``:

    checkpoint = torch.load(path, weights_only=True)
    model = DiffMIC3D(ModelConfig.from_dict(checkpoint['model_config']))
    model.load_state_dict(checkpoint['model_state_dict'])
    probs = model(scan)   # (B, C), rows sum to 1
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Optional

import torch
from torch import nn

from models.dcg_config import DCGConfig
from models.dcg_model import DCG, DCGOutput, dcg_objective
from models.denoiser import ConditionalDenoiser, DenoiserConfig
from models.diffusion_process import DiffusionConfig, PriorShiftedDiffusion
from models.prior_generator import PriorConfig, PriorGenerator, Priors

# config

PRESETS = ("tiny", "small", "full")  # ModelConfig.<name>(): the named model sizes
MODEL_SECTIONS = ("dcg", "denoiser", "diffusion")  # what ModelConfig.with_changes may change, by section
# fields of a section that ModelConfig.create sets from its shared sizes (never overridden per section)
SHARED_FIELDS = {"dcg": {"num_classes", "input_shape"}, "denoiser": {"num_classes", "grid_size", "feature_dim"},
                 "diffusion": set()}


@dataclass
class ModelConfig:
    """One config per concern, checked for consistency.

    Build it with :meth:`create` or a preset (:meth:`tiny`, :meth:`small`, :meth:`full`), where
    the shared sizes -- num_classes, grid_size, feature_dim -- are given once and propagated;
    a hand-built inconsistent combination raises ValueError listing every mismatch.
    """

    dcg: DCGConfig
    prior: PriorConfig
    denoiser: DenoiserConfig
    diffusion: DiffusionConfig

    def __post_init__(self):
        d, p, n = self.dcg, self.prior, self.denoiser
        pairs = [
            ("dcg.num_classes", d.num_classes, "prior.num_classes", p.num_classes),
            ("dcg.num_classes", d.num_classes, "denoiser.num_classes", n.num_classes),
            ("dcg.num_rois", d.num_rois, "prior.num_rois", p.num_rois),
            ("dcg.feature_dim", d.feature_dim, "prior.global_dim", p.global_dim),
            ("dcg.local_dim", d.local_dim, "prior.roi_dim", p.roi_dim),
            ("prior.grid_size", p.grid_size, "denoiser.grid_size", n.grid_size),
            ("prior.feature_dim", p.feature_dim, "denoiser.feature_dim", n.feature_dim),
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
               denoiser: Optional[dict[str, Any]] = None,
               diffusion: Optional[dict[str, Any]] = None) -> "ModelConfig":
        """The one place where shared sizes are set.

        Args:
            num_classes: C, for the DCG, the priors and the denoiser.
            input_shape: (H, W, D) of the preprocessed volume.
            grid_size: Np of the guidance grid (priors and denoiser).
            feature_dim: width of the feature prior F.
            dcg, denoiser, diffusion: overrides of the remaining fields of each config.
        """
        for name, overrides in (("dcg", dcg), ("denoiser", denoiser)):
            clash = SHARED_FIELDS[name] & set(overrides or {})
            if clash:
                raise ValueError(f"ModelConfig.create: set {sorted(clash)} as create() arguments, not in {name}=")
        dcg_cfg = DCGConfig(num_classes=num_classes, input_shape=tuple(input_shape), **(dcg or {}))
        prior_cfg = PriorConfig(num_classes=num_classes, num_rois=dcg_cfg.num_rois, global_dim=dcg_cfg.feature_dim,
                                roi_dim=dcg_cfg.local_dim, feature_dim=feature_dim, grid_size=grid_size)
        den_cfg = DenoiserConfig(num_classes=num_classes, grid_size=grid_size, feature_dim=feature_dim,
                                 **(denoiser or {}))
        return cls(dcg=dcg_cfg, prior=prior_cfg, denoiser=den_cfg, diffusion=DiffusionConfig(**(diffusion or {})))

    def with_changes(self, dcg: Optional[dict[str, Any]] = None, denoiser: Optional[dict[str, Any]] = None,
                     diffusion: Optional[dict[str, Any]] = None, **shared) -> "ModelConfig":
        """A consistent copy with some fields changed, rebuilt through :meth:`create`.

        ``dcg``, ``denoiser``, ``diffusion``: field -> new value of that section; ``shared``: any of
        ``num_classes``, ``input_shape``, ``grid_size``, ``feature_dim``. What follows from a change
        follows (e.g. ``dcg={'num_rois': 5}`` also gives the prior generator K = 5).
        """
        sizes = {"num_classes": self.num_classes, "input_shape": self.dcg.input_shape,
                 "grid_size": self.grid_size, "feature_dim": self.prior.feature_dim}
        unknown = sorted(set(shared) - set(sizes))
        if unknown:
            raise ValueError(f"ModelConfig.with_changes: unknown arguments {unknown}; shared sizes are {sorted(sizes)}")
        sections = {}
        for name, changes in zip(MODEL_SECTIONS, (dcg, denoiser, diffusion)):
            current = getattr(self, name)
            known = {f.name for f in fields(current)} - SHARED_FIELDS[name]
            bad = sorted(set(changes or {}) - known)
            if bad:
                raise ValueError(f"ModelConfig.with_changes: {name} has no settable fields {bad}; known: {sorted(known)}")
            own = {k: v for k, v in current.to_dict().items() if k in known}
            sections[name] = {**own, **(changes or {})}
        return self.create(**{**sizes, **shared}, **sections)

    @classmethod
    def preset(cls, name: str, num_classes: int = 2,
               input_shape: Optional[tuple[int, int, int]] = None) -> "ModelConfig":
        """The named preset (one of ``PRESETS``) at ``input_shape`` (default: the preset's own)."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {PRESETS}")
        kwargs = {"num_classes": num_classes} if input_shape is None else \
            {"num_classes": num_classes, "input_shape": tuple(input_shape)}
        return getattr(cls, name)(**kwargs)

    @classmethod
    def full(cls, num_classes: int = 2, input_shape: tuple[int, int, int] = (128, 128, 64)) -> "ModelConfig":
        """The full size: 128x128x64 input, Np = 8, K = 5, T = 1000, every default."""
        return cls.create(num_classes=num_classes, input_shape=input_shape)

    @classmethod
    def small(cls, num_classes: int = 2, input_shape: tuple[int, int, int] = (64, 64, 32)) -> "ModelConfig":
        """A ~2M-parameter model for CPU runs (the ``demo`` profile and the benchmark)."""
        return cls.create(
            num_classes=num_classes, input_shape=input_shape, grid_size=8, feature_dim=128,
            dcg=dict(global_channels=(16, 32, 64, 128), global_blocks=(1, 1, 1, 1), feature_dim=128,
                     num_rois=3, local_channels=(16, 32, 64), local_blocks=(1, 1, 1), local_dim=64,
                     attention_dim=64),
            denoiser=dict(encoder_channels=(16, 32, 64, 128), encoder_blocks=(1, 1, 1, 1), image_dim=32,
                          prior_dim=32, cond_dim=64, unet_base=32, unet_mults=(1, 2), time_dim=64))

    @classmethod
    def tiny(cls, num_classes: int = 2, input_shape: tuple[int, int, int] = (32, 32, 16)) -> "ModelConfig":
        """A few-hundred-thousand-parameter model for tests and CI (Np = 4, K = 2, 5 DDIM steps, 4 samples)."""
        return cls.create(
            num_classes=num_classes, input_shape=input_shape, grid_size=4, feature_dim=32,
            dcg=dict(global_channels=(8, 16, 16, 32), global_blocks=(1, 1, 1, 1), feature_dim=32, top_t=0.25,
                     num_rois=2, roi_size=(8, 8, 8), nms_radius=0, local_channels=(8, 16), local_blocks=(1, 1),
                     local_dim=16, attention_dim=16, norm_groups=4),
            denoiser=dict(encoder_channels=(8, 16, 16, 32), encoder_blocks=(1, 1, 1, 1), image_dim=16,
                          prior_dim=16, cond_dim=32, unet_base=16, unet_mults=(1, 2), time_dim=32),
            diffusion=dict(ddim_steps=5, num_samples=4),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain nested data (JSON-serialisable; loads with ``torch.load(weights_only=True)``)."""
        return {f.name: getattr(self, f.name).to_dict() for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping) -> "ModelConfig":
        """Inverse of ``to_dict``; missing or unknown sections are an error."""
        expected = {"dcg": DCGConfig, "prior": PriorConfig, "denoiser": DenoiserConfig, "diffusion": DiffusionConfig}
        if set(data) != set(expected):
            raise ValueError(f"ModelConfig.from_dict needs exactly the sections {sorted(expected)}, got {sorted(data)}")
        return cls(**{name: kind.from_dict(dict(data[name])) for name, kind in expected.items()})


# model


class DiffMIC3D(nn.Module):
    """DCG + prior generator + conditional denoiser + prior-shifted diffusion + temperature."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.dcg = DCG(config.dcg)
        self.prior_generator = PriorGenerator(config.prior)
        self.denoiser = ConditionalDenoiser(config.denoiser)
        self.diffusion = PriorShiftedDiffusion(config.diffusion)
        # Softmax temperature of the readout (Guo et al. 2017), fitted on the validation split
        # after phase 2 (utils.training.diffusion.calibrate_temperature); learned state.
        self.register_buffer("temperature", torch.ones(()))

    @classmethod
    def from_config_dict(cls, data: Mapping) -> "DiffMIC3D":
        """``DiffMIC3D(ModelConfig.from_dict(data))``."""
        return cls(ModelConfig.from_dict(data))

    # -- phase 1 -------------------------------------------------------------------------

    def dcg_loss(self, scan: torch.Tensor, labels: torch.Tensor, x_hires: Optional[torch.Tensor] = None,
                 **kwargs) -> dict[str, torch.Tensor]:
        """Phase-1 objective of the DCG (``models.dcg_model.dcg_objective``; keyword arguments
        such as ``label_smoothing`` and ``progress`` are passed on).

        Returns dict(loss, global_ce, local_ce, output) with ``output`` the DCGOutput.
        """
        return dcg_objective(self.dcg, scan, labels, x_hires, **kwargs)

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

    def priors(self, guidance: DCGOutput) -> Priors:
        """The dense guidance map M and the feature prior F of the (cached) DCG outputs."""
        g = guidance
        return self.prior_generator(g.global_probs, g.local_probs, g.global_features, g.roi_features)

    def condition(self, scan: torch.Tensor, guidance: DCGOutput,
                  drop_prior: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(M (B, C, Np, Np, Np), cond (B, E, Np, Np, Np)) for a batch; run once per volume.

        ``drop_prior`` (B,) bool: those volumes get a uniform M (1/C) and a zero feature prior
        (prior dropout, training only).
        """
        priors = self.priors(guidance)
        M, F_prior = priors.guidance_map, priors.feature_prior  # (B, C, Np^3), (B, feature_dim)
        if drop_prior is not None:
            keep = (~drop_prior).to(M.dtype)
            M = M * keep[:, None, None, None, None] + (1 - keep[:, None, None, None, None]) / M.shape[1]
            F_prior = F_prior * keep[:, None]
        return M, self.denoiser.condition(scan, M, F_prior)

    def diffusion_loss(self, scan: torch.Tensor, guidance: DCGOutput, labels: torch.Tensor,
                       prior_dropout: float = 0.0,
                       generator: Optional[torch.Generator] = None) -> dict[str, torch.Tensor]:
        """Phase-2 objective: dict(loss, mse, ce) of ``PriorShiftedDiffusion.training_loss``.

        Args:
            scan: (B, 1, H, W, D) the volumes (the denoiser's own encoder reads them).
            guidance: the frozen DCG's outputs for them (cached).
            labels: (B,) class indices.
            prior_dropout: probability that a volume's priors are replaced (see ``condition``).
        """
        drop = None
        if prior_dropout > 0:
            drop = torch.rand(labels.shape[0], generator=generator,
                              device=generator.device if generator is not None else "cpu") < prior_dropout
            drop = drop.to(scan.device)
        M, cond = self.condition(scan, guidance, drop)
        return self.diffusion.training_loss(lambda y_t, t: self.denoiser(y_t, M, t, cond), M, labels,
                                            generator=generator)

    def probabilities(self, y: torch.Tensor) -> torch.Tensor:
        """Class probabilities (..., C) of class maps (..., C, Np, Np, Np): softmax over C of
        the grid-averaged map divided by the fitted temperature."""
        return torch.softmax(y.float().mean(dim=(-3, -2, -1)) / self.temperature, dim=-1)

    def set_temperature(self, value: float) -> None:
        """Store the validation-fitted softmax temperature (> 0)."""
        if not value > 0:
            raise ValueError(f"temperature must be > 0, got {value}")
        self.temperature.fill_(float(value))

    @torch.no_grad()
    def predict(self, scan: torch.Tensor, guidance: Optional[DCGOutput] = None,
                x_hires: Optional[torch.Tensor] = None, num_samples: Optional[int] = None,
                sampler: Optional[str] = None, steps: Optional[int] = None, eta: Optional[float] = None,
                generator: Optional[torch.Generator] = None,
                return_trajectory: bool = False) -> dict[str, torch.Tensor]:
        """Class probabilities with uncertainty from ``num_samples`` reverse chains.

        Args:
            scan: (B, 1, H, W, D) volumes (always needed: the denoiser encodes them).
            guidance: cached DCG outputs for them; None runs the DCG here (once).
            x_hires: the high-resolution copy for ``roi_scale > 1`` (when the DCG runs here).
            num_samples, sampler, steps, eta: override the DiffusionConfig defaults.
            generator: the source of all sampling noise (same seed -> same output).
            return_trajectory: add the per-step class probabilities.

        Returns:
            dict(probs (B, C) mean over samples, std (B, C) their spread, entropy (B,) of the
            mean, samples (S, B, C), y0_mean (S, B, C) grid means of the final y_0 (for
            temperature fitting), timesteps (n,) and, if asked, trajectory (S, n + 1, B, C)).
            The condition is computed once; the S chains run as one batch of S*B.
        """
        if guidance is None:
            guidance = self.guidance(scan, x_hires)
        S = num_samples or self.config.diffusion.num_samples
        B = scan.shape[0]
        M, cond = self.condition(scan, guidance)
        M_rep, cond_rep = M.repeat(S, 1, 1, 1, 1), cond.repeat(S, 1, 1, 1, 1)  # sample-major (S*B, ...)
        out = self.diffusion.sample(lambda y_t, t: self.denoiser(y_t, M_rep, t, cond_rep), M_rep, steps=steps,
                                    sampler=sampler, eta=eta, generator=generator,
                                    return_trajectory=return_trajectory)
        y0 = out.y0.reshape(S, B, *out.y0.shape[1:])  # (S, B, C, Np, Np, Np)
        samples = self.probabilities(y0)  # (S, B, C)
        probs = samples.mean(dim=0)
        result = {"probs": probs, "std": samples.std(dim=0, unbiased=False),
                  "entropy": -(probs * probs.clamp(min=1e-12).log()).sum(dim=1), "samples": samples,
                  "y0_mean": y0.float().mean(dim=(-3, -2, -1)), "timesteps": out.timesteps}
        if return_trajectory:
            states = out.trajectory.reshape(out.trajectory.shape[0], S, B, *out.trajectory.shape[2:])
            result["trajectory"] = self.probabilities(states).transpose(0, 1)  # (S, n + 1, B, C)
        return result

    def forward(self, scan: torch.Tensor, x_hires: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Probabilities (B, C) of ``scan`` (the DCG runs once, then the sampler)."""
        return self.predict(scan, x_hires=x_hires, generator=generator)["probs"]

    # -- reporting -----------------------------------------------------------------------

    def param_counts(self) -> dict[str, int]:
        """Parameters per component: dcg_global, dcg_local, prior_generator, image_encoder,
        condition_unet, point_head, total."""
        dcg = self.dcg.param_counts()
        d = self.denoiser
        counts = {
            "dcg_global": dcg["global_encoder"] + dcg["saliency_head"],
            "dcg_local": dcg["local_encoder"] + dcg["attention"] + dcg["local_classifier"],
            "prior_generator": _count(self.prior_generator),
            "image_encoder": _count(d.image_encoder) + _count(d.image_proj),
            "condition_unet": _count(d.unet) + _count(d.prior_norm) + _count(d.prior_proj),
            "point_head": _count(d.head),
        }
        counts["total"] = sum(counts.values())
        return counts

    def format_param_table(self) -> str:
        """Markdown table of ``param_counts`` for the README."""
        names = {"dcg_global": "DCG global stream", "dcg_local": "DCG local stream + MIL",
                 "prior_generator": "Prior generator", "image_encoder": "Denoiser image encoder",
                 "condition_unet": "Condition 3D U-Net", "point_head": "Per-point denoiser head",
                 "total": "**Total**"}
        rows = ["| Component | Parameters |", "|---|---:|"]
        rows += [f"| {names[k]} | {_human(v)} ({v:,}) |" for k, v in self.param_counts().items()]
        return "\n".join(rows)


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _human(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"
