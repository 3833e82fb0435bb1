"""The quality benchmark's ablations, on every seed's finished run and pooled over the seeds
like the main comparison (``utils.evaluation.protocol.hierarchical_paired_auc``).

Inference-only (the seed's trained model, nothing retrained): its priors replaced by
uninformative ones, its own image encoder zeroed, one denoiser pass instead of the sampler,
the final DCG's prior only, and its correction switched off (the prior members' ensemble it
reads: what phase 2 adds to it). Retrained (phase 2 only, on the seed's DCGs and out-of-fold
priors): the denoiser predicting y_0 directly instead of a correction of its prior, no loss
weighting, DiffMIC-v2's label-dependent weights (``TrainConfig.error_weighting``), the own
image encoder deeply supervised by a classifier of its own (``DenoiserConfig.image_ce_weight``), and
a finer own encoder (two stages, stride 4: a 32^3 scan gives the 8^3 grid's features directly, each
grid point its own local ones, where the default's stride-16 map is 2^3 upsampled), also trained
for twice the phase-2 epochs (its validation loss was still falling at the default's 8), and the
condition reading the scan's shape descriptors (``DenoiserConfig.morphometry``), with its other inputs
or alone beside the priors (no own encoder, no feature prior: the readout probe's inputs), and the
guidance map blending the two priors by the design's distance instead of the weight fitted on the
training split (``PriorConfig.blend``; the default since the cross-fit accepted the fitted one). Each
variant is scored once on the test split; its predictions are kept in
``OUT/ablations_<name>/seed<s>.npz`` (with a retrained variant's validation predictions, under
its name + ``VALIDATION``: the decision between configurations is made on those; a variant cached
without them is reloaded from its finished phase-2 checkpoint, not retrained, and must reproduce its
cached test predictions) so a rerun only reads them, and a report pools every
variant over the seeds that have it (retrained variants may have been run on fewer seeds: the
report says which).
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from utils.atomic import atomic_path, atomic_write_text
from utils.benchmarking.pooled import read_split
from utils.benchmarking.report import DCG_FUSED, OURS, markdown_table
from utils.evaluation.metrics import classification_metrics
from utils.evaluation.protocol import hierarchical_paired_auc
from utils.log import get_logger
from utils.paths import HISTORY_JSON
from utils.training.profiles import TrainConfig

log = get_logger(__name__)

INFERENCE = ("priors replaced by uninformative ones (uniform M, no F)", "own image encoder zeroed",
             "one denoiser pass (1 DDIM step, one chain per member)", "the final DCG's prior only (no fold members)",
             "the correction switched off (its prior ensemble)")
NO_CORRECTION = INFERENCE[4]  # only where the denoiser learns a correction of its prior (prior_residual)
# the readout probe's inputs (prior + shape) inside phase 2: nothing else of the scan, no DCG features
SHAPE_ONLY = {"morphometry": True, "use_image_encoder": False, "use_feature_prior": False}
FINE_ENCODER = {"denoiser": {"encoder_channels": (32, 64), "encoder_blocks": (1, 2)}}  # stride 4: the 8^3 grid
RETRAINED = {  # name -> (TrainConfig changes, model_overrides)
    "denoiser predicts y_0 directly (no correction of its prior)": ({}, {"denoiser": {"prior_residual": False}}),
    "no loss weighting": ({"error_weight": 0.0}, {}),
    "DiffMIC-v2's label-dependent weights 1 + 10 (1 - p_DCG(true class))": ({"error_weighting": "label"}, {}),
    "own image encoder deeply supervised (image_ce_weight 0.5)": ({}, {"denoiser": {"image_ce_weight": 0.5}}),
    "own image encoder at stride 4 (its feature map is the grid, no upsampling)": ({}, FINE_ENCODER),
    "own image encoder at stride 4, 16 phase-2 epochs": ({"diffusion_epochs": 16}, FINE_ENCODER),
    "the condition reads 15 shape descriptors of the scan (morphometry)": ({}, {"denoiser": {"morphometry": True}}),
    "the condition reads its priors and the 15 shape descriptors only (no own encoder, no feature prior)":
        ({}, {"denoiser": SHAPE_ONLY}),
    "the guidance map's blend of the two priors by the design's distance (not fitted)":
        ({}, {"prior": {"blend": "distance"}}),
}
VALIDATION = " [validation]"  # cache key of a retrained variant's validation probabilities: its name + this
# the short names of the retrained variants (``--ablations NAME``), in RETRAINED's order
RETRAINED_KEYS = dict(zip(("no-correction", "no-weighting", "label-weights", "image-ce", "fine-encoder",
                          "fine-encoder-16", "morphometry", "shape-only", "distance-blend"), RETRAINED))


def retrained_of(mode: str) -> list[str]:
    """The retrained variants an ablation mode runs: ``all``, none for ``inference``, or the one
    its short name (``RETRAINED_KEYS``) names (with the inference-only variants, in every mode)."""
    if mode == "all":
        return list(RETRAINED)
    if mode == "inference":
        return []
    if mode not in RETRAINED_KEYS:
        raise ValueError(f"ablations must be all, inference or one of {list(RETRAINED_KEYS)}, got {mode!r}")
    return [RETRAINED_KEYS[mode]]


def _merge(a: dict, b: dict) -> dict:
    return {k: {**a.get(k, {}), **b.get(k, {})} for k in set(a) | set(b)}


def variant_config(config: TrainConfig, name: str) -> TrainConfig:
    """``config`` with the changes of the retrained variant ``name`` (a key of ``RETRAINED``)."""
    changes, overrides = RETRAINED[name]
    return replace(config, **changes, model_overrides=_merge(config.model_overrides, overrides))


def uninformative(guidance):
    """A copy of a DCG cache with uniform class probabilities and zero features."""
    from models.dcg_model import DCGOutput

    fields = {k: v.clone() for k, v in guidance.as_dict().items()}
    for key in ("global_probs", "local_probs", "fused_probs"):
        fields[key] = torch.full_like(fields[key], 1.0 / fields[key].shape[1])
    for key in ("global_features", "roi_features"):
        fields[key] = torch.zeros_like(fields[key])
    return DCGOutput(**fields)


def inference_names(model) -> list[str]:
    """The ``INFERENCE`` variants that apply to ``model``: all, less the correction switched off
    where its denoiser predicts y_0 directly (no correction to switch off)."""
    return [v for v in INFERENCE if v != NO_CORRECTION or model.denoiser.head.prior_residual]


def inference_variants(model, members: list, predict, names=None) -> dict[str, np.ndarray]:
    """The ``INFERENCE`` variants of a finished model on some scans (``names``: these only;
    default ``inference_names(model)``): ``members`` its prior members' DCG caches of them
    (``utils.pipeline.cache_member_guidance``), ``predict(net, guidance, **kw)`` the (N, C)
    probabilities of ``utils.training.diffusion.predict_dataset`` on them. The correction
    switched off is ``utils.training.diffusion.check_correction``'s prior-only model
    (``PointHead.switch_off_correction``), so DiffMIC-3D returns the prior members' ensemble it reads."""
    def no_encoder():
        net = copy.deepcopy(model)
        net.denoiser.config.use_image_encoder = False
        return predict(net, members)

    def no_correction():
        net = copy.deepcopy(model)
        net.denoiser.head.switch_off_correction()
        return predict(net, members)

    variants = {INFERENCE[0]: lambda: predict(model, [uninformative(g) for g in members]),
                INFERENCE[1]: no_encoder,
                INFERENCE[2]: lambda: predict(model, members, num_samples=model.num_members, steps=1),
                INFERENCE[3]: lambda: predict(model, members[0]),
                NO_CORRECTION: no_correction}
    return {name: variants[name]() for name in (inference_names(model) if names is None else names)}


def seed_ablations(config: TrainConfig, run_dir: Path, data_dir: Optional[Path], out: Path,
                   device: Optional[str] = None, retrained=True) -> dict[str, np.ndarray]:
    """Variant name -> test probabilities (N, C) of one seed's finished run (module docstring);
    ``retrained=False`` scores the inference-only variants alone (minutes instead of two phase-2
    trainings), or a sequence of the retrained variants' names to run. A cache holding fewer
    variants than asked for is completed, not recomputed; every cached variant is returned."""
    from models.diffmic3d import DiffMIC3D
    from utils.experiment import prepare_experiment
    from utils.pipeline import cache_member_guidance, load_main_model, out_of_fold_guidance, reseed_stage
    from utils.training.diffusion import predict_dataset, train_diffusion
    from utils.training.readout import calibrate_readout

    cached = out / f"seed{config.seed}.npz"
    chosen = list(RETRAINED) if retrained is True else list(retrained or ())
    unknown = sorted(set(chosen) - set(RETRAINED))
    if unknown:
        raise ValueError(f"unknown retrained ablations {unknown}; known: {list(RETRAINED)}")
    wanted = list(INFERENCE) + chosen + [name + VALIDATION for name in chosen]
    probs = {}
    if cached.is_file():
        with np.load(cached) as saved:
            probs = {str(k): saved[k] for k in saved.files}
        if all(v in probs for v in wanted):
            return probs
    exp = prepare_experiment(config, run_dir, data_dir, device=device, verbose=False)
    model = load_main_model(exp)
    test, val = exp.datasets["test"], exp.datasets["val"]
    members = {split: cache_member_guidance(exp, model, split) for split in ("val", "test")}

    def predict(net, guidance, **kw):
        return predict_dataset(net, test, guidance, exp.device, config.batch_size, config.seed, **kw)["probs"].numpy()

    missing = [v for v in inference_names(model) if v not in probs]
    if missing:  # a cache written before a variant was added is completed, not recomputed
        probs.update(inference_variants(model, members["test"], predict, missing))
    todo = [name for name in RETRAINED if name in chosen and not (name in probs and name + VALIDATION in probs)]
    oof = out_of_fold_guidance(exp, model) if todo and config.oof_folds >= 2 else None
    for name in todo:
        variant = variant_config(config, name)
        reseed_stage(exp, "diffusion")
        net = DiffMIC3D(variant.model_config(exp.device, exp.num_classes)).to(exp.device)
        net.dcg.load_state_dict(model.dcg.state_dict())
        net.fold_dcgs.load_state_dict(model.fold_dcgs.state_dict())
        train_guidance = oof if oof is not None else cache_member_guidance(exp, model, "train")[0]
        folder = variant_dir(out, config.seed, name)
        folder.mkdir(parents=True, exist_ok=True)
        train_diffusion(net, exp.datasets["train"], train_guidance, val, members["val"], variant, exp.device,
                        folder / "diffusion.pth", exp.meta)
        calibrate_readout(net, val, members["val"], variant, exp.device)
        cached_test = probs.get(name)  # a variant cached before its validation probabilities were kept
        probs[name] = predict(net, members["test"])
        if cached_test is not None and not np.allclose(cached_test, probs[name], atol=1e-5):
            raise RuntimeError(f"seed {config.seed} {name}: the reloaded variant does not reproduce its cached test "
                               f"probabilities (max |dp| {np.abs(cached_test - probs[name]).max():.2e})")
        probs[name + VALIDATION] = predict_dataset(net, val, members["val"], exp.device, config.batch_size,
                                                   config.seed)["probs"].numpy()
        log.info(f"[ablation] seed {config.seed} {name}: test AUC "
                 f"{classification_metrics(test.labels, probs[name])['roc_auc']:.3f}")
    with atomic_path(cached) as tmp:  # creates ``out``; a failed write leaves no temporary file
        np.savez(tmp, **probs)
    return probs


def variant_dir(out: Path, seed: int, variant: str) -> Path:
    """Where a retrained variant of a seed keeps its phase-2 checkpoint (numbered in RETRAINED's order)."""
    return out / f"seed{seed}_variant{list(RETRAINED).index(variant)}"


def selected_val_auc(runs_dir: Path, name: str, seed: int, variant: Optional[str] = None) -> float:
    """Phase 2's validation AUC at its selected epoch (the default's rule for choosing between
    configurations): of the seed's run (``variant`` None) or of a retrained variant (its phase-2
    checkpoint); NaN where there is none."""
    if variant is None:
        history = runs_dir / f"quality_{name}_seed{seed}" / HISTORY_JSON
        if not history.is_file():
            return math.nan
        phase2 = json.loads(history.read_text()).get("diffusion", {})
        best = phase2.get("best_epoch")
        return float(phase2["val_auc"][best - 1]) if best else math.nan
    path = variant_dir(runs_dir / f"ablations_{name}", seed, variant) / "diffusion.pth"
    if not path.is_file():
        return math.nan
    best = torch.load(path, map_location="cpu", weights_only=True).get("fit", {}).get("best") or {}
    return float(best.get("val_auc", math.nan))


def write_ablations(base: TrainConfig, seeds: tuple[int, ...], name: str, data: str, runs_dir: Path,
                    data_dir: Optional[Path], output_dir: Path, device: Optional[str] = None,
                    mode: str = "all") -> Path:
    """Every seed's ablations, pooled: ``quality_<name>_ablations.md``. ``mode`` (``retrained_of``):
    the inference-only variants are run on every seed, with every retrained one (``all``), none
    (``inference``) or the one named; retrained variants not asked for are reported where cached
    (the report names their seeds, or says they were not run)."""
    from utils.benchmarking.quality import command

    retrained = retrained_of(mode)
    splits, val_splits, variants, val_variants = {}, {}, {}, {}
    for seed in seeds:
        run_dir = runs_dir / f"quality_{name}_seed{seed}"
        splits[seed], val_splits[seed] = read_split(run_dir), read_split(run_dir, "val_predictions.csv")
        probs = seed_ablations(replace(base, seed=seed), run_dir, data_dir, runs_dir / f"ablations_{name}", device,
                               retrained)
        for variant, p in probs.items():
            if variant.endswith(VALIDATION):
                if len(p) != len(val_splits[seed].labels):
                    raise ValueError(f"seed {seed} {variant}: {len(p)} validation rows, the run has "
                                     f"{len(val_splits[seed].labels)}")
                val_variants.setdefault(variant[:-len(VALIDATION)], {})[seed] = p
            else:
                variants.setdefault(variant, {})[seed] = p

    def probs_of(model: str, on: list[int]) -> list:
        return [splits[s].models[model].probs for s in on]

    def pooled(on: list[int], a: list, b: list, split=splits) -> str:
        h = hierarchical_paired_auc([split[s].labels for s in on], a, b, base.n_resamples, 0,
                                    paths=[split[s].paths for s in on])
        return f"{h['diff']:+.3f} [{h['ci_low']:+.3f}, {h['ci_high']:+.3f}]"

    def auc(on: list[int], ps: list) -> str:
        return f"{np.mean([classification_metrics(splits[s].labels, p)['roc_auc'] for s, p in zip(on, ps)]):.3f}"

    def val_auc(on: list[int], variant: Optional[str]) -> str:
        values = [selected_val_auc(runs_dir, name, s, variant) for s in on]
        return "" if any(math.isnan(v) for v in values) else f"{np.mean(values):.3f}"

    def val_pooled(on: list[int], variant: str) -> str:  # the final models on validation, variant minus full
        if not all(s in val_variants.get(variant, {}) for s in on):
            return ""
        return pooled(on, [val_variants[variant][s] for s in on], [val_splits[s].models[OURS].probs for s in on],
                      val_splits)

    every = list(seeds)
    rows = [["reference", "the full method", ", ".join(map(str, every)), val_auc(every, None), "",
             auc(every, probs_of(OURS, every)), "", pooled(every, probs_of(OURS, every), probs_of(DCG_FUSED, every))]]
    for variant in (*INFERENCE, *RETRAINED):
        if variant not in variants:
            continue
        on = [s for s in seeds if s in variants[variant]]
        ps = [variants[variant][s] for s in on]
        rows.append(["inference only" if variant in INFERENCE else "phase 2 retrained", variant,
                     ", ".join(map(str, on)), "" if variant in INFERENCE else val_auc(on, variant),
                     "" if variant in INFERENCE else val_pooled(on, variant), auc(on, ps),
                     pooled(on, ps, probs_of(OURS, on)),
                     pooled(on, ps, probs_of(DCG_FUSED, on))])
    missing = [v for v in RETRAINED if v not in variants]
    md = [f"### Ablations on {name} (seeds {', '.join(map(str, seeds))}; pooled over seeds and scans)\n",
          f"Command: `{command(data, seeds, ablations=mode)}`. "
          "Inference-only variants change the trained model of each seed at test time; retrained variants rerun "
          "phase 2 on the seed's DCGs and out-of-fold priors"
          + (f" (not run here: {'; '.join(missing)})" if missing else "")
          + ". Differences in test ROC-AUC, paired on the same scans, "
          "pooled over the seeds listed with the bootstrap over seeds and scans (95%; each scan drawn once for all "
          "seeds). The validation columns decide whether "
          "a retrained candidate replaces the default: phase 2's validation AUC at its selected epoch (mean over "
          "the seeds; the rule: higher than the full method's), and beside it the finished models' validation "
          "predictions (the test-time sampler, after the readout) minus the full method's, pooled the same way; "
          "the test columns are read once per variant, for the report.\n",
          markdown_table(["kind", "variant", "seeds", "mean validation AUC (selected epoch)",
                          "minus full method, validation", "mean test AUC", "minus full method",
                          f"minus {DCG_FUSED}"], rows)]
    path = output_dir / f"quality_{name}_ablations.md"
    atomic_write_text(path, "\n".join(md) + "\n")
    return path
