"""Does a model know when it is wrong? Uncertainty scores of every model's test predictions,
risk-coverage curves and their area (AURC), error-detection AUROC and accuracy at 100 / 90 /
80 / 70% coverage, each compared with a reference model's softmax confidence on the same
scans (paired bootstrap, ``utils.evaluation.uncertainty``).

A prediction is wrong when the decision at the model's validation-chosen threshold (binary;
argmax for C > 2) differs from the label. Scores (larger = less sure):

* ``msp``: one minus the maximum softmax probability, the usual "softmax confidence"
  (Hendrycks & Gimpel 2017); the reference every score is compared with is a model's ``msp``;
* ``margin``: minus the distance of the probability from the decision threshold in logit
  units (``uncertainty.threshold_margin``); at threshold 0.5 it ranks scans like ``msp``;
* ``entropy``: the entropy of the (mean) probabilities;
* ``risk``: one minus the probability of the decided class, the model's own probability that
  its decision at the threshold is wrong (``uncertainty.decision_risk``, Chow's rule); at
  threshold 0.5 it is ``msp``;
* for models with several stochastic outputs per scan (DiffMIC-3D's chains, a DCG ensemble's
  members; ``Predictions.samples``): ``spread``, the standard deviation of the decided class's
  probability over them, and ``ttest``, CARD's per-scan p-value of a paired t-test between
  the two top classes' samples (Han et al. 2022).
"""
from __future__ import annotations

import csv
import io
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

import numpy as np

from utils.atomic import atomic_write_text
from utils.evaluation import uncertainty as u

COVERAGES = (1.0, 0.9, 0.8, 0.7)
SCORE_NAMES = ("msp", "margin", "entropy", "risk", "spread", "ttest")
UNCERTAINTY_CSV = "uncertainty.csv"


def uncertainty_scores(probs: np.ndarray, threshold: Optional[float] = None,
                       samples: Optional[np.ndarray] = None) -> dict[str, np.ndarray]:
    """Score name -> (N,) uncertainty of probabilities (N, C) decided at ``threshold`` (binary;
    None: 0.5 / argmax), with ``spread`` and ``ttest`` when ``samples`` (S >= 2, N, C) are given."""
    probs = np.asarray(probs, dtype=np.float64)
    binary = probs.shape[1] == 2
    scores = {"msp": 1.0 - probs.max(axis=1), "margin": -u.threshold_margin(probs, threshold if binary else None),
              "entropy": u.entropy_of_mean(probs), "risk": u.decision_risk(probs, threshold if binary else None)}
    if samples is not None and np.asarray(samples).shape[0] >= 2:
        scores["spread"] = u.chain_spread(samples)
        scores["ttest"] = u.ttest_top2_pvalue(samples)
    return scores


def errors_of(labels: np.ndarray, probs: np.ndarray, threshold: Optional[float] = None) -> np.ndarray:
    """(N,) bool: the decision at ``threshold`` (binary) or the argmax is not the label."""
    probs = np.asarray(probs, dtype=np.float64)
    return u.decisions(probs, threshold if probs.shape[1] == 2 else None) != np.asarray(labels)


def selective_rows(labels: np.ndarray, models: Mapping[str, dict], reference: str, n_resamples: int = 2000,
                   seed: int = 0) -> list[dict]:
    """One row per (model, score): AURC, E-AURC, error-detection AUROC, accuracy at ``COVERAGES``
    and the paired difference to ``reference``'s softmax confidence ``msp`` (AURC,
    error-detection AUROC, accuracy at 80% coverage; 95% stratified bootstrap).

    Args:
        labels: (N,) test labels.
        models: name -> ``{"probs" (N, C), "threshold" float or None, "samples" (S, N, C) or None}``.
        reference: the model whose softmax confidence (``msp``) every score is compared with.
    """
    if reference not in models:
        raise ValueError(f"reference model {reference!r} is not among {list(models)}")
    labels = np.asarray(labels)

    def prepared(entry):
        errors = errors_of(labels, entry["probs"], entry.get("threshold"))
        return errors, uncertainty_scores(entry["probs"], entry.get("threshold"), entry.get("samples"))

    ref_errors, ref_scores = prepared(models[reference])
    rows = []
    for name, entry in models.items():
        errors, scores = prepared(entry)
        for score, values in scores.items():
            row = {"model": name, "score": score, "n": len(labels), "errors": int(errors.sum()),
                   "aurc": u.aurc(errors, values), "e_aurc": u.excess_aurc(errors, values),
                   "error_auroc": u.error_detection_auroc(errors, values)}
            row.update({f"acc@{int(round(100 * c))}": a for c, a in u.accuracy_at_coverage(errors, values, COVERAGES).items()})
            if (name, score) != (reference, "msp"):
                cmp = u.paired_uncertainty_comparison(errors, values, ref_errors, ref_scores["msp"], labels=labels,
                                                      n_resamples=n_resamples, seed=seed)
                for key, res in cmp.items():
                    row.update({f"{key}_minus_ref": res["diff"], f"{key}_minus_ref_low": res["ci_low"],
                                f"{key}_minus_ref_high": res["ci_high"], f"{key}_minus_ref_p": res["p_value"]})
            rows.append(row)
    return rows


def curves_of(labels: np.ndarray, models: Mapping[str, dict], shown: Mapping[str, tuple[str, ...]]) -> tuple[dict, dict]:
    """(risk-coverage curves, accuracy-at-coverage table) for ``plot_risk_coverage``:
    ``shown`` maps a model to the scores drawn for it."""
    curves, table = {}, {}
    for name, scores in shown.items():
        entry = models[name]
        errors = errors_of(labels, entry["probs"], entry.get("threshold"))
        values = uncertainty_scores(entry["probs"], entry.get("threshold"), entry.get("samples"))
        for score in scores:
            if score in values:
                label = f"{name}: {score}"
                curve = u.risk_coverage_curve(errors, values[score])
                curves[label] = (curve["coverage"], curve["risk"])
                table[label] = u.accuracy_at_coverage(errors, values[score], COVERAGES)
    return curves, table


def write_selective_csv(rows: list[dict], path: str | Path) -> Path:
    """``uncertainty.csv``: one row per (model, score), the columns of :func:`selective_rows`."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n", restval="")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (repr(float(v)) if isinstance(v, (float, np.floating)) else v) for k, v in row.items()})
    atomic_write_text(path, buffer.getvalue())
    return Path(path)


def format_selective_table(rows: list[dict], reference: str) -> str:
    """Markdown table: model, score, AURC (paired difference to the reference), error AUROC,
    accuracy at 100 / 80% coverage."""
    lines = [f"| model | uncertainty | AURC (minus {reference} msp [95% CI]) | error-detection AUROC | "
             "accuracy at 100% / 80% coverage |", "|---|---|---:|---:|---:|"]
    for r in rows:
        diff = ("" if "aurc_minus_ref" not in r else
                f" ({r['aurc_minus_ref']:+.3f} [{r['aurc_minus_ref_low']:+.3f}, {r['aurc_minus_ref_high']:+.3f}])")
        lines.append(f"| {r['model']} | {r['score']} | {r['aurc']:.3f}{diff} | {r['error_auroc']:.3f} | "
                     f"{r['acc@100']:.3f} / {r['acc@80']:.3f} |")
    return "\n".join(lines)
