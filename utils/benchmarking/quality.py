"""The quality benchmark (``python -m utils.benchmark_quality``, whose docstring describes it):
one run per seed, its test predictions compared pairwise, ``quality_<name>.md`` / ``.csv``, and
the seed-0 ablation table."""
from __future__ import annotations

import csv
import io
from dataclasses import replace
from pathlib import Path
from typing import Optional

import numpy as np

from utils.atomic import atomic_write_text
from utils.benchmarking.ablations import ablations
from utils.benchmarking.report import OURS
from utils.evaluation.metrics import classification_metrics
from utils.evaluation.paired import paired_auc_difference, seed_summary
from utils.paths import REPO_ROOT
from utils.training.profiles import TrainConfig, get_profile

ADRENAL = REPO_ROOT.parent / "shared" / "data" / "medmnist" / "adrenalmnist3d.npz"


def dataset_setup(data: str) -> tuple[str, TrainConfig, Optional[Path]]:
    """(name, base config, data path or None for phantoms) of a ``--data`` value."""
    if data == "smoke":
        return "smoke", get_profile("smoke", progress=False), None
    if data == "phantoms":
        return "phantoms300", get_profile("demo", n_phantoms=300, phantom_size=128, phantom_dir="data/phantoms_300",
                                          baselines=("resnet18",), progress=False), None
    path = ADRENAL if data == "adrenal" else Path(data)
    name = path.stem
    return name, get_profile("demo", input_shape=(32, 32, 32), target_spacing=None, batch_size=16, dcg_epochs=10,
                             diffusion_epochs=8, baseline_epochs=10, patience=5, baselines=("resnet18",),
                             progress=False), path


# ------------------------------------------------------------------------------------------
# reading a finished run
# ------------------------------------------------------------------------------------------

def read_predictions(run_dir: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(labels (N,), model -> probabilities (N, C)) from a run's ``predictions.csv``."""
    with open(run_dir / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    prob_cols = [c for c in rows[0] if c.startswith("prob_")]
    models: dict[str, list] = {}
    labels: dict[str, list] = {}
    for row in rows:
        models.setdefault(row["model"], []).append([float(row[c]) for c in prob_cols])
        labels.setdefault(row["model"], []).append(int(row["label"]))
    first = next(iter(labels.values()))
    if any(v != first for v in labels.values()):
        raise ValueError(f"{run_dir}/predictions.csv: the models were not scored on the same scans in the same order")
    return np.asarray(first), {name: np.asarray(p) for name, p in models.items()}


def compare(labels: np.ndarray, probs: dict[str, np.ndarray], seed: int, n_resamples: int = 2000) -> dict:
    """Per model: AUC; per comparison ``OURS - other``: the paired difference with its CI."""
    out = {"auc": {m: classification_metrics(labels, p)["roc_auc"] for m, p in probs.items()}, "diff": {}}
    for other in probs:
        if other != OURS:
            out["diff"][other] = paired_auc_difference(labels, probs[OURS], probs[other], n_resamples, seed)
    return out


# ------------------------------------------------------------------------------------------
# reports
# ------------------------------------------------------------------------------------------

def _ci(d: Optional[dict]) -> str:
    return "" if d is None else f"{d['diff']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"


def run_quality(data: str, seeds: tuple[int, ...], output_dir: Path, overrides: Optional[dict] = None,
                with_ablations: bool = False, device: Optional[str] = None) -> Path:
    """Run the seeds (and ablations), write ``quality_<name>.md`` / ``.csv``; returns the .md path."""
    from utils.run import run_experiment

    name, base, data_dir = dataset_setup(data)
    base = replace(base, **(overrides or {}))
    runs = output_dir / "benchmark_runs"
    per_seed = {}
    for seed in seeds:
        run_dir = runs / f"quality_{name}_seed{seed}"
        run_experiment(replace(base, seed=seed), run_dir, data_dir, device=device)
        labels, probs = read_predictions(run_dir)
        per_seed[seed] = (len(labels), compare(labels, probs, seed, base.n_resamples))

    models = list(per_seed[seeds[0]][1]["auc"])
    csv_rows = []
    auc_table = []
    for m in models:
        values = [per_seed[s][1]["auc"][m] for s in seeds]
        mean, sd = seed_summary(values)
        auc_table.append(f"| {m} | " + " | ".join(f"{v:.3f}" for v in values) + f" | {mean:.3f} ± {sd:.3f} |")
        csv_rows += [("auc", m, f"seed {s}", v, "", "") for s, v in zip(seeds, values)]
    diff_table = []
    for other in [m for m in models if m != OURS]:
        ds = [per_seed[s][1]["diff"][other] for s in seeds]
        mean, sd = seed_summary([d["diff"] for d in ds])
        wins = sum(d["ci_low"] > 0 for d in ds)
        losses = sum(d["ci_high"] < 0 for d in ds)
        diff_table.append(f"| {OURS} − {other} | " + " | ".join(_ci(d) for d in ds)
                          + f" | {mean:+.3f} ± {sd:.3f} | {wins} / {losses} |")
        csv_rows += [("paired AUC difference", f"{OURS} - {other}", f"seed {s}", d["diff"], d["ci_low"], d["ci_high"])
                     for s, d in zip(seeds, ds)]
    n_test = per_seed[seeds[0]][0]
    seed_cols = " | ".join(f"seed {s}" for s in seeds)
    num_samples = base.model_config("cpu").diffusion.num_samples
    md = [f"## Quality on {name} ({n_test} test scans per seed, seeds {', '.join(map(str, seeds))})\n",
          f"Command: `python -m utils.benchmark_quality --data {data} --seeds {' '.join(map(str, seeds))}"
          + (" --ablations" if with_ablations else "") + f"`. Profile `{base.profile}` with "
          f"input {base.input_shape}, batch {base.batch_size}, epochs DCG / diffusion / baselines "
          f"{base.dcg_epochs} / {base.diffusion_epochs} / {base.baseline_epochs} (early stopping on validation, "
          f"patience {base.patience}), {base.oof_folds} out-of-fold DCGs, {num_samples} samples per scan. "
          "Selection on the validation split; the test split is scored once per seed.\n",
          "### Test ROC-AUC\n", f"| model | {seed_cols} | mean ± sd |", "|---|" + "---:|" * (len(seeds) + 1),
          *auc_table, "",
          "### Paired differences (same test scans; 95% stratified paired bootstrap, 2000 resamples)\n",
          f"| comparison | {seed_cols} | mean ± sd | seeds with CI > 0 / < 0 |",
          "|---|" + "---:|" * (len(seeds) + 2), *diff_table, ""]
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / f"quality_{name}.md"
    atomic_write_text(path, "\n".join(md) + "\n")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["table", "item", "metric", "value", "ci_low", "ci_high"])
    writer.writerows(csv_rows)
    atomic_write_text(path.with_suffix(".csv"), buf.getvalue())
    if with_ablations:
        write_ablations(base, seeds[0], name, data, runs, data_dir, output_dir)
    return path


def write_ablations(base: TrainConfig, seed: int, name: str, data: str, runs: Path, data_dir: Optional[Path],
                    output_dir: Path) -> Path:
    """Run the ablations on the finished ``seed`` run and write ``quality_<name>_ablations.md``."""
    run_dir = runs / f"quality_{name}_seed{seed}"
    labels, probs = read_predictions(run_dir)
    rows = ablations(replace(base, seed=seed), run_dir, data_dir, runs / f"ablations_{name}", labels, probs)
    md = [f"### Ablations on {name} (seed {seed}; each variant trained once, tested once)\n",
          f"Command: `python -m utils.benchmark_quality --data {data} --seeds {seed} --ablations`. Phase-2 variants "
          "reuse the seed's DCG and its out-of-fold priors; phase-1 variants retrain the DCG and report its fused "
          "prediction. Differences are paired on the same test scans (95% stratified bootstrap).\n",
          "| group | variant | val AUC | test AUC | minus full method [95% CI] | minus DCG fused [95% CI] |",
          "|---|---|---:|---:|---:|---:|"]
    md += [f"| {r['group']} | {r['variant']} | {r['val_auc']:.3f} | {r['test_auc']:.3f} | {_ci(r['vs_full'])} | "
           f"{_ci(r['vs_dcg'])} |" for r in rows]
    path = output_dir / f"quality_{name}_ablations.md"
    atomic_write_text(path, "\n".join(md) + "\n")
    return path
