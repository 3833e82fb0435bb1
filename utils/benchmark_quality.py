"""Quality benchmark: DiffMIC-3D against its own DCG and the 3D CNN baselines, paired, over seeds.

    python -m utils.benchmark_quality --data adrenal --seeds 0 1 2 [--ablations] [--set key=value ...]
    python -m utils.benchmark_quality --data phantoms --seeds 0 1 2

Datasets (``--data``):
    adrenal   AdrenalMNIST3D (MedMNIST v2; real CT-derived, 1,188 / 98 / 298 official split),
              from ``../shared/data/medmnist/adrenalmnist3d.npz`` beside the repository, at
              32^3 (``--data`` may also be the path of any MedMNIST 3D ``.npz``);
    phantoms  300 embedded chest-CT phantoms at 128 in-plane, input 64x64x32 (60 test scans per
              seed, so that a 0.1 AUC difference is resolvable), each seed its own split.
    smoke     the CI size (12 phantoms), to check the code path only.

Per seed the whole experiment runs (``utils.run.run_experiment``, resumable: a finished run is
only loaded) and its test predictions, made ONCE per configuration, are compared pairwise on
the same scans: ROC-AUC of DiffMIC-3D minus that of the DCG it is conditioned on (its fused
prediction, and its global prior alone) and minus each baseline, with a 95% stratified paired
bootstrap interval (``utils.evaluation.metrics.paired_auc_difference``). ``--ablations`` (seed 0 only)
retrains phase 2 with one design element reverted at a time, and phase 1 without the DCG
curriculum or the foreground ROI restriction, each evaluated once on the test split.

Writes ``OUTPUT_DIR/quality_<data>.md`` and ``.csv`` (``table,item,metric,value,ci_low,ci_high``).
"""
from __future__ import annotations

import csv
import io
import sys
from dataclasses import replace
from pathlib import Path
from typing import Optional

import numpy as np

from utils.cli import make_parser
from utils.log import get_logger
from utils.atomic import atomic_write_text
from utils.evaluation.metrics import classification_metrics, paired_auc_difference, seed_summary
from utils.paths import REPO_ROOT
from utils.training.profiles import TrainConfig, get_profile, parse_overrides

OURS, DCG_FUSED, DCG_GLOBAL = "DiffMIC-3D", "DCG without diffusion", "DCG global prior only"
ADRENAL = REPO_ROOT.parent / "shared" / "data" / "medmnist" / "adrenalmnist3d.npz"

log = get_logger(__name__)


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
# ablations (seed 0)
# ------------------------------------------------------------------------------------------

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


def ablations(config: TrainConfig, run_dir: Path, data_dir: Optional[Path], out: Path) -> list[dict]:
    """Rows ``{group, variant, val_auc, test_auc, diff vs full, diff vs DCG}`` (module docstring)."""
    from models.diffmic3d import DiffMIC3D
    from utils.training.diffusion import calibrate_temperature, predict_dataset, train_diffusion
    from utils.pipeline import (build_model, cache_split_guidance, out_of_fold_guidance, prepare_experiment,
                                reseed_stage, train_phase1)
    from utils.training.dcg import cache_guidance, train_dcg

    exp = prepare_experiment(config, run_dir, data_dir, verbose=False)
    device, test, val = exp.device, exp.datasets["test"], exp.datasets["val"]
    model = build_model(exp)
    train_phase1(exp, model)  # finished: only loads
    guidance = cache_split_guidance(exp, model, ("train", "val", "test"))
    oof = out_of_fold_guidance(exp, model) if config.oof_folds >= 2 else guidance["train"]
    labels, probs = read_predictions(run_dir)
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
        reseed_stage(variant, stage)
        return variant, DiffMIC3D(variant.model_config(device, exp.num_classes)).to(device), folder

    for name, (changes, overrides) in PHASE2_ABLATIONS.items():
        variant, net, folder = variant_model(changes, overrides, "diffusion")
        net.dcg.load_state_dict(model.dcg.state_dict())
        train_g = guidance["train"] if variant.oof_folds < 2 else oof
        result = train_diffusion(net, exp.datasets["train"], train_g, val, guidance["val"], variant, device,
                                 folder / "diffusion.pth", exp.meta)
        calibrate_temperature(net, val, guidance["val"], variant, device)
        p = predict_dataset(net, test, guidance["test"], device, variant.batch_size, variant.seed,
                            variant.num_samples, variant.ddim_steps)["probs"].numpy()
        rows.append(row("phase 2", name, result.best["val_auc"], p))
        log.info(f"[ablation] {name}: test AUC {rows[-1]['test_auc']:.3f}")

    from utils.training.checkpoint import load_checkpoint
    saved = load_checkpoint(exp.main_checkpoint)
    full = DiffMIC3D.from_config_dict(saved["model_config"]).to(device)
    full.load_state_dict(saved["model_state_dict"])
    full.eval()
    for samples in (1, 5):
        p = predict_dataset(full, test, guidance["test"], device, config.batch_size, config.seed, samples,
                            config.ddim_steps)["probs"].numpy()
        rows.append(row("readout", f"{samples} sample(s) instead of {config.num_samples}", float("nan"), p))

    for name, (changes, overrides) in PHASE1_ABLATIONS.items():
        variant, net, folder = variant_model(changes, overrides, "dcg")
        result = train_dcg(net, exp.datasets["train"], val, variant, device, folder / "dcg.pth", exp.meta)
        net.freeze_dcg()
        g = cache_guidance(net, test, device, variant.batch_size, progress=False)
        p = g["fused_probs"].numpy()
        rows.append(row("phase 1 (DCG fused prediction)", name, result.best["val_auc"], p, vs_full=False))
        log.info(f"[ablation] {name}: DCG test AUC {rows[-1]['test_auc']:.3f}")
    return rows


# ------------------------------------------------------------------------------------------
# report
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
    md = [f"## Quality on {name} ({n_test} test scans per seed, seeds {', '.join(map(str, seeds))})\n",
          f"Command: `python -m utils.benchmark_quality --data {data} --seeds {' '.join(map(str, seeds))}"
          + (" --ablations" if with_ablations else "") + f"`. Profile `{base.profile}` with "
          f"input {base.input_shape}, batch {base.batch_size}, epochs DCG / diffusion / baselines "
          f"{base.dcg_epochs} / {base.diffusion_epochs} / {base.baseline_epochs} (early stopping on validation, "
          f"patience {base.patience}), {base.oof_folds} out-of-fold DCGs, {base.num_samples} samples per scan. "
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
    rows = ablations(replace(base, seed=seed), runs / f"quality_{name}_seed{seed}", data_dir, runs / f"ablations_{name}")
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


def main(argv: Optional[list[str]] = None) -> int:
    parser = make_parser("utils.benchmark_quality", __doc__)
    parser.add_argument("--data", default="adrenal", help="adrenal, phantoms, smoke or the path of a MedMNIST .npz")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one run per seed")
    parser.add_argument("--ablations", action="store_true", help="also the seed-0 ablation table")
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "outputs" / "benchmark", help="report folder")
    parser.add_argument("--device", default=None, help="cpu, cuda or auto (default: $MEDISCOPE_DEVICE, else auto)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="TrainConfig overrides (default: none; keys as in python -m utils.run --help)")
    args = parser.parse_args(argv)
    path = run_quality(args.data, tuple(args.seeds), args.output_dir, parse_overrides(args.set), args.ablations,
                       args.device)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
