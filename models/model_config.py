"""The configuration of DiffMIC-3D (``ModelConfig``): one dataclass per part (DCG, priors,
denoiser, diffusion), with the sizes they share set once (``ModelConfig.create``) and the
named presets (``tiny``, ``small``, ``full``). ``models.diffmic3d`` composes the model from it.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Optional

from models.dcg_config import DCGConfig
from models.denoiser import DenoiserConfig
from models.diffusion_process import DiffusionConfig
from models.prior_generator import PriorConfig

# config

PRESETS = ("tiny", "small", "full")  # ModelConfig.<name>(): the named model sizes
MODEL_SECTIONS = ("dcg", "prior", "denoiser", "diffusion")  # what ModelConfig.with_changes may change, by section
# fields added after checkpoints were written, with the value those checkpoints had in effect
# (from_dict fills them in; any other missing field is an error; the default may differ)
ADDED_LATER = {"denoiser": {"image_ce_weight": 0.0}, "prior": {"blend": "distance"}}


def with_added_later(sections: Mapping[str, Any]) -> dict[str, Any]:
    """A model config as plain data (section -> fields) with the fields of ``ADDED_LATER`` that
    a section lacks filled in; other sections and non-dict values are kept as they are."""
    return {name: {**ADDED_LATER[name], **value} if name in ADDED_LATER and isinstance(value, Mapping) else value
            for name, value in sections.items()}

# fields of a section that ModelConfig.create sets from its shared sizes (never overridden per section)
SHARED_FIELDS = {"dcg": {"num_classes", "input_shape"}, "denoiser": {"num_classes", "grid_size", "feature_dim"},
                 "prior": {"num_classes", "num_rois", "global_dim", "roi_dim", "feature_dim", "grid_size",
                           "fold_dcgs"},
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
        if self.diffusion.parameterization == "eps" and n.prior_residual:
            bad.append("denoiser.prior_residual=True needs diffusion.parameterization='y0' (the residual is on y_0)")
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
               grid_size: int = 8, feature_dim: int = 256, fold_dcgs: int = 0,
               dcg: Optional[dict[str, Any]] = None, denoiser: Optional[dict[str, Any]] = None,
               diffusion: Optional[dict[str, Any]] = None, prior: Optional[dict[str, Any]] = None) -> "ModelConfig":
        """The one place where shared sizes are set.

        Args:
            num_classes: C, for the DCG, the priors and the denoiser.
            input_shape: (H, W, D) of the preprocessed volume.
            grid_size: Np of the guidance grid (priors and denoiser).
            feature_dim: width of the feature prior F.
            fold_dcgs: out-of-fold DCGs kept as prior members besides the final one (0 or >= 2).
            dcg, denoiser, diffusion, prior: overrides of the remaining fields of each config.
        """
        for name, overrides in (("dcg", dcg), ("denoiser", denoiser), ("prior", prior)):
            clash = SHARED_FIELDS[name] & set(overrides or {})
            if clash:
                raise ValueError(f"ModelConfig.create: set {sorted(clash)} as create() arguments, not in {name}=")
        dcg_cfg = DCGConfig(num_classes=num_classes, input_shape=tuple(input_shape), **(dcg or {}))
        prior_cfg = PriorConfig(num_classes=num_classes, num_rois=dcg_cfg.num_rois, global_dim=dcg_cfg.feature_dim,
                                roi_dim=dcg_cfg.local_dim, feature_dim=feature_dim, grid_size=grid_size,
                                fold_dcgs=fold_dcgs, **(prior or {}))
        den_cfg = DenoiserConfig(num_classes=num_classes, grid_size=grid_size, feature_dim=feature_dim,
                                 **(denoiser or {}))
        return cls(dcg=dcg_cfg, prior=prior_cfg, denoiser=den_cfg, diffusion=DiffusionConfig(**(diffusion or {})))

    def with_changes(self, dcg: Optional[dict[str, Any]] = None, denoiser: Optional[dict[str, Any]] = None,
                     diffusion: Optional[dict[str, Any]] = None, prior: Optional[dict[str, Any]] = None,
                     **shared) -> "ModelConfig":
        """A consistent copy with some fields changed, rebuilt through :meth:`create`.

        ``dcg``, ``prior``, ``denoiser``, ``diffusion``: field -> new value of that section; ``shared``: any of
        ``num_classes``, ``input_shape``, ``grid_size``, ``feature_dim``, ``fold_dcgs``. What follows
        from a change follows (e.g. ``dcg={'num_rois': 5}`` also gives the prior generator K = 5).
        """
        sizes = {"num_classes": self.num_classes, "input_shape": self.dcg.input_shape,
                 "grid_size": self.grid_size, "feature_dim": self.prior.feature_dim,
                 "fold_dcgs": self.prior.fold_dcgs}
        unknown = sorted(set(shared) - set(sizes))
        if unknown:
            raise ValueError(f"ModelConfig.with_changes: unknown arguments {unknown}; shared sizes are {sorted(sizes)}")
        sections = {}
        for name, changes in zip(MODEL_SECTIONS, (dcg, prior, denoiser, diffusion)):
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
        """Inverse of ``to_dict``; missing or unknown sections or fields are an error (a config
        written by another version of the model must not load with defaults filled in), except
        the fields of ``ADDED_LATER``, which take the value that older checkpoints had in effect."""
        expected = {"dcg": DCGConfig, "prior": PriorConfig, "denoiser": DenoiserConfig, "diffusion": DiffusionConfig}
        if set(data) != set(expected):
            raise ValueError(f"ModelConfig.from_dict needs exactly the sections {sorted(expected)}, got {sorted(data)}")
        data = with_added_later(data)
        for name, kind in expected.items():
            missing = sorted({f.name for f in fields(kind)} - set(data[name]))
            if missing:
                raise ValueError(f"ModelConfig.from_dict: section {name!r} lacks {missing}")
        return cls(**{name: kind.from_dict(dict(data[name])) for name, kind in expected.items()})
