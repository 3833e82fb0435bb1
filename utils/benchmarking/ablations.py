"""The quality benchmark's ablations (seed 0): phase 2 retrained with one design element
reverted at a time on the seed's DCG, the readout with other sample counts, and phase 1
without the DCG curriculum or the foreground ROI restriction; each scored once on the test split."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional

import numpy as np

from utils.benchmarking.report import DCG_FUSED, OURS
from utils.evaluation.metrics import classification_metrics
from utils.evaluation.paired import paired_auc_difference
from utils.log import get_logger
from utils.training.profiles import TrainConfig

log = get_logger(__name__)

PHASE2_ABLATIONS = {  # name -> (TrainConfig changes, model_overrides)
    "leaky denoiser (3x3x3 head over y_t, the first version's leak)": ({}, {"denoiser": {"head_kernel": 3}}),
    "memorised priors (no out-of-fold DCGs)": ({"oof_folds": 0}, {}),
    "no own image encoder": ({}, {"denoiser": {"use_image_encoder": False}}),
    "eps-prediction, T=500 linear (the first version's objective)": (
        {}, {"diffusion": {"parameterization": "eps", "num_timesteps": 500, "zero_terminal_snr": False}}),
    "y0-prediction, T=500 linear (schedule with signal left at T)": (
        {}, {"diffusion": {"num_timesteps": 500, "zero_terminal_snr": False}}),
}
PHASE1_ABLATIONS = {
    "no DCG curriculum (top-t% and local CE from the first step)": (
        {"dcg_pool_warmup": 0.0, "dcg_local_start": 0.0, "dcg_local_ramp": 0.0}, {}),
    "ROIs anywhere (no foreground restriction)": ({}, {"dcg": {"roi_foreground": False}}),
}


def _merge(a: dict, b: dict) -> dict:
    return {k: {**a.get(k, {}), **b.get(k, {})} for k in set(a) | set(b)}


def ablations(config: TrainConfig, run_dir: Path, data_dir: Optional[Path], out: Path, labels: np.ndarray,
              probs: dict[str, np.ndarray]) -> list[dict]:
    """Rows ``{group, variant, val_auc, test_auc, vs_full, vs_dcg}`` (module docstring).

    Args:
        config, run_dir, data_dir: the finished seed run (its phase 1 is loaded, not retrained).
        out: where the variants' checkpoints go (one folder each).
        labels, probs: that run's test predictions (``quality.read_predictions(run_dir)``).
    """
    from models.diffmic3d import DiffMIC3D
    from utils.experiment import prepare_experiment
    from utils.pipeline import build_model, cache_split_guidance, out_of_fold_guidance, reseed_stage, train_phase1
    from utils.training.checkpoint import load_checkpoint
    from utils.training.dcg import cache_guidance, train_dcg
    from utils.training.diffusion import calibrate_temperature, predict_dataset, train_diffusion

    exp = prepare_experiment(config, run_dir, data_dir, verbose=False)
    device, test, val = exp.device, exp.datasets["test"], exp.datasets["val"]
    model = build_model(exp)
    train_phase1(exp, model)  # finished: only loads
    guidance = cache_split_guidance(exp, model, ("train", "val", "test"))
    oof = out_of_fold_guidance(exp, model) if config.oof_folds >= 2 else guidance["train"]
    y_test = test.labels

    def row(group: str, variant: str, val_auc: float, p: np.ndarray, vs_full: bool = True) -> dict:
        """One table row: test AUC of ``p`` (N, C) and its paired differences."""
        return {"group": group, "variant": variant, "val_auc": val_auc,
                "test_auc": classification_metrics(y_test, p)["roc_auc"],
                "vs_full": paired_auc_difference(y_test, p, probs[OURS], 2000, 0) if vs_full else None,
                "vs_dcg": paired_auc_difference(y_test, p, probs[DCG_FUSED], 2000, 0)}

    rows = [{"group": "reference", "variant": "full method (the seed-0 run)",
             "val_auc": float("nan"), "test_auc": classification_metrics(labels, probs[OURS])["roc_auc"],
             "vs_full": None, "vs_dcg": paired_auc_difference(labels, probs[OURS], probs[DCG_FUSED], 2000, 0)}]

    def variant_model(changes: dict, overrides: dict, stage: str) -> tuple[TrainConfig, DiffMIC3D, Path]:
        """The variant's config, a fresh model seeded for ``stage`` and its own folder."""
        variant = replace(config, **changes, model_overrides=_merge(config.model_overrides, overrides))
        folder = out / f"ablation_{len(rows)}"
        folder.mkdir(parents=True, exist_ok=True)
        reseed_stage(exp, stage)  # the variant's seed is the run's
        return variant, DiffMIC3D(variant.model_config(device, exp.num_classes)).to(device), folder

    for name, (changes, overrides) in PHASE2_ABLATIONS.items():
        variant, net, folder = variant_model(changes, overrides, "diffusion")
        net.dcg.load_state_dict(model.dcg.state_dict())
        train_g = guidance["train"] if variant.oof_folds < 2 else oof
        result = train_diffusion(net, exp.datasets["train"], train_g, val, guidance["val"], variant, device,
                                 folder / "diffusion.pth", exp.meta)
        calibrate_temperature(net, val, guidance["val"], variant, device)
        # the variant's own sampling settings (its DiffusionConfig)
        p = predict_dataset(net, test, guidance["test"], device, variant.batch_size, variant.seed)["probs"].numpy()
        rows.append(row("phase 2", name, result.best["val_auc"], p))
        log.info(f"[ablation] {name}: test AUC {rows[-1]['test_auc']:.3f}")

    saved = load_checkpoint(exp.main_checkpoint)
    full = DiffMIC3D.from_config_dict(saved["model_config"]).to(device)
    full.load_state_dict(saved["model_state_dict"])
    full.eval()
    sampling = full.config.diffusion
    for samples in (1, 5):
        p = predict_dataset(full, test, guidance["test"], device, config.batch_size, config.seed, samples,
                            sampling.ddim_steps)["probs"].numpy()
        rows.append(row("readout", f"{samples} sample(s) instead of {sampling.num_samples}", float("nan"), p))

    for name, (changes, overrides) in PHASE1_ABLATIONS.items():
        variant, net, folder = variant_model(changes, overrides, "dcg")
        result = train_dcg(net, exp.datasets["train"], val, variant, device, folder / "dcg.pth", exp.meta)
        net.freeze_dcg()
        g = cache_guidance(net, test, device, variant.batch_size, progress=False)
        p = g.fused_probs.numpy()
        rows.append(row("phase 1 (DCG fused prediction)", name, result.best["val_auc"], p, vs_full=False))
        log.info(f"[ablation] {name}: DCG test AUC {rows[-1]['test_auc']:.3f}")
    return rows
