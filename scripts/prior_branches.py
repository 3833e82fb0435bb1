"""Which of its DCG's priors does the diffusion stage start from? Measured on the training folds.

    python scripts/prior_branches.py RUNS_DIR DATA [--seeds S ...] [--out DIR]

RUNS_DIR holds finished runs of the quality benchmark (``quality_<data>_seed<s>``), DATA is
``adrenal``, ``phantoms`` or the scan folder they ran on (``utils.benchmarking.quality.run_setup``).

Why: where phase 2's correction is switched off, the model returns the grid mean of its dense
guidance map M = (1 - d) p_g + d p_l (``models.prior_generator``), which weighs the local prior by
the grid mean of the normalised distance d (the design's blend: 0.63 at Np = 8; the fitted blend,
the default since, by the weight it fitted), where the DCG's own fused prediction weighs it 1/2.
Every training scan is read by the out-of-fold DCG that did not train on it (the folds of
``utils.pipeline.out_of_fold_guidance``, as phase 2 and ``crossfit_correction.py`` read them), and
each of the DCG's branches is scored by its within-fold AUC (the mean over the folds: each fold is
one network's outputs): the global prior p_g, the local prior p_l, the fused
prediction (p_g + p_l) / 2 and M's grid mean, computed by the run's own prior generator; and a
blend of the two priors whose weight is fitted without the fold it is scored on (what a fitted
guidance map could start from). The test split is not read.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.prior_generator import BLEND_WEIGHTS  # noqa: E402  (the candidate w of PriorConfig.blend='fitted')
from scripts.crossfit_correction import auc, fold_rows, seed_runs, write_report  # noqa: E402

BRANCHES = ("global prior", "local prior", "fused (DCG)", "guidance-map grid mean")


def branch_probs(run_dir: Path, data: str) -> dict[str, np.ndarray]:
    """One finished run's training split: ``labels`` (N,), ``fold`` (N,) and, per branch of
    ``BRANCHES``, the (N, C) class probabilities of the out-of-fold DCG that did not train on the scan."""
    import torch

    from utils.benchmarking.quality import open_finished_run
    from utils.pipeline import out_of_fold_guidance

    with tempfile.TemporaryDirectory() as tmp:  # the run folder is only read
        exp, model = open_finished_run(Path(shutil.copytree(run_dir, Path(tmp) / run_dir.name)), data)
        oof = out_of_fold_guidance(exp, model)  # finished: loads the fold DCGs; rows in train_plain order
        labels = np.asarray(exp.datasets["train_plain"].labels)
        with torch.no_grad():
            guidance_map = model.priors(oof.to(exp.device)).guidance_map  # (N, C, Np, Np, Np)
        fold = np.zeros(len(labels), dtype=int)
        for k, held in enumerate(fold_rows(labels, exp.config.oof_folds, exp.config.seed)):
            fold[held] = k
    probs = (oof.global_probs, oof.local_probs, oof.fused_probs, guidance_map.float().mean(dim=(2, 3, 4)))
    return {"labels": labels, "fold": fold, **{name: p.cpu().numpy() for name, p in zip(BRANCHES, probs)}}


def within_fold_auc(labels, fold, probs) -> float:
    """Mean over the folds of the AUC on that fold's scans (NaN where a fold has one class)."""
    return float(np.mean([auc(labels[fold == k], probs[fold == k]) for k in np.unique(fold)]))


def held_out_blend(labels, fold, global_probs, local_probs) -> tuple[float, list[float]]:
    """A blend (1 - w) p_g + w p_l fitted without each fold and scored on it: for fold k, w (of
    ``BLEND_WEIGHTS``) maximises the mean within-fold AUC of the other folds; returns the mean over
    the folds of fold k's AUC at its w, and the w of each fold."""
    folds = np.unique(fold)
    blends = {w: (1 - w) * global_probs + w * local_probs for w in BLEND_WEIGHTS}
    per_fold = {(w, k): auc(labels[fold == k], p[fold == k]) for w, p in blends.items() for k in folds}
    chosen = [max(BLEND_WEIGHTS, key=lambda w: np.mean([per_fold[w, j] for j in folds if j != k])) for k in folds]
    return float(np.mean([per_fold[w, k] for w, k in zip(chosen, folds)])), [float(w) for w in chosen]


def report(by_seed: dict[int, dict]) -> str:
    """Markdown: per seed and branch the within-fold AUC, the held-out fitted blend
    (``held_out_blend``) with its weights, and the mean over the seeds."""
    head = ["| seed | scans | " + " | ".join(BRANCHES) + " | fitted blend (held out) | its local weight per fold |",
            "|---:|---:|" + "---:|" * (len(BRANCHES) + 1) + "---|"]
    rows, lines = [], []
    for s, r in sorted(by_seed.items()):
        blend, weights = held_out_blend(r["labels"], r["fold"], r["global prior"], r["local prior"])
        rows.append([within_fold_auc(r["labels"], r["fold"], r[b]) for b in BRANCHES] + [blend])
        lines.append(f"| {s} | {len(r['labels'])} | " + " | ".join(f"{v:.4f}" for v in rows[-1]) + " | "
                     + " / ".join(f"{w:.2f}" for w in weights) + " |")
    mean = np.mean(rows, axis=0)
    lines.append("| mean | | " + " | ".join(f"{v:.4f}" for v in mean) + " | |")
    return "\n".join(head + lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs_dir", type=Path, help="folder of finished runs, one per seed")
    parser.add_argument("data", help="adrenal, phantoms, or the scan folder the runs ran on")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="default: every finished run")
    parser.add_argument("--out", type=Path, default=None, help="report folder (default: RUNS_DIR/crossfit)")
    args = parser.parse_args(argv)
    runs = seed_runs(args.runs_dir, args.seeds, args.data)
    text = report({s: branch_probs(path, args.data) for s, path in runs.items()})
    write_report((args.out or args.runs_dir / "crossfit") / "prior_branches.md", "prior_branches.py", argv, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
