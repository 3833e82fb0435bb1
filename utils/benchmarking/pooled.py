"""The pooled analysis of a multi-seed quality benchmark, read from its run folders.

Every seed's run (``utils.run``) scored its test split once and wrote ``predictions.csv`` and
``val_predictions.csv`` (probabilities, each model's validation-chosen threshold, uncertainty
scores). From them, with seeds and scans pooled (``utils.evaluation.protocol``):

* the primary comparison, stated before the runs: **DiffMIC-3D minus its DCG (fused
  prediction), test ROC-AUC**, per seed (paired bootstrap) and pooled (bootstrap over seeds
  and scans, a scan shared by seeds drawn once for all of them; DeLong on the seed-averaged
  predictions where every seed scored the same scans); the same for the matched DCG ensemble,
  the DCG's global prior and the baselines;
* decisions: each model at 0.5 (argmax) and at its validation threshold, the best balanced
  accuracy any threshold reaches on the test scans (what its ranking allows) and the ECE;
* uncertainty: AURC, error-detection AUROC and accuracy at 100/90/80/70% coverage of every
  score, each paired with the DCG's softmax confidence (``msp``) and pooled the same way.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from utils.benchmarking.report import DCG_FUSED, OURS, RESNET
from utils.evaluation import uncertainty as u
from utils.evaluation.calibration import expected_calibration_error
from utils.evaluation.metrics import classification_metrics
from utils.evaluation.paired import paired_auc_difference
from utils.evaluation.protocol import pooled_comparison, scan_resample_counts, two_stage
from utils.evaluation.selective import COVERAGES, errors_of
from utils.evaluation.thresholds import best_balanced_accuracy, threshold_metrics
from utils.pipeline import ABLATION_GLOBAL as DCG_GLOBAL, ENSEMBLE  # noqa: F401 (ENSEMBLE re-exported)

REFERENCE = (DCG_FUSED, "msp")  # the softmax confidence every uncertainty score is compared with


@dataclass
class ModelPredictions:
    """One model on one split of one seed: probs (N, C), its decision threshold (or None),
    uncertainty scores name -> (N,)."""

    probs: np.ndarray
    threshold: float | None
    scores: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class SplitPredictions:
    """Every model on one split of one seed's run (the same scans in the same order)."""

    labels: np.ndarray
    paths: list[str]
    models: dict[str, ModelPredictions]


def read_split(run_dir: Path, name: str = "predictions.csv") -> SplitPredictions:
    """``predictions.csv`` (test) or ``val_predictions.csv`` of a run folder."""
    with open(Path(run_dir) / name, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{run_dir}/{name} holds no predictions")
    prob_cols = [c for c in rows[0] if c.startswith("prob_")]
    score_cols = [c for c in rows[0] if c.startswith("u_")]
    grouped: dict[str, list[dict]] = {}
    for row in rows:
        grouped.setdefault(row["model"], []).append(row)
    first = next(iter(grouped.values()))
    labels, paths = np.array([int(r["label"]) for r in first]), [r["path"] for r in first]
    models = {}
    for model, items in grouped.items():
        if [r["path"] for r in items] != paths:
            raise ValueError(f"{run_dir}/{name}: {model} was not scored on the same scans in the same order")
        threshold = items[0].get("threshold", "")
        scores = {c[2:]: np.array([float(r[c]) for r in items]) for c in score_cols if items[0][c] != ""}
        probs = np.array([[float(r[c]) for c in prob_cols] for r in items])
        threshold = float(threshold) if threshold not in ("", None) else None
        scores.setdefault("msp", 1.0 - probs.max(axis=1))  # functions of probs and threshold alone, for
        scores.setdefault("risk", u.decision_risk(probs, threshold if probs.shape[1] == 2 else None))  # older runs
        models[model] = ModelPredictions(probs, threshold, scores)
    return SplitPredictions(labels, paths, models)


def _seeds_with(runs: dict[int, SplitPredictions], *models: str) -> list[int]:
    return [s for s, run in sorted(runs.items()) if all(m in run.models for m in models)]


def auc_rows(runs: dict[int, SplitPredictions]) -> dict[str, dict[int, float]]:
    """Model -> seed -> test ROC-AUC."""
    out: dict[str, dict[int, float]] = {}
    for seed, run in sorted(runs.items()):
        for name, pred in run.models.items():
            out.setdefault(name, {})[seed] = classification_metrics(run.labels, pred.probs)["roc_auc"]
    return out


def compare(runs: dict[int, SplitPredictions], a: str, b: str, n_resamples: int = 2000) -> dict | None:
    """``a`` minus ``b`` in test ROC-AUC: per seed (paired bootstrap, seeded by the seed) and
    pooled (``protocol.pooled_comparison``); None when no seed has both models."""
    seeds = _seeds_with(runs, a, b)
    if not seeds:
        return None
    per_seed = {s: paired_auc_difference(runs[s].labels, runs[s].models[a].probs, runs[s].models[b].probs,
                                         n_resamples, s) for s in seeds}
    pooled = pooled_comparison([runs[s].labels for s in seeds], [runs[s].models[a].probs for s in seeds],
                               [runs[s].models[b].probs for s in seeds], paths=[runs[s].paths for s in seeds],
                               n_resamples=n_resamples, seed=0)
    return {"a": a, "b": b, "seeds": seeds, "per_seed": per_seed, "pooled": pooled}


def decision_rows(runs: dict[int, SplitPredictions]) -> dict[str, dict[str, list[float]]]:
    """Model -> measure -> per-seed values: accuracy / balanced accuracy / recall / specificity
    at 0.5 and at the validation threshold, the best balanced accuracy any threshold reaches on
    the test scans, the threshold loss (best minus at the validation threshold) and the ECE."""
    out: dict[str, dict[str, list[float]]] = {}
    for _, run in sorted(runs.items()):
        for name, pred in run.models.items():
            row = out.setdefault(name, {})
            at_half = threshold_metrics(run.labels, pred.probs, None)
            at_val = threshold_metrics(run.labels, pred.probs, pred.threshold) if pred.threshold is not None else {}
            best = best_balanced_accuracy(run.labels, pred.probs) if pred.probs.shape[1] == 2 else float("nan")
            values = {"accuracy@0.5": at_half["accuracy"], "balanced_accuracy@0.5": at_half["balanced_accuracy"],
                      "recall@0.5": at_half["recall"], "specificity@0.5": at_half["specificity"],
                      "threshold": pred.threshold if pred.threshold is not None else float("nan"),
                      "balanced_accuracy@val": at_val.get("balanced_accuracy", float("nan")),
                      "recall@val": at_val.get("recall", float("nan")),
                      "specificity@val": at_val.get("specificity", float("nan")),
                      "best_balanced_accuracy": best,
                      "threshold_loss": best - at_val.get("balanced_accuracy", float("nan")),
                      "ece": expected_calibration_error(run.labels, pred.probs)}
            for key, value in values.items():
                row.setdefault(key, []).append(float(value))
    return out


def uncertainty_comparison(runs: dict[int, SplitPredictions], model: str, score: str,
                           reference: tuple[str, str] = REFERENCE, n_resamples: int = 2000, seed: int = 0) -> dict | None:
    """``model``'s ``score`` against ``reference``'s, pooled over seeds and scans: for AURC,
    error-detection AUROC and accuracy at 80% coverage, ``{"a", "b" (means over seeds), "diff",
    "ci_low", "ci_high", "p_value", "per_seed"}`` (bootstrap over seeds and scans, paired on the
    scans, a scan several seeds scored drawn once: ``protocol.scan_resample_counts``), plus
    ``accuracy_at`` (model's mean accuracy at each of ``COVERAGES``)."""
    seeds = [s for s in _seeds_with(runs, model, reference[0]) if score in runs[s].models[model].scores]
    if not seeds:
        return None
    rng = np.random.default_rng(seed)
    counts_of = dict(zip(seeds, scan_resample_counts([runs[s].labels for s in seeds], [runs[s].paths for s in seeds],
                                                     n_resamples, rng)))
    points, boots, acc = {}, {}, {c: [] for c in COVERAGES}
    for s in seeds:
        run = runs[s]
        a, b = run.models[model], run.models[reference[0]]
        ea, eb = errors_of(run.labels, a.probs, a.threshold), errors_of(run.labels, b.probs, b.threshold)
        ua, ub = a.scores[score], b.scores[reference[1]]
        pa = {"aurc": u.aurc(ea, ua), "error_detection_auroc": u.error_detection_auroc(ea, ua),
              "accuracy_at_80": u.accuracy_at_coverage(ea, ua, (0.8,))[0.8]}
        pb = {"aurc": u.aurc(eb, ub), "error_detection_auroc": u.error_detection_auroc(eb, ub),
              "accuracy_at_80": u.accuracy_at_coverage(eb, ub, (0.8,))[0.8]}
        ba, bb = u.boot_selective_metrics(counts_of[s], ea, ua), u.boot_selective_metrics(counts_of[s], eb, ub)
        for key in pa:
            points.setdefault(key, []).append((pa[key], pb[key]))
            boots.setdefault(key, []).append(ba[key] - bb[key])
        for c, value in u.accuracy_at_coverage(ea, ua, COVERAGES).items():
            acc[c].append(value)
    out = {"model": model, "score": score, "seeds": seeds,
           "accuracy_at": {c: float(np.mean(v)) for c, v in acc.items()}}
    for key, pairs in points.items():
        diffs = [pa - pb for pa, pb in pairs]
        pooled = two_stage(diffs, np.stack(boots[key]), rng)
        out[key] = {**pooled, "a": _finite_mean([p[0] for p in pairs]), "b": _finite_mean([p[1] for p in pairs])}
    return out


def _finite_mean(values) -> float:
    """Mean of the finite values (a seed whose model made no error has no error-detection AUROC);
    nan when there is none."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else float("nan")


UNCERTAINTY_ITEMS = ((OURS, "margin"), (OURS, "risk"), (OURS, "msp"), (OURS, "spread"), (OURS, "ttest"),
                     (OURS, "entropy"), (DCG_FUSED, "msp"), (DCG_FUSED, "margin"), (DCG_FUSED, "risk"),
                     (ENSEMBLE, "msp"), (ENSEMBLE, "risk"), (ENSEMBLE, "spread"), (RESNET, "msp"), (RESNET, "risk"))


def analyse(runs: dict[int, SplitPredictions], n_resamples: int = 2000) -> dict:
    """Everything the report shows: ``auc``, ``comparisons`` (primary first), ``decisions``,
    ``uncertainty``."""
    comparisons = [c for c in (compare(runs, OURS, other, n_resamples)
                               for other in (DCG_FUSED, ENSEMBLE, DCG_GLOBAL, RESNET, "3D DenseNet-121"))
                   if c is not None]
    uncertainty = [c for c in (uncertainty_comparison(runs, m, s, n_resamples=n_resamples)
                               for m, s in UNCERTAINTY_ITEMS) if c is not None]
    return {"auc": auc_rows(runs), "comparisons": comparisons, "decisions": decision_rows(runs),
            "uncertainty": uncertainty}


SHOWN = ((OURS, "risk"), (OURS, "margin"), (OURS, "spread"), (DCG_FUSED, "msp"), (ENSEMBLE, "msp"), (RESNET, "msp"))


def pooled_curves(runs: dict[int, SplitPredictions], items=SHOWN, points: int = 101) -> dict[str, tuple]:
    """``"model: score"`` -> (coverage (points,), risk averaged over seeds) for
    ``plot_risk_coverage``: each seed's risk-coverage curve (errors at the model's validation
    threshold) interpolated onto a common coverage grid, then averaged."""
    grid = np.linspace(0.05, 1.0, points)
    curves = {}
    for model, score in items:
        risks = []
        for s in _seeds_with(runs, model):
            pred = runs[s].models[model]
            if score not in pred.scores:
                continue
            curve = u.risk_coverage_curve(errors_of(runs[s].labels, pred.probs, pred.threshold), pred.scores[score])
            risks.append(np.interp(grid, curve["coverage"], curve["risk"]))
        if risks:
            curves[f"{model}: {score}"] = (grid, np.mean(risks, axis=0))
    return curves
