"""The experiment's training and evaluation stages, in the one order they run.

``utils.run`` runs them all (:func:`train_all`, then :func:`evaluate_test`); each notebook
calls the ones of its chapter, so any notebook can be re-run alone once the stages before it
have written their files into the output folder:

    exp = prepare_experiment(config, output_dir, data_dir)  # utils.experiment: splits.csv, cache (01, 02)
    model = build_model(exp)
    dcg = train_phase1(exp, model)                 # checkpoints/dcg.pth                       (03)
    model, dcg = load_dcg(exp)                     # the finished, frozen DCG                  (04, 06)
    guidance = cache_split_guidance(exp, model, ("val",))   # DCGOutput per split           (04)
    results, baselines = finish_training(exp, model, dcg)    # phase 2, the main checkpoint,
                                                   # the baselines, history.json               (06)
    rows = evaluate_test(exp, model, baselines)    # the test split, once                      (07)

Every training stage checkpoints after each epoch and, when its checkpoint says it finished,
only loads it; :func:`require_stage` gives a clear error, naming what to run first, when a
stage that a later step needs has not finished. Each stage can be timed by a ``StageTimer``.
"""
from __future__ import annotations

import json
import math
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from sklearn.model_selection import StratifiedKFold
from torch import nn

from models.dcg_model import DCGOutput
from models.diffmic3d import DiffMIC3D
from utils.atomic import atomic_write_text
from utils.errors import DataError
from utils.evaluation.evaluate import (Predictions, evaluate_experiment, predict_loader, write_learning_curves,
                                       write_model_figures)
from utils.evaluation.gradcam import write_baseline_gradcam
from utils.evaluation.ood import fit_feature_stats
from utils.evaluation.showcase import lesion_masks, showcase_indices
from utils.data.dataset import EpochSubset
from utils.experiment import Experiment
from utils.log import get_logger
from utils.paths import CHECKPOINTS_DIR, HISTORY_JSON
from utils.stage_timer import StageTimer
from utils.training.baselines import DISPLAY_NAMES, baseline_from_checkpoint, runnable_baselines, train_baseline
from utils.training.checkpoint import load_checkpoint, save_checkpoint
from utils.training.dcg import cache_guidance, train_dcg
from utils.training.diffusion import predict_dataset, train_diffusion
from utils.training.readout import REFER_SCORE, calibrate_readout, warn_if_inverted
from utils.training.loop import FitResult, epoch_seed, stage_complete
from utils.training.stage import eval_loader

OURS = "DiffMIC-3D"
ABLATION_GLOBAL = "DCG global prior only"
ABLATION_FUSED = "DCG without diffusion"
ENSEMBLE = "DCG ensemble (folds + final)"
STAGES = ("dcg", "diffusion", "resnet18", "densenet121")

log = get_logger(__name__)


def _timed(timer: Optional[StageTimer], name: str):
    return timer.stage(name) if timer is not None else nullcontext()


def reseed_stage(exp: Experiment, stage: str) -> None:
    """Seed torch's global generator for ``stage`` (weight init, dropout) from (seed, stage),
    so a stage started in a fresh process draws what it would have in an uninterrupted run."""
    torch.manual_seed(epoch_seed(exp.config.seed, STAGES.index(stage), stream=2))


def require_stage(exp: Experiment, stage: str, run_first: str) -> None:
    """Raise a one-line ``DataError`` unless ``stage``'s checkpoint says it finished.

    Args:
        run_first: what the user should run to produce it (e.g. ``'notebook 03_dcg_model'``).
    """
    path = exp.checkpoint(stage)
    if not stage_complete(path):
        state = "is unfinished" if path.is_file() else "does not exist"
        raise DataError(path, f"{state}: run {run_first} first (with the same output folder and profile)")


# -- phase 1 ------------------------------------------------------------------------------


def build_model(exp: Experiment) -> DiffMIC3D:
    """A freshly initialised DiffMIC-3D of the run's configuration with ``exp.num_classes``
    classes (from the data), seeded for phase 1."""
    reseed_stage(exp, "dcg")
    config = exp.config.model_config(exp.device, num_classes=exp.num_classes)
    return DiffMIC3D(config).to(exp.device)


def train_phase1(exp: Experiment, model: DiffMIC3D) -> FitResult:
    """Phase 1 (DCG pre-training), resumed or just loaded when its checkpoint is complete."""
    return train_dcg(model, exp.datasets["train"], exp.datasets["val"], exp.config, exp.device,
                     exp.checkpoint("dcg"), exp.meta, context=exp.context)


def load_dcg(exp: Experiment, run_first: str = "notebook 03_dcg_model") -> tuple[DiffMIC3D, FitResult]:
    """The model with the finished phase-1 DCG loaded and frozen, and phase 1's result;
    a clear error naming ``run_first`` when phase 1 has not finished."""
    require_stage(exp, "dcg", run_first)
    model = build_model(exp)
    result = train_phase1(exp, model)  # complete: only loads the checkpoint
    model.freeze_dcg()
    return model, result


def cache_split_guidance(exp: Experiment, model: DiffMIC3D,
                         splits: tuple[str, ...] = ("train", "val"), member: int = 0) -> dict[str, DCGOutput]:
    """The frozen DCG's outputs once per volume of each split (unflipped), one
    :class:`DCGOutput` per split with rows in dataset order (``utils.training.dcg.cache_guidance``).
    ``member``: 0 the final DCG, i >= 1 the (i-1)-th out-of-fold DCG the model keeps."""
    model.freeze_dcg()
    names = {"train": "train_plain"}
    return {split: cache_guidance(model, exp.datasets[names.get(split, split)], exp.device, exp.config.batch_size,
                                  exp.config.num_workers, exp.config.progress, member=member, context=exp.context)
            for split in splits}


def cache_member_guidance(exp: Experiment, model: DiffMIC3D, split: str,
                          final: Optional[DCGOutput] = None) -> list[DCGOutput]:
    """Every prior member's cached outputs on ``split`` (``DiffMIC3D.member_guidance`` order:
    the final DCG, then the out-of-fold DCGs); ``final``: the final DCG's cache if already made."""
    first = final if final is not None else cache_split_guidance(exp, model, (split,))[split]
    return [first] + [cache_split_guidance(exp, model, (split,), member=i)[split]
                      for i in range(1, model.num_members)]


# -- phase 2 ------------------------------------------------------------------------------


def out_of_fold_guidance(exp: Experiment, model: DiffMIC3D) -> DCGOutput:
    """Guidance for the TRAINING scans from DCGs that did not train on them.

    The training split is cut into ``config.oof_folds`` stratified folds (seeded); for each
    fold a DCG of the same configuration is trained on the other folds exactly as in phase 1
    (``checkpoints/dcg_fold{i}.pth``, resumable; early stopping on the validation split) and
    gives the guidance of the held-out fold. Without this, phase 2 sees the final DCG's priors
    on its own training scans, which are near perfect, and learns to copy them (measured: the
    diffusion then scores below its own DCG on new scans). When the model keeps its fold DCGs
    (``PriorConfig.fold_dcgs``), fold i's weights are copied into ``model.fold_dcgs[i]``: they
    give the test-time priors too. Returns a cache like ``cache_guidance`` (rows in
    ``train_plain`` order).

    In a distributed run the folds are independent fits: fold ``i`` is trained by rank
    ``i mod world`` alone (one process, the same seeds, hence the same weights as one after
    another), the ranks wait for each other, then every rank loads every fold and the
    guidance of each is computed sharded (``cache_guidance``).
    """
    config, device, context = exp.config, exp.device, exp.context
    labels = exp.datasets["train_plain"].labels
    folds = list(StratifiedKFold(n_splits=config.oof_folds, shuffle=True,
                                 random_state=config.seed).split(np.zeros(len(labels)), labels))

    def fold_dcg(i: int) -> DiffMIC3D:  # trains fold i, or loads it once finished
        torch.manual_seed(epoch_seed(config.seed, 100 + i, stream=2))
        fold_model = DiffMIC3D(model.config).to(device)
        train_dcg(fold_model, EpochSubset(exp.datasets["train"], folds[i][0].tolist()), exp.datasets["val"], config,
                  device, exp.output_dir / CHECKPOINTS_DIR / f"dcg_fold{i}.pth", exp.meta,
                  name=f"dcg fold {i + 1}/{config.oof_folds}")
        return fold_model

    if context.enabled:
        log.info(f"out-of-fold DCGs side by side: fold k on rank (k - 1) mod {context.world_size}; then each rank "
                 "loads all of them")
        for i in range(context.rank, config.oof_folds, context.world_size):
            fold_dcg(i)
        context.barrier("out-of-fold DCGs trained")
    held_rows, parts = [], []
    for i, (_, held) in enumerate(folds):
        fold_model = fold_dcg(i)
        fold_model.freeze_dcg()
        if len(model.fold_dcgs):
            model.fold_dcgs[i].load_state_dict(fold_model.dcg.state_dict())
        held = torch.as_tensor(held)
        parts.append(cache_guidance(fold_model, exp.datasets["train_plain"], device, config.batch_size,
                                    config.num_workers, config.progress, context=context).index(held))
        held_rows.append(held)
    return DCGOutput.cat(parts).index(torch.argsort(torch.cat(held_rows)))  # back to dataset order


def train_phase2(exp: Experiment, model: DiffMIC3D, guidance: dict[str, DCGOutput]) -> FitResult:
    """Phase 2 on the finished phase-1 DCG held by ``model``, and the validation-fitted readout.

    ``guidance``: that DCG's cached outputs of the ``'train'`` and ``'val'`` splits
    (:func:`cache_split_guidance`). The training priors are out of fold
    (:func:`out_of_fold_guidance`, which also fills the model's fold DCGs) when
    ``config.oof_folds >= 2``, else ``guidance['train']``; validation reads every prior member.
    The readout calibration and the decision and referral thresholds
    (``utils.training.readout``) are in ``result.history['readout']`` and on the model.
    """
    config = exp.config
    train_guidance = out_of_fold_guidance(exp, model) if config.oof_folds >= 2 else guidance["train"]
    val_members = cache_member_guidance(exp, model, "val", guidance["val"])
    reseed_stage(exp, "diffusion")
    result = train_diffusion(model, exp.datasets["train"], train_guidance, exp.datasets["val"], val_members,
                             config, exp.device, exp.checkpoint("diffusion"), exp.meta, context=exp.context)
    readout = calibrate_readout(model, exp.datasets["val"], val_members, config, exp.device)
    decision = (f"decision threshold {readout['decision_threshold']:.3f}" if len(readout["bias"]) == 2
                else "decisions: the most probable class")
    log.info(f"readout fitted on the validation split: scale {readout['scale']:.3f}, bias "
             f"{[round(b, 3) for b in readout['bias']]}, {decision}, referral threshold {readout['refer_threshold']:.3f}")
    result.history["readout"] = readout
    warn_if_inverted(history_entry(result))
    return result


def save_main_checkpoint(exp: Experiment, model: DiffMIC3D, history: dict, train_guidance: DCGOutput) -> Path:
    """Write ``OUTPUT_DIR/diffmic3d_enhanced_model.pth`` (what ``utils.predict`` loads): the
    finished model with its preprocessing, history, and the training scans' DCG feature
    statistics for the out-of-distribution flag (``utils.evaluation.ood``), from the final
    DCG's ``train_guidance``, and the score its referral threshold is on (``refer_score``).
    Written by rank 0 only in a distributed run."""
    if not exp.context.is_main:
        return exp.main_checkpoint
    features = train_guidance.global_features  # (N, F)
    return save_checkpoint(exp.main_checkpoint, model_config=model.config.to_dict(),
                           model_state_dict=model.state_dict(), **exp.meta, history=history,
                           feature_stats=fit_feature_stats(features), refer_score=REFER_SCORE)


def load_main_model(exp: Experiment, run_first: str = "notebook 06_training") -> DiffMIC3D:
    """The finished model of the run (``diffmic3d_enhanced_model.pth``), in eval mode on the
    run's device; any data source (``utils.predict.load_model`` also checks the preprocessing
    of scan files, which a MedMNIST model has none of)."""
    if not exp.main_checkpoint.is_file():
        raise DataError(exp.main_checkpoint, f"does not exist: run {run_first} first (with the same output folder)")
    saved = load_checkpoint(exp.main_checkpoint)
    model = DiffMIC3D.from_config_dict(saved["model_config"]).to(exp.device)
    model.load_state_dict(saved["model_state_dict"])
    return model.eval()


# -- baselines, history, the whole sequence -------------------------------------------------


def train_baselines(exp: Experiment, timer: Optional[StageTimer] = None) -> dict[str, tuple[nn.Module, FitResult]]:
    """Each baseline of ``config.baselines`` trained (or loaded) in the same harness, each
    timed as a stage of ``timer`` (under its display name) when given (none without MONAI)."""
    out = {}
    for name in runnable_baselines(exp.config.baselines):  # logs why when it skips them
        with _timed(timer, DISPLAY_NAMES[name]):
            reseed_stage(exp, name)
            out[name] = train_baseline(name, exp.datasets["train"], exp.datasets["val"], exp.config, exp.device,
                                       exp.checkpoint(name), exp.meta, num_classes=exp.num_classes,
                                       context=exp.context)
    return out


def load_baselines(exp: Experiment, run_first: str) -> dict[str, nn.Module]:
    """The finished baselines of ``config.baselines`` from their checkpoints, in eval mode (none
    without MONAI: results and Grad-CAM then lack them)."""
    out = {}
    for name in runnable_baselines(exp.config.baselines):  # logs why when it skips them
        require_stage(exp, name, run_first)
        out[name] = baseline_from_checkpoint(load_checkpoint(exp.checkpoint(name))).to(exp.device).eval()
    return out


def history_entry(result: FitResult) -> dict:
    """One phase of ``history.json``: the per-epoch series and the selected epoch."""
    return {**result.history, "best_epoch": result.best["epoch"]}


def write_history(exp: Experiment, results: dict[str, FitResult]) -> Path:
    """``OUTPUT_DIR/history.json`` (per stage: per-epoch series, best epoch) and the
    learning-curve figure (rank 0 only in a distributed run)."""
    history = {name: history_entry(result) for name, result in results.items()}
    path = exp.output_dir / HISTORY_JSON
    if not exp.context.is_main:
        return path
    atomic_write_text(path, json.dumps(history, indent=2) + "\n")
    write_learning_curves(path, exp.output_dir)
    return path


def finish_training(exp: Experiment, model: DiffMIC3D, dcg: FitResult, timer: Optional[StageTimer] = None
                    ) -> tuple[dict[str, FitResult], dict[str, nn.Module]]:
    """Everything after phase 1: phase 2 and the main checkpoint, the baselines, ``history.json``.

    Args:
        model: holds the finished phase-1 DCG (:func:`train_phase1` or :func:`load_dcg`).
        dcg: phase 1's result (for the history).
    Returns:
        (results by stage name, the trained baselines by name).
    """
    results = {"dcg": dcg}
    with _timed(timer, "phase 2 (diffusion)"):
        guidance = cache_split_guidance(exp, model, ("train", "val"))  # the frozen DCG, once per volume
        results["diffusion"] = train_phase2(exp, model, guidance)
        save_main_checkpoint(exp, model, {k: history_entry(r) for k, r in results.items()}, guidance["train"])
    baselines = {}
    for name, (net, result) in train_baselines(exp, timer).items():
        baselines[name], results[name] = net, result
    write_history(exp, results)
    return results, baselines


def train_all(exp: Experiment, timer: Optional[StageTimer] = None
              ) -> tuple[DiffMIC3D, dict[str, FitResult], dict[str, nn.Module]]:
    """Phase 1 then :func:`finish_training`: (the finished model, results, baselines)."""
    model = build_model(exp)
    with _timed(timer, "phase 1 (DCG)"):
        dcg = train_phase1(exp, model)
    results, baselines = finish_training(exp, model, dcg, timer)
    return model, results, baselines


# -- the test split -------------------------------------------------------------------------


def _split_predictors(exp: Experiment, model: DiffMIC3D, baselines: dict[str, nn.Module], split: str) -> dict:
    """Model name -> ``predict_batch`` on ``split`` (``utils.evaluation.evaluate.predict_loader``):
    DiffMIC-3D (its chains spread over the prior members), the DCG's global prior and fused
    prediction, the DCG ensemble (the mean of the members' fused predictions, when the model
    keeps out-of-fold DCGs) and the baselines. Everything but the baselines is computed here
    once per scan and looked up by the batch's dataset indices."""
    config, device = exp.config, exp.device
    members = cache_member_guidance(exp, model, split)
    ours = predict_dataset(model, exp.datasets[split], members, device, config.batch_size, config.seed,
                           num_workers=config.num_workers)

    def rows_of(values: dict[str, torch.Tensor]):
        def predict(batch):
            rows = torch.as_tensor(batch["index"]).cpu()
            return {k: v[:, rows] if k == "samples" else v[rows] for k, v in values.items()}
        return predict

    predictors = {
        OURS: rows_of({k: ours[k] for k in ("probs", "std", "entropy", "samples")}),
        ABLATION_GLOBAL: rows_of({"probs": members[0].global_probs}),
        ABLATION_FUSED: rows_of({"probs": members[0].fused_probs}),
    }
    if len(members) > 1:
        fused = torch.stack([g.fused_probs for g in members])  # (m, N, C)
        predictors[ENSEMBLE] = rows_of({"probs": fused.mean(0), "samples": fused})
    for name, net in baselines.items():
        net.eval()
        predictors[DISPLAY_NAMES[name]] = (lambda net: lambda batch: {"probs": torch.softmax(net(batch["image"]), 1)})(net)
    return predictors


def predict_split(exp: Experiment, model: DiffMIC3D, baselines: dict[str, nn.Module], split: str
                  ) -> dict[str, Predictions]:
    """Every model's :class:`Predictions` on ``split``; DiffMIC-3D's carry its stored decision
    threshold (binary), the others get theirs from the validation split in ``evaluate_experiment``."""
    loader = eval_loader(exp.datasets[split], exp.config)
    predictions = {name: predict_loader(fn, loader, exp.device, desc=f"{split} {name}", progress=exp.config.progress)
                   for name, fn in _split_predictors(exp, model, baselines, split).items()}
    if exp.num_classes == 2:
        predictions[OURS].threshold = float(model.decision_threshold)
    return predictions


def evaluate_test(exp: Experiment, model: DiffMIC3D, baselines: dict[str, nn.Module]) -> list[dict]:
    """The test split, once: DiffMIC-3D, its ablations (DCG global prior only; DCG without
    diffusion; the DCG ensemble) and the baselines.

    The validation split is predicted first, by every model, to choose each model's decision
    threshold (``val_predictions.csv``). Writes ``evaluation_results.csv`` (at argmax and at
    the validation threshold, ECE), ``predictions.csv``, ``uncertainty.csv`` and the figures
    (``utils.evaluation.evaluate``), including the risk-coverage curves, the saliency / ROI
    and denoising-trajectory figures of one test scan per class (the DCG's most confidently correct
    one, ``utils.evaluation.showcase.SHOWCASE_RULE``; lesion outlined on phantoms) and the baselines' Grad-CAM
    maps of the same scans (``utils.evaluation.gradcam``). DiffMIC-3D samples with the model's
    own settings (``DiffusionConfig.num_samples``, ``ddim_steps``), its chains spread over its
    prior members. Returns the evaluation rows (``model, metric, value, ci_low, ci_high``).
    A distributed run calls it on rank 0 alone (with a one-process ``exp``): DiffMIC-3D's
    chains draw from one seeded generator in scan order, so sharding the test split would make
    its numbers depend on the number of GPUs.
    """
    config, test = exp.config, exp.datasets["test"]
    model.eval()
    val_predictions = predict_split(exp, model, baselines, "val")
    predictions = predict_split(exp, model, baselines, "test")
    csv_base = exp.data_root if exp.data_root.is_dir() else exp.data_root.parent  # as splits.csv: a .npz's folder
    rows = evaluate_experiment(predictions, exp.output_dir, exp.class_names, seed=config.seed,
                               n_resamples=config.n_resamples, data_root=csv_base, val_predictions=val_predictions,
                               reference=ABLATION_FUSED)
    shown = showcase_indices(test.labels, predictions[ABLATION_FUSED].probs)  # showcase.SHOWCASE_RULE
    volumes, paths = [test[i]["image"].numpy() for i in shown], [test.records[i].path for i in shown]
    labels = [int(test.records[i].label) for i in shown]
    write_model_figures(model, volumes, paths, exp.output_dir, seed=config.seed, class_names=exp.class_names,
                        labels=labels,
                        hires_volumes=None if exp.hires_cache is None else [test[i]["image_hires"].numpy()
                                                                            for i in shown],
                        lesion_masks=lesion_masks(test, shown, getattr(exp.cache, "config", None)))
    write_baseline_gradcam(baselines, DISPLAY_NAMES, volumes, paths, exp.output_dir, exp.class_names, labels)
    return rows
