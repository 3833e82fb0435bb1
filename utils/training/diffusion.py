"""Phase 2 of DiffMIC-3D: the conditional denoiser on a frozen DCG, with honest priors.

:func:`train_diffusion` trains the prior generator and the denoiser (own image encoder,
condition U-Net, per-point head) on ``DiffMIC3D.diffusion_loss`` over the TRAINING scans
(with the train-time augmentation) and their cached guidance, which should be out-of-fold
(``utils.pipeline.out_of_fold_guidance``: each training scan's priors come from a DCG that
did not train on it, so they are as good as they will be on new scans). Then:

* prior dropout: each volume's priors are replaced by an uninformative one with probability
  ``prior_dropout``, so the denoiser must also read the scan;
* AdamW with a linear warmup then cosine decay per optimiser step (the step count is read
  from the optimiser's own state, so a resumed run continues the same schedule);
* a focus on the scans the DCG is unsure of: each volume's loss is weighted by
  ``1 + error_weight * (1 - max_c p(c))`` under its (out-of-fold) training prior, so the scans
  the DCG is already sure of do not dominate the correction the denoiser learns
  (``TrainConfig.error_weighting='label'``: DiffMIC-v2's ``1 - p(true class)``, which can teach
  phase 2 to invert a weak prior: :func:`prior_label_slope`);
* an exponential moving average (EMA) of the weights with a warmed-up decay
  (:func:`warmup_ema_fn`), which is what is validated, selected and kept (its BatchNorm
  statistics recomputed over the training split before each validation, as in phase 1); no
  epoch before ``TrainConfig.diffusion_first_selectable_epoch`` is selected;
* validation: the mean class probability over ``val_num_samples`` DDIM chains per volume,
  spread over the model's prior members (one chain is too noisy to select on);
* the correction is validated (:func:`check_correction`): the selected model against the same
  model with its correction switched off (its prior ensemble); the correction is kept only if it
  ranks the validation scans at least as well.

``utils.training.readout.calibrate_readout`` then fits the readout, the decision threshold
and the referral threshold on the validation split and stores them on the model.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader, Dataset

from models.dcg_model import DCGOutput
from models.diffmic3d import DiffMIC3D
from models.morphometry import shape_descriptors
from utils.distributed import SINGLE, DistContext
from utils.evaluation.metrics import RATIO_TIE, classification_metrics
from utils.log import get_logger
from utils.training.precise_bn import bn_stats_loader, recompute_batchnorm_stats
from utils.training.profiles import ERROR_WEIGHTINGS, TrainConfig
from utils.training.loop import FitResult, fit, make_epoch_loader
from utils.training.dcg import dcg_steps_per_epoch
from utils.training.stage import eval_loader, fit_config, validation_metrics


def warmup_cosine(step: int, total: int, warmup: float) -> float:
    """Learning-rate factor at optimiser step ``step`` of ``total``: linear from 0 over the
    first ``warmup`` fraction, then cosine to 0."""
    n_warm = max(1, int(round(warmup * total)))
    if step < n_warm:
        return (step + 1) / n_warm
    progress = min(1.0, (step - n_warm) / max(1, total - n_warm))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _optimizer_step(optimizer: torch.optim.Optimizer) -> int:
    """Optimiser steps taken so far (AdamW keeps them per parameter; checkpointed with it)."""
    for state in optimizer.state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def warmup_ema_fn(decay: float):
    """``AveragedModel``'s ``multi_avg_fn`` for an EMA whose decay after n updates is
    ``min(decay, (1 + n) / (10 + n))``: early averages follow the weights instead of being
    pinned to the first steps' (the demo run once selected phase-2 epoch 1, whose EMA with a
    fixed 0.995 after 16 steps was still near the initial weights)."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must lie in [0, 1], got {decay}")

    @torch.no_grad()
    def update(ema_params, params, num_averaged):
        n = float(num_averaged)
        d = min(decay, (1.0 + n) / (10.0 + n))
        torch._foreach_lerp_(ema_params, params, 1.0 - d)

    return update


def error_weights(guidance: DCGOutput, labels: torch.Tensor, error_weight: float,
                  mode: str = "label") -> torch.Tensor:
    """Per-volume phase-2 loss weights (B,) from the fused probabilities p_DCG of the
    (out-of-fold) guidance: ``mode='label'``, DiffMIC-v2's ``1 + error_weight * (1 - p_DCG(true
    class))``; ``mode='uncertainty'``, the label-free ``1 + error_weight * (1 - max_c p_DCG(c))``,
    which leaves the weighted-MSE optimum given the prior where it is (:func:`prior_label_slope`)."""
    probs = guidance.fused_probs.float()
    if mode == "label":
        p = probs.gather(1, labels.long().view(-1, 1)).squeeze(1)  # (B,) p(true class)
    elif mode == "uncertainty":
        p = probs.max(dim=1).values  # (B,) the DCG's confidence
    else:
        raise ValueError(f"error weighting mode must be one of {ERROR_WEIGHTINGS}, got {mode!r}")
    return 1.0 + error_weight * (1.0 - p)


def prior_label_slope(prior_probs, labels, weights=None, positive_class: int = 1) -> float:
    """Weighted least-squares slope of the label indicator on the prior's positive-class
    probability (binary): the direction in which a weighted-MSE y_0 regressor that read only
    the prior would move with it. Positive for any informative prior without weights or with
    weights that depend on the prior alone; the label-dependent weights of :func:`error_weights`
    can make it negative (measured in the README: the demo's out-of-fold priors, AUC 0.57,
    give +0.22 unweighted and -0.69 error-weighted), i.e. phase 2 is taught to invert its prior.

    Args:
        prior_probs: (N, C) class probabilities of the prior (e.g. out-of-fold ``fused_probs``).
        labels: (N,) integer labels.
        weights: (N,) positive per-scan weights, or None (all 1).
    """
    p = np.asarray(prior_probs, dtype=float)
    y = np.asarray(labels).reshape(-1) == positive_class
    if p.ndim != 2 or p.shape[0] != y.size or not 0 <= positive_class < p.shape[1]:
        raise ValueError(f"prior_probs must be (N, C) with N = {y.size} labels and class {positive_class}, "
                         f"got {p.shape}")
    w = np.ones(y.size) if weights is None else np.asarray(weights, dtype=float).reshape(-1)
    if w.shape != y.shape or not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise ValueError(f"weights must be {y.size} finite positive values")
    x = p[:, positive_class]
    mx, my = np.average(x, weights=w), np.average(y, weights=w)
    var = np.average((x - mx) ** 2, weights=w)
    if var <= 0:
        raise ValueError("the prior is constant: no slope")
    return float(np.average((x - mx) * (y - my), weights=w) / var)


class _Phase2(nn.Module):
    """What phase 2 checkpoints: the model and the EMA of its weights (``ema.module``)."""

    def __init__(self, model: DiffMIC3D, decay: float):
        super().__init__()
        self.model = model
        self.ema = AveragedModel(model, multi_avg_fn=warmup_ema_fn(decay), use_buffers=False)
        self.ema.requires_grad_(False)


FROZEN_IN_PHASE2 = tuple(f"{part}{member}." for part in ("model.", "ema.module.") for member in ("dcg", "fold_dcgs"))


def _trained_in_phase2(key: str) -> bool:
    """Whether a state-dict key of :class:`_Phase2` is phase 2's to checkpoint: not the frozen
    DCGs (final and out-of-fold), which their own phase-1 files hold."""
    return not key.startswith(FROZEN_IN_PHASE2)


log = get_logger(__name__)

PER_SAMPLE = ("samples", "y0_mean")  # (S, N, C) outputs of predict_dataset


@torch.no_grad()
def predict_dataset(model: DiffMIC3D, dataset: Dataset, guidance: DCGOutput | Sequence[DCGOutput],
                    device: torch.device, batch_size: int, seed: int, num_samples: Optional[int] = None,
                    steps: Optional[int] = None, num_workers: int = 0) -> dict[str, torch.Tensor]:
    """``model.predict`` over ``dataset`` (fixed order) with its cached guidance rows and ONE
    generator seeded with ``seed``; tensors concatenated on CPU. ``guidance``: one cache (that
    prior only) or one per member (``DiffMIC3D.member_guidance`` order). ``num_samples`` / ``steps``
    None: the model's own sampling settings (``DiffusionConfig``), as for the test predictions.

    Returns probs (N, C), std (N, C), entropy (N,), samples (S, N, C) per-chain probabilities,
    y0_mean (S, N, C), member (S,).
    """
    model.eval()
    members = [guidance] if isinstance(guidance, DCGOutput) else list(guidance)
    generator = torch.Generator(device).manual_seed(seed)
    outputs: dict[str, list[torch.Tensor]] = {}
    member = None
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers):
        rows = torch.as_tensor(batch["index"])
        out = model.predict(batch["image"].to(device), [g.index(rows).to(device) for g in members],
                            num_samples=num_samples, steps=steps, generator=generator)
        member = out["member"]
        for key in ("probs", "std", "entropy", *PER_SAMPLE):
            outputs.setdefault(key, []).append(out[key].float().cpu())
    result = {key: torch.cat(values, dim=1 if key in PER_SAMPLE else 0) for key, values in outputs.items()}
    result["member"] = member
    return result


def validation_probs(model: DiffMIC3D, val_set: Dataset, val_guidance: DCGOutput | Sequence[DCGOutput],
                     config: TrainConfig, device: torch.device) -> np.ndarray:
    """Class probabilities (N, C) of the validation split the way phase 2 validates: the
    validation chains and DDIM steps of ``config`` (fewer than at test time), from its seed."""
    return predict_dataset(model, val_set, val_guidance, device, config.batch_size, config.seed,
                           config.val_num_samples, config.val_ddim_steps, config.num_workers)["probs"].numpy()


def recompute_encoder_bn(model: DiffMIC3D, train_set: Dataset, config: TrainConfig, device: torch.device) -> None:
    """Precise BatchNorm statistics of the denoiser's image encoder over the training split
    (shuffled, fixed order: ``utils.training.precise_bn.bn_stats_loader``)."""
    encoder = model.denoiser.image_encoder
    recompute_batchnorm_stats(encoder,
                              bn_stats_loader(train_set, config.batch_size, config.seed, config.num_workers),
                              lambda batch: encoder(batch["image"].to(device)))


@torch.no_grad()
def fit_shape_descriptors(model: DiffMIC3D, train_set: Dataset, config: TrainConfig, device: torch.device) -> None:
    """The standardisation of the denoiser's shape descriptors (``DenoiserConfig.morphometry``)
    from the training split, before phase 2 (a no-op without them). The descriptors are
    flip-invariant, so the augmented split gives the same figures."""
    shape = model.denoiser.shape
    if shape is None:
        return
    raw = [shape_descriptors(batch["image"].to(device)).cpu() for batch in eval_loader(train_set, config)]
    shape.fit(torch.cat(raw))


@torch.no_grad()
def fit_prior_blend(model: DiffMIC3D, train_set: Dataset, train_guidance: DCGOutput) -> None:
    """``PriorConfig.blend='fitted'``: the guidance map's weight of the local prior, fitted on the
    training scans' (out-of-fold) priors before phase 2 (a no-op otherwise). ``train_set`` is the
    training split or a ``Subset`` of it (its ``indices`` are rows of ``train_guidance``)."""
    if model.config.prior.blend != "fitted":
        return
    rows = torch.as_tensor(np.asarray(getattr(train_set, "indices", range(len(train_set)))), dtype=torch.long)
    weight = model.prior_generator.fit_blend(train_guidance.global_probs[rows], train_guidance.local_probs[rows],
                                             np.asarray(train_set.labels),
                                             lambda y, p: classification_metrics(y, p)["roc_auc"])
    log.info(f"[diffusion] guidance map: the local prior's weight fitted on {len(rows)} training scans' priors: "
             f"{weight:.2f} (the design's distance blend: {float(model.prior_generator.distance.mean()):.2f})")


def train_diffusion(model: DiffMIC3D, train_set: Dataset, train_guidance: DCGOutput,
                    val_set: Dataset, val_guidance: DCGOutput | Sequence[DCGOutput], config: TrainConfig,
                    device: torch.device, checkpoint_path: str | Path,
                    meta: Optional[Mapping] = None, context: DistContext = SINGLE) -> FitResult:
    """Phase 2 (module docstring); ``model`` ends with the selected EMA weights.

    Args:
        train_set: the training split with augmentation (items ``image``, ``label``, ``index``);
            ``train_guidance`` row i belongs to its item i (built from the same split).
        val_set / val_guidance: the validation split, unaugmented, and its guidance (one cache,
            or one per member as ``predict_dataset`` takes it; the first is the final DCG's).
        checkpoint_path: resumable checkpoint of this phase.
        context: this process's rank (``utils.distributed``): training is data-parallel; the
            validation (a few DDIM chains from one seeded generator) runs whole on every rank,
            so its metrics are exact and identical everywhere (sharding would change the noise).
    """
    model.freeze_dcg()
    fit_shape_descriptors(model, train_set, config, device)  # before the EMA copy, which keeps its buffers
    fit_prior_blend(model, train_set, train_guidance)
    params = list(model.prior_generator.parameters()) + list(model.denoiser.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.lr_diffusion, weight_decay=config.weight_decay)
    wrapper = _Phase2(model, config.ema_decay).to(device)
    # the loader drops a last batch of one volume: count steps the way it batches
    total_steps = max(1, dcg_steps_per_epoch(len(train_set), config.batch_size, context.world_size)
                      * config.diffusion_epochs)
    val_labels = np.asarray(val_set.labels)

    def train_step(batch, generator):
        step = _optimizer_step(optimizer)
        if step > 0:
            wrapper.ema.update_parameters(model)  # the weights after the previous step
        for group in optimizer.param_groups:
            group["lr"] = config.lr_diffusion * warmup_cosine(step, total_steps, config.warmup_fraction)
        model.dcg.eval()  # frozen: keep its BatchNorm in eval mode although fit() sets train()
        wrapper.ema.eval()
        rows = torch.as_tensor(batch["index"])
        guidance, labels = train_guidance.index(rows).to(device), batch["label"].to(device)
        weights = (error_weights(guidance, labels, config.error_weight, config.error_weighting)
                   if config.error_weight > 0 else None)
        return model.diffusion_loss(batch["image"].to(device), guidance, labels, prior_dropout=config.prior_dropout,
                                    generator=generator, weights=weights)["loss"]

    def evaluate():
        wrapper.ema.update_parameters(model)
        ema: DiffMIC3D = wrapper.ema.module
        recompute_encoder_bn(ema, train_set, config, device)
        ema.eval()
        loss, n = 0.0, 0
        generator = torch.Generator(device).manual_seed(config.seed)
        final = val_guidance if isinstance(val_guidance, DCGOutput) else val_guidance[0]
        for batch in eval_loader(val_set, config):
            rows = torch.as_tensor(batch["index"])
            out = ema.diffusion_loss(batch["image"].to(device), final.index(rows).to(device),
                                     batch["label"].to(device), generator=generator)
            loss += out["loss"].item() * len(rows)
            n += len(rows)
        return validation_metrics(val_labels, validation_probs(ema, val_set, val_guidance, config, device),
                                  loss / max(n, 1))

    result = fit(wrapper, optimizer, None, train_step=train_step, evaluate=evaluate,
                 train_batches=lambda epoch: make_epoch_loader(train_set, config.batch_size, config.seed, epoch,
                                                               config.num_workers, context=context),
                 config=fit_config(config, "diffusion", config.diffusion_epochs, device,
                                    config.diffusion_first_selectable_epoch(),
                                    ddp_find_unused=True),  # e.g. the prior generator's parts that a step skips
                 checkpoint_path=checkpoint_path, model_config=model.config.to_dict(), meta=meta, device=device,
                 checkpoint_keys=_trained_in_phase2, context=context)
    model.load_state_dict(wrapper.ema.module.state_dict())  # the selected EMA weights
    model.freeze_dcg()
    result.history["correction_check"] = check_correction(model, val_set, val_guidance, config, device)
    return result


def correction_kept(val_auc_trained: float, val_auc_prior_only: float) -> bool:
    """Whether the trained correction stays: unless the prior alone ranks the validation scans
    better by more than a tie (``RATIO_TIE``); NaN AUCs (one class) keep it."""
    return not val_auc_prior_only > val_auc_trained + RATIO_TIE


def check_correction(model: DiffMIC3D, val_set: Dataset, val_guidance: DCGOutput | Sequence[DCGOutput],
                     config: TrainConfig, device: torch.device) -> dict:
    """Keep the trained correction only if it ranks the validation scans at least as well as none.

    The head predicts ``y0_hat = M + r`` (``prior_residual``); with ``r``'s last layer zeroed the
    model returns its priors exactly, i.e. the prior members' ensemble the chains read. Phase 2
    learns ``r`` from out-of-fold priors; where those are anti-informative on the training scans
    (measured on the ``demo`` run: AUC 0.43 on 64 training scans, while the same fold DCGs score
    0.67-0.80 on validation), it learns to move against its prior, and the trained model ranks new
    scans below chance. Both models are scored on the validation split the way phase 2 validates
    (same chains, steps and seed); if the correction scores lower, its last layer is zeroed and
    DiffMIC-3D is its prior ensemble. The decision is recomputed, identically, when a finished run
    is loaded. Returns ``{'val_auc_trained', 'val_auc_prior_only', 'kept'}`` (kept: True without
    ``prior_residual``, where there is no prior-only model)."""
    head = model.denoiser.head
    labels = np.asarray(val_set.labels)

    def val_auc() -> float:
        return validation_metrics(labels, validation_probs(model, val_set, val_guidance, config, device),
                                  math.nan)["val_auc"]

    trained = val_auc()
    if not head.prior_residual:
        return {"val_auc_trained": trained, "val_auc_prior_only": math.nan, "kept": True}
    weights = {k: v.clone() for k, v in head.out.state_dict().items()}
    head.switch_off_correction()
    prior_only = val_auc()
    kept = correction_kept(trained, prior_only)
    if kept:
        head.out.load_state_dict(weights)
    else:
        log.warning(f"[diffusion] the trained correction ranks the validation scans below its prior alone (AUC "
                    f"{trained:.3f} vs {prior_only:.3f}): it is switched off, and DiffMIC-3D returns its prior "
                    "ensemble (README, Model: the correction is validated)")
    return {"val_auc_trained": trained, "val_auc_prior_only": prior_only, "kept": kept}
