"""Named run configurations (profiles) for the whole experiment, every value overridable.

    smoke  CI: 12 phantoms of 32 x 32 in-plane, input (32, 32, 32), the tiny model,
           2 epochs per stage, 2 out-of-fold DCGs, 2 DDIM steps: the pipeline in about 10 s.
    demo   the default main job on a 2-core CPU: the 100 embedded phantoms resampled to
           6 x 6 x 10 mm, input (64, 64, 32), ``ModelConfig.small`` (1.7M parameters), up to
           20 DCG / 40 diffusion / 20 baseline epochs with early stopping, 3 out-of-fold DCGs
           (about 12 minutes on 2 cores).
    full   the full size: 3 x 3 x 5 mm, (128, 128, 64), ``ModelConfig.full`` (8.2M), 15 DCG
           and 30 diffusion epochs, batch 4, early stopping patience 7.

``get_profile('demo', batch_size=2)`` or, on the command line,
``python -m utils.run --profile demo --set batch_size=2 --set input_shape=48,48,32``.
Every value, given in Python, as ``--set`` text or as JSON (``$MEDISCOPE_SET``), is converted
to its field's annotated type and checked against its range in ``LIMITS``
(``utils.overrides``); a value that is neither is refused with one line naming the field, the
value and what it accepts, e.g. ``batch_size='abc': expected a positive integer``.
A ``TrainConfig`` is saved (``to_dict``) in every checkpoint and run folder, as nanoGPT and
DiffMIC save theirs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal, Optional

from models.diffmic3d import MODEL_SECTIONS, PRESETS, ModelConfig
from models.model_config import SHARED_FIELDS
from models.plain_config import PlainConfig
from utils.data.discovery import LABEL_MODES
from utils.data.phantoms import PhantomConfig
from utils.overrides import Limit, convert_fields, convert_sections, field_types, parse_settings
from utils.seeding import amp_dtype, amp_enabled

BASELINE_NAMES = ("resnet18", "densenet121")
ERROR_WEIGHTINGS = ("label", "uncertainty")  # phase-2 loss weights (TrainConfig.error_weighting)

_POSITIVE_INT, _COUNT, _POSITIVE, _FRACTION = Limit(1), Limit(0), Limit(0, low_open=True), Limit(0, 1)
# the accepted range of every numeric TrainConfig field (of each element, for a tuple); the type
# and the choices of a string field come from its annotation (utils.overrides)
LIMITS = {
    "input_shape": Limit(16, multiple=16), "target_spacing": Limit(0, low_open=True, none="none"),
    "roi_scale": _POSITIVE_INT, "n_phantoms": Limit(6), "phantom_size": Limit(32), "phantom_seed": _COUNT,
    "batch_size": _POSITIVE_INT, "dcg_epochs": _COUNT, "diffusion_epochs": _COUNT, "baseline_epochs": _COUNT,
    "lr_dcg": _POSITIVE, "dcg_lr_warmup": _FRACTION, "dcg_pool_warmup": _FRACTION, "dcg_local_start": _FRACTION,
    "dcg_local_ramp": _FRACTION, "dcg_min_epochs": _COUNT, "lr_diffusion": _POSITIVE, "warmup_fraction": _FRACTION,
    "ema_decay": Limit(0, 1, high_open=True), "diffusion_min_epochs": _COUNT, "prior_dropout": _FRACTION,
    "oof_folds": Limit(2, also=(0,)), "error_weight": Limit(0), "refer_coverage": Limit(0, 1, low_open=True),
    "lr_baseline": _POSITIVE, "weight_decay": Limit(0), "label_smoothing": Limit(0, 1, high_open=True),
    "patience": _POSITIVE_INT, "plateau_factor": Limit(0, 1, low_open=True, high_open=True),
    "plateau_patience": _POSITIVE_INT, "grad_clip": Limit(0, low_open=True, none="none"),
    "val_num_samples": _POSITIVE_INT, "val_ddim_steps": _POSITIVE_INT, "n_resamples": Limit(1000),
    "num_workers": _COUNT, "seed": Limit(0, 2**32 - 1),
}



def model_settings() -> dict[str, dict[str, Any]]:
    """Section -> field -> annotation of what ``model_overrides`` may change (``ModelConfig.with_changes``)."""
    model = field_types(ModelConfig)
    return {section: {k: v for k, v in field_types(model[section]).items() if k not in SHARED_FIELDS[section]}
            for section in MODEL_SECTIONS}


@dataclass(frozen=True)
class TrainConfig(PlainConfig):
    """Everything a run needs besides the data location. Every field is a keyword argument.

    Data:
        input_shape: (H, W, D) the scans are resized to (network input); each divisible by 16.
        target_spacing: voxel size (mm) the scans are resampled to (anti-aliased) before a
            centre crop / pad to ``input_shape``, or None to stretch each scan's field of view
            to ``input_shape``. Stretching makes body size a function of the field of view
            (300-470 mm on the phantoms), a cue a CNN learns instead of the lesions.
        label_mode: ``'binary'`` (Normal / COVID-19) or ``'severity'`` (CT-0 .. CT-4).
        roi_scale: 1 (the seed: ROI crops from the input volume) or s > 1 (crops from a copy
            at s times the in-plane resolution, GMIC's high-resolution crops).
        n_phantoms: size of the generated phantom set when no real data is found.
        phantom_size: in-plane matrix of generated phantoms (MosMedData: 512).
        phantom_dir: folder (relative to the repository root) the phantoms are written to;
            one per profile so profiles of different sizes never overwrite each other.
        phantom_seed: seed of the phantom set (the data, fixed; ``seed`` varies the run).
    Model:
        model_preset: one of ``models.diffmic3d.PRESETS``: ``'tiny'`` (``ModelConfig.tiny``: Np = 4,
            K = 2, ~0.36M parameters), ``'small'`` (``ModelConfig.small``: Np = 8, K = 3, ~1.7M) or
            ``'full'`` (``ModelConfig.full``: 8.2M).
        grad_checkpoint: recompute the DCG global encoder in the backward pass (saves memory
            on a T4); None = auto: on iff CUDA and the input is the seed's full size.
    Optimisation (phase 1 = DCG, phase 2 = diffusion):
        batch_size: volumes per step, every stage.
        dcg_epochs / diffusion_epochs / baseline_epochs: epoch budgets (upper bounds: early
            stopping may end a stage sooner). The baselines get the budget of phase 1 (the
            encoder training) in every profile, with the same early stopping.
        lr_dcg: AdamW peak learning rate of phase 1.
        dcg_lr_warmup: phase 1 schedule, set per step: linear warmup of the learning rate
            over this fraction of the phase-1 steps (dcg_epochs x batches per epoch), then
            cosine decay to 0 at the last step (no ReduceLROnPlateau in phase 1: on a
            16-scan validation split it halved the rate within a few epochs).
        dcg_pool_warmup: fraction of phase 1 during which the DCG's global logits are
            pooled from mean pooling annealed (log-linearly) to top-t% pooling
            (``models.dcg_model.warmup_top_t``); 0 = top-t% from the first step.
        dcg_local_start / dcg_local_ramp: the local CE of phase 1 is off before this
            fraction of phase 1 and ramps linearly to full weight over the next
            ``dcg_local_ramp`` (its ROIs are only meaningful once the saliency is).
        dcg_min_epochs: the first phase-1 epoch that validation may select (and from which
            early stopping counts); None = the epoch at which the curriculum ends
            (``ceil((dcg_local_start + dcg_local_ramp) * dcg_epochs)``), so the kept DCG, like
            the out-of-fold ones, has a trained local stream.
        lr_diffusion: AdamW peak learning rate of phase 2 (prior generator and denoiser),
            with a linear warmup over ``warmup_fraction`` of its steps, then cosine decay to 0.
        warmup_fraction: see ``lr_diffusion``.
        ema_decay: decay of the exponential moving average of the phase-2 weights; the EMA
            weights are validated, selected and kept. The decay is warmed up
            (``min(ema_decay, (1 + n) / (10 + n))`` after n updates), so the EMA of an early
            epoch is not stuck near the first steps' weights.
        diffusion_min_epochs: the first phase-2 epoch that validation may select; None =
            ``ceil(diffusion_epochs / 4)`` (the demo run once selected epoch 1, whose EMA
            weights put nearly every scan on one side of 0.5).
        prior_dropout: phase 2: probability that a volume's DCG priors are replaced by an
            uninformative one (uniform M, zero F), so the denoiser must read the scan.
        oof_folds: phase 2's training priors come from DCGs that did not train on the scan:
            the training split is cut into this many stratified folds and one extra DCG is
            trained per fold on the others (k x the phase-1 cost); 0 = the final DCG's own
            (memorised) priors, which phase 2 then learns to copy. With out-of-fold priors the
            DCG feature prior F is off (``denoiser.use_feature_prior``, unless set in
            ``model_overrides``): F of k fold DCGs would mix k unrelated feature spaces.
        prior_members: where the test-time priors come from: ``'folds'`` (the design: the fold
            DCGs are kept in the model and, with the final DCG, each gives a prior to its share
            of the sampling chains, so test priors are cross-fitted like the training ones) or
            ``'final'`` (the final DCG only: one DCG forward per scan).
        refer_coverage: the referral threshold on DiffMIC-3D's uncertainty is chosen on the
            validation split so that this share of its scans lies below it
            (``utils.training.readout``); ``utils.predict`` says "refer" above it.
        error_weight: lambda of the per-volume phase-2 loss weight (``error_weighting``) on the
            (out-of-fold) training priors; 0 = unweighted.
        error_weighting: ``'uncertainty'`` (default): the label-free ``1 + lambda (1 - max_c
            p_DCG(c))``, which focuses the denoiser on the scans its DCG is unsure of;
            ``'label'``: DiffMIC-v2's ``1 + lambda (1 - p_DCG(true class))``, the scans it gets
            wrong, which, depending on the label, teaches phase 2 to move against a weak
            overconfident prior (``utils.training.diffusion.prior_label_slope``; measured: the
            demo run's DiffMIC-3D inverted, test AUC 0.40, against 0.65 label-free).
        lr_baseline: AdamW learning rate of the 3D CNN baselines.
        weight_decay: AdamW weight decay, every stage.
        label_smoothing: of the cross-entropy losses of phase 1 and the baselines.
        patience: early stopping: a stage ends after this many epochs without a better
            validation AUC (ties broken by validation loss).
        plateau_factor / plateau_patience: ReduceLROnPlateau on validation loss (the
            baselines).
        grad_clip: max global gradient norm (None = no clipping).
        amp: mixed precision (autocast); None = auto: on iff CUDA. Never on CPU: ``True``
            there is ignored (CPU autocast is slower than float32 on the CPUs we run on).
        amp_dtype: ``'float16'`` or ``'bfloat16'``; None = auto (``utils.seeding.amp_dtype``:
            bfloat16 on compute capability >= 8.0, float16 on a T4 or P100).
    Sampling and evaluation (the test predictions use the model's own sampling settings,
    ``DiffusionConfig.num_samples`` / ``ddim_steps``, set per profile in ``model_overrides``):
        val_num_samples / val_ddim_steps: samples and DDIM steps per volume for validation
            during phase 2 (a cheaper budget than the test predictions'). One sample
            is too noisy to select on: on the demo's validation split the same weights scored
            AUC 0.59 with one 5-step sample and 0.78 averaged over ten 10-step samples.
        n_resamples: bootstrap resamples of the confidence intervals (>= 1000).
        baselines: which 3D CNN baselines to train (subset of ``BASELINE_NAMES``).
    Run:
        model_overrides: fields of the model configuration to change, by section, e.g.
            ``{'denoiser': {'head_kernel': 3}, 'diffusion': {'num_samples': 4, 'ddim_steps': 5}}``
            (sections ``dcg``, ``denoiser``, ``diffusion``; ``ModelConfig.with_changes``). On
            the command line: ``--set diffusion.num_samples=4``, merged over the profile's.
        num_workers: DataLoader workers.
        seed: seed of the split, initialisation, data order, noise and sampling.
        progress: show tqdm bars.
    """

    profile: str = "custom"
    # data
    input_shape: tuple[int, int, int] = (128, 128, 64)
    target_spacing: Optional[tuple[float, float, float]] = None
    label_mode: Literal[LABEL_MODES] = "binary"
    roi_scale: int = 1
    # the phantom set generated when no real data is found
    n_phantoms: int = 100
    phantom_size: int = PhantomConfig.size  # the embedded default set (utils.data.phantoms)
    phantom_dir: str = "data/MosMedData"
    phantom_seed: int = 0
    # model
    model_preset: Literal[PRESETS] = "full"
    grad_checkpoint: Optional[bool] = None
    # budgets, every stage
    batch_size: int = 4
    dcg_epochs: int = 15
    diffusion_epochs: int = 30
    baseline_epochs: int = 15  # = the DCG's budget: the same encoder training
    # phase 1 (DCG)
    lr_dcg: float = 1e-3
    dcg_lr_warmup: float = 0.05  # fractions of phase 1's steps, from here ...
    dcg_pool_warmup: float = 0.3
    dcg_local_start: float = 0.3
    dcg_local_ramp: float = 0.1  # ... to here
    dcg_min_epochs: Optional[int] = None  # None: the epoch at which the curriculum ends
    # phase 2 (diffusion)
    lr_diffusion: float = 1e-3
    warmup_fraction: float = 0.05
    ema_decay: float = 0.995  # the EMA weights are the ones validated and kept
    diffusion_min_epochs: Optional[int] = None  # None: a quarter of the phase-2 budget
    prior_dropout: float = 0.3
    oof_folds: int = 3  # 0: the final DCG's own (memorised) training priors
    prior_members: Literal["folds", "final"] = "folds"  # test-time priors: 'folds' (fold DCGs + final) or 'final'
    error_weight: float = 10.0  # lambda of the phase-2 loss weight (error_weighting)
    error_weighting: Literal[ERROR_WEIGHTINGS] = "uncertainty"  # 1 + lambda (1 - max p); 'label': DiffMIC-v2's 1 + lambda (1 - p(true))
    refer_coverage: float = 0.8  # share of validation scans below the referral threshold
    # baselines; regularisation of every stage
    lr_baseline: float = 1e-3
    weight_decay: float = 0.01
    label_smoothing: float = 0.1
    # early stopping and the plateau schedule
    patience: int = 7
    plateau_factor: float = 0.5  # ReduceLROnPlateau of the baselines
    plateau_patience: int = 3
    # numerics
    grad_clip: Optional[float] = 1.0
    amp: Optional[bool] = None
    amp_dtype: Optional[Literal["float16", "bfloat16"]] = None
    # validation sampling, evaluation
    val_num_samples: int = 4
    val_ddim_steps: int = 10
    n_resamples: int = 2000  # bootstrap resamples of every confidence interval
    baselines: tuple[Literal[BASELINE_NAMES], ...] = BASELINE_NAMES
    # run
    model_overrides: dict = field(default_factory=dict)
    num_workers: int = 0
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        problems = convert_fields(self, LIMITS)  # each field to its annotated type, within its range
        if not problems:  # each model setting to its section's type (its range: the section's own check)
            converted, problems = convert_sections(self.model_overrides, model_settings())
            object.__setattr__(self, "model_overrides", converted)
        if not problems:
            try:  # the model sections together (ModelConfig.with_changes and each section's own checks)
                self.model_config("cpu")
            except ValueError as exc:
                settings = ", ".join(f"{s}.{k}={v!r}" for s, c in self.model_overrides.items() for k, v in c.items())
                problems.append(f"model settings ({settings or 'the preset'}): {exc}")
        if problems:
            raise ValueError("invalid TrainConfig: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON files and checkpoints: tuples as lists, in ``model_overrides`` too."""
        data = super().to_dict()
        data["model_overrides"] = {section: {k: list(v) if isinstance(v, tuple) else v for k, v in changes.items()}
                                   for section, changes in self.model_overrides.items()}
        return data

    # -- derived settings ----------------------------------------------------------------

    def dcg_first_selectable_epoch(self) -> int:
        """``dcg_min_epochs``, or the epoch by whose end the phase-1 curriculum has ended."""
        if self.dcg_min_epochs is not None:
            return self.dcg_min_epochs
        return math.ceil(round((self.dcg_local_start + self.dcg_local_ramp) * self.dcg_epochs, 9))

    def diffusion_first_selectable_epoch(self) -> int:
        """``diffusion_min_epochs``, or a quarter of the phase-2 epoch budget (rounded up)."""
        if self.diffusion_min_epochs is not None:
            return self.diffusion_min_epochs
        return math.ceil(self.diffusion_epochs / 4)

    @property
    def num_classes(self) -> int:
        return 2 if self.label_mode == "binary" else 5

    def use_amp(self, device) -> bool:
        """Whether ``device`` trains in mixed precision: on CUDA unless ``amp`` is False."""
        return amp_enabled(device) and self.amp is not False

    def autocast_dtype(self, device) -> str:
        """``amp_dtype``, or (auto) the dtype ``device`` supports best."""
        return self.amp_dtype or amp_dtype(device)

    def model_config(self, device, num_classes: Optional[int] = None) -> ModelConfig:
        """The DiffMIC-3D configuration of this profile on ``device`` (gradient checkpointing).

        ``num_classes``: the data's class count when it does not follow ``label_mode`` (e.g.
        a MedMNIST set); default ``self.num_classes``.
        """
        ckpt = self.grad_checkpoint
        if ckpt is None:  # auto: the full size on a GPU (conservative for a 15 GB T4)
            ckpt = str(device).startswith("cuda") and self.input_shape == (128, 128, 64)
        base = ModelConfig.preset(self.model_preset, num_classes or self.num_classes, self.input_shape)
        changes = {section: dict(self.model_overrides.get(section, {})) for section in MODEL_SECTIONS}
        changes["dcg"] = {"roi_scale": self.roi_scale, "grad_checkpoint": bool(ckpt), **changes["dcg"]}
        out_of_fold = self.oof_folds >= 2
        changes["denoiser"] = {"use_feature_prior": not out_of_fold, **changes["denoiser"]}
        fold_dcgs = self.oof_folds if out_of_fold and self.prior_members == "folds" else 0
        return base.with_changes(**changes, fold_dcgs=fold_dcgs)


PROFILES: dict[str, TrainConfig] = {
    "smoke": TrainConfig(
        profile="smoke", input_shape=(32, 32, 32), n_phantoms=12, phantom_size=32,
        phantom_dir="data/phantoms_smoke", model_preset="tiny", batch_size=4, dcg_epochs=2,
        diffusion_epochs=2, baseline_epochs=2, patience=2, oof_folds=2, val_num_samples=1, val_ddim_steps=2,
        model_overrides={"diffusion": {"num_samples": 2, "ddim_steps": 2}}, n_resamples=1000, progress=False),
    "demo": TrainConfig(
        profile="demo", input_shape=(64, 64, 32), target_spacing=(6.0, 6.0, 10.0), n_phantoms=100,
        phantom_dir="data/MosMedData", model_preset="small", batch_size=4, dcg_epochs=20,
        diffusion_epochs=40, baseline_epochs=20, patience=7, val_num_samples=4, val_ddim_steps=10,
        model_overrides={"diffusion": {"num_samples": 20, "ddim_steps": 10}}, n_resamples=2000),
    "full": TrainConfig(
        profile="full", input_shape=(128, 128, 64), target_spacing=(3.0, 3.0, 5.0), n_phantoms=100,
        phantom_dir="data/MosMedData", model_preset="full", batch_size=4, dcg_epochs=15,
        diffusion_epochs=30, baseline_epochs=15, patience=7,
        model_overrides={"diffusion": {"num_samples": 20, "ddim_steps": 10}}, n_resamples=2000),
}


def get_profile(name: str, **overrides) -> TrainConfig:
    """The profile ``name`` with ``overrides`` applied (field name -> value).

    A key ``'section.field'`` (e.g. ``'diffusion.num_samples'``) and a ``model_overrides``
    mapping change the model configuration; both are merged over the profile's own
    ``model_overrides`` section by section.

    Raises:
        ValueError: unknown profile or field, or an invalid value (the message says which).
    """
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; choose one of {sorted(PROFILES)}")
    model = {section: dict(changes) for section, changes in PROFILES[name].model_overrides.items()}
    for section, changes in (overrides.pop("model_overrides", None) or {}).items():
        model.setdefault(section, {}).update(changes)
    for key in [k for k in overrides if "." in k]:
        section, _, model_field = key.partition(".")
        model.setdefault(section, {})[model_field] = overrides.pop(key)
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown TrainConfig field(s) {unknown}; known: {sorted(known)} "
                         f"and SECTION.FIELD of the model ({', '.join(MODEL_SECTIONS)})")
    return replace(PROFILES[name], model_overrides=model, **overrides)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``['batch_size=2', 'input_shape=48,48,32', 'amp=auto']`` -> ``{'batch_size': 2, ...}``: a
    TrainConfig field or ``SECTION.FIELD`` of the model per item, its value converted to the
    field's type and, for a TrainConfig field, checked against its range (``utils.overrides.parse_settings``);
    ``get_profile`` checks the combination and the model sections' own ranges.

    Raises:
        ValueError: one line, e.g. ``--set batch_size='abc': expected a positive integer``.
    """
    return parse_settings(items, field_types(TrainConfig), LIMITS, model_settings())
