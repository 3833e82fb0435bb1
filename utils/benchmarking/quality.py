"""The quality benchmark (``python -m utils.benchmark_quality``, whose docstring describes it):
one run per seed, the pooled analysis of their test predictions (``utils.benchmarking.pooled``),
``quality_<name>.md`` / ``.csv`` with the goals of the method, and the ablations pooled over
the same seeds (``utils.benchmarking.ablations``)."""
from __future__ import annotations

import csv
import io
import math
from dataclasses import replace
from pathlib import Path
from typing import Optional

import numpy as np

from utils.atomic import atomic_write_text
from utils.benchmarking.ablations import RETRAINED_KEYS, retrained_of, write_ablations
from utils.benchmarking.pooled import ENSEMBLE, analyse, pooled_curves, read_split
from utils.benchmarking.report import DCG_FUSED, OURS, RESNET, markdown_table
from utils.evaluation.metrics import RATIO_TIE
from utils.evaluation.protocol import format_pooled
from utils.evaluation.selective import COVERAGES
from utils.paths import REPO_ROOT, TIMINGS_JSON
from utils.training.profiles import TrainConfig, get_profile
from utils.training.readout import FIRST_REFER_SCORE, REFER_SCORE

ADRENAL = REPO_ROOT.parent / "shared" / "data" / "medmnist" / "adrenalmnist3d.npz"
GOALS = {"gain_over_dcg": 0.015, "adrenal_auc": 0.88, "coverage_gain": 0.03, "threshold_slack": 0.02}


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


def run_setup(run_dir: Path, data: str) -> tuple[TrainConfig, Optional[Path]]:
    """(config, data path) of a finished run folder: its saved ``train_config.json`` (the
    ``--set`` overrides it was trained with included, e.g. ``baselines=()``) and the data path
    of ``data``: ``adrenal`` or ``phantoms`` (the quality benchmark's) or the scan folder it
    ran on."""
    import json

    from utils.paths import TRAIN_CONFIG_JSON

    saved = json.loads((Path(run_dir) / TRAIN_CONFIG_JSON).read_text())
    data_dir = dataset_setup(data)[2] if data in ("adrenal", "phantoms") else Path(data)
    return TrainConfig.from_dict(saved), data_dir


def finished_run_parser(doc: str):
    """The command line of the scripts that read a finished run: RUN_DIR and DATA (``run_setup``)."""
    import argparse

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a finished run folder")
    parser.add_argument("data", help="adrenal, phantoms, or the scan folder it ran on")
    return parser


def open_finished_run(run_dir: Path, data: str):
    """(experiment, its finished DiffMIC-3D on the CPU) of a finished run folder (``run_setup``)."""
    from utils.experiment import prepare_experiment
    from utils.pipeline import load_main_model

    config, data_dir = run_setup(run_dir, data)
    exp = prepare_experiment(config, run_dir, data_dir, device="cpu", verbose=False)
    return exp, load_main_model(exp)


def read_predictions(run_dir: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(labels (N,), model -> probabilities (N, C)) from a run's ``predictions.csv``."""
    split = read_split(run_dir)
    return split.labels, {name: m.probs for name, m in split.models.items()}


# ------------------------------------------------------------------------------------------
# goals
# ------------------------------------------------------------------------------------------

def _ci(d: dict) -> str:
    return f"{d['diff']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"


def goals(name: str, result: dict) -> list[dict]:
    """The issue's goals for this dataset, each ``{"goal", "measured", "status"}`` (met / missed /
    not measured), from the pooled analysis."""
    out = []
    comparisons = {c["b"]: c for c in result["comparisons"]}
    adrenal = name.startswith("adrenal")

    def add(goal, measured, ok):
        out.append({"goal": goal, "measured": measured,
                    "status": "not measured" if ok is None else ("met" if ok else "missed")})

    primary = comparisons.get(DCG_FUSED)
    if primary is None:
        add(f"{OURS} above its DCG (fused)", "no run holds both models", None)
    else:
        h = primary["pooled"]["hierarchical"]
        need = GOALS["gain_over_dcg"] if adrenal else 0.0
        add(f"{OURS} minus its DCG (fused) >= {need:+.3f} test AUC, pooled 95% interval above 0",
            format_pooled(primary["pooled"]), h["diff"] >= need and h["ci_low"] > 0)
    if adrenal:
        ens = comparisons.get(ENSEMBLE)
        add(f"{OURS} above the matched DCG ensemble (folds + final)",
            "no ensemble in the runs" if ens is None else format_pooled(ens["pooled"]),
            None if ens is None else ens["pooled"]["hierarchical"]["diff"] > 0)
        aucs = list(result["auc"].get(OURS, {}).values())
        add(f"{OURS} mean test AUC >= {GOALS['adrenal_auc']}",
            f"{np.mean(aucs):.3f} ± {np.std(aucs, ddof=1) if len(aucs) > 1 else float('nan'):.3f} over {len(aucs)} seeds",
            bool(aucs) and float(np.mean(aucs)) >= GOALS["adrenal_auc"])
        res = comparisons.get(RESNET)
        add(f"{OURS} above the same-run {RESNET}, pooled interval above 0",
            "no ResNet-18 in the runs" if res is None else format_pooled(res["pooled"]),
            None if res is None else res["pooled"]["hierarchical"]["ci_low"] > 0)
    ours_u = next((c for c in result["uncertainty"] if c["model"] == OURS and c["score"] == REFER_SCORE), None)
    if ours_u is None:
        add(f"{OURS} AURC below the DCG's softmax confidence", "no uncertainty scores in the runs", None)
        add(f"{OURS} accuracy at 80% coverage >= at 100% + {GOALS['coverage_gain']}", "no uncertainty scores", None)
    else:
        # the referral score's goal, then the goal as first stated (the margin), kept beside it
        first = next((c for c in result["uncertainty"] if c["model"] == OURS and c["score"] == FIRST_REFER_SCORE), None)
        for c in (ours_u, first if FIRST_REFER_SCORE != REFER_SCORE else None):
            if c is not None:
                a, how = c["aurc"], "" if c is ours_u else ", as first stated"
                add(f"{OURS} AURC ({c['score']}{how}) below the DCG's softmax confidence (msp), paired pooled "
                    "interval below 0", f"{a['a']:.3f} vs {a['b']:.3f}: {_ci(a)}", a["ci_high"] < 0)
        acc = ours_u["accuracy_at"]
        add(f"{OURS} accuracy at 80% coverage >= at 100% + {GOALS['coverage_gain']}",
            f"{acc[0.8]:.3f} vs {acc[1.0]:.3f} ({acc[0.8] - acc[1.0]:+.3f})",
            acc[0.8] - acc[1.0] >= GOALS["coverage_gain"] - RATIO_TIE)
    dec = result["decisions"]
    if OURS in dec and DCG_FUSED in dec and not math.isnan(np.nanmean(dec[OURS]["threshold_loss"])):
        ours_loss, dcg_loss = np.mean(dec[OURS]["threshold_loss"]), np.mean(dec[DCG_FUSED]["threshold_loss"])
        add(f"{OURS}'s balanced-accuracy loss at its validation threshold (best any threshold reaches minus "
            f"reached) within {GOALS['threshold_slack']} of the DCG's at its own",
            f"{ours_loss:.3f} vs {dcg_loss:.3f} (balanced accuracy at the validation threshold "
            f"{np.mean(dec[OURS]['balanced_accuracy@val']):.3f} vs {np.mean(dec[DCG_FUSED]['balanced_accuracy@val']):.3f})",
            ours_loss - dcg_loss <= GOALS["threshold_slack"] + RATIO_TIE)
    else:
        add(f"{OURS} decision at its validation threshold", "binary thresholds not available", None)
    return out


# ------------------------------------------------------------------------------------------
# the report
# ------------------------------------------------------------------------------------------

def _mean_sd(values) -> str:
    v = np.asarray(list(values), dtype=float)
    sd = np.std(v, ddof=1) if v.size > 1 else float("nan")
    return f"{np.nanmean(v):.3f} ± {sd:.3f}"


def command(data: str, seeds: tuple[int, ...], overrides: Optional[dict] = None,
            ablations: Optional[str] = None) -> str:
    """The ``utils.benchmark_quality`` command line of a report (``ablations``: None or one of
    ``ABLATION_MODES``)."""
    sets = "".join(f" --set {k}={','.join(map(str, v)) if isinstance(v, (tuple, list)) else v}"
                   for k, v in (overrides or {}).items())
    return (f"python -m utils.benchmark_quality --data {data} --seeds {' '.join(map(str, seeds))}{sets}"
            + ("" if not ablations else " --ablations" if ablations == "all" else f" --ablations {ablations}"))


def render(name: str, data: str, seeds: tuple[int, ...], base: TrainConfig, n_test: int, result: dict,
           goal_rows: list[dict], overrides: Optional[dict] = None) -> str:
    """The markdown report of one dataset."""
    num_samples = base.model_config("cpu").diffusion.num_samples
    md = [f"## Quality on {name} ({n_test} test scans per seed, seeds {', '.join(map(str, seeds))})\n",
          f"Command: `{command(data, seeds, overrides)}`. Profile "
          f"`{base.profile}`, input {base.input_shape}, batch {base.batch_size}, epochs DCG / diffusion / baselines "
          f"{base.dcg_epochs} / {base.diffusion_epochs} / {base.baseline_epochs} (early stopping on validation, patience "
          f"{base.patience}), {base.oof_folds} out-of-fold DCGs, {num_samples} chains per scan spread over the prior "
          "members. Selection and thresholds on the validation split; the test split is scored once per seed.\n",
          "**Primary comparison, stated before the runs: DiffMIC-3D minus its DCG (fused prediction), test ROC-AUC, "
          "pooled over seeds and scans** (bootstrap over seeds and scans, a scan drawn once for all the seeds "
          "that scored it, 2000 resamples; DeLong on the seed-averaged "
          "predictions where every seed scored the same scans).\n"]
    return "\n".join(md) + "\n" + render_results(seeds, result, goal_rows)


def render_results(seeds: tuple[int, ...], result: dict, goal_rows: list[dict], split: str = "test") -> str:
    """The report's sections after its header: goals, ROC-AUC per seed, paired differences,
    decisions and uncertainty of the pooled ``result`` (``split``: what the scans are called)."""
    seed_cols = [f"seed {s}" for s in seeds]
    md = ["### Goals\n", markdown_table(["goal", "measured", "status"],
                                        [[g["goal"], g["measured"], f"**{g['status']}**"] for g in goal_rows]), "",
          f"### {split.capitalize()} ROC-AUC\n",
          markdown_table(["model", *seed_cols, "mean ± sd"],
                         [[m, *(f"{v[s]:.3f}" if s in v else "" for s in seeds), _mean_sd(v.values())]
                          for m, v in result["auc"].items()]), "",
          f"### Paired differences in {split} ROC-AUC (per seed: 95% stratified paired bootstrap; pooled: seeds and "
          "scans)\n",
          markdown_table(["comparison", *seed_cols, "pooled"],
                         [[f"{c['a']} − {c['b']}", *(_ci(c["per_seed"][s]) if s in c["per_seed"] else "" for s in seeds),
                           format_pooled(c["pooled"])] for c in result["comparisons"]]), "",
          "### Decisions (means over seeds; thresholds chosen on validation by Youden's J)\n",
          markdown_table(["model", "accuracy @0.5", "recall @0.5", "balanced acc. @0.5", "threshold",
                          "balanced acc. @val thr.", "recall @val thr.", "best balanced acc.", "loss", "ECE"],
                         [[m, *(f"{np.nanmean(d[k]):.3f}" for k in ("accuracy@0.5", "recall@0.5", "balanced_accuracy@0.5",
                                                                     "threshold", "balanced_accuracy@val", "recall@val",
                                                                     "best_balanced_accuracy", "threshold_loss", "ece"))]
                          for m, d in result["decisions"].items()]), "",
          f"### Uncertainty (errors at each model's validation threshold; paired with {DCG_FUSED}'s softmax "
          "confidence `msp`, pooled)\n",
          markdown_table(["model: score", "AURC", "minus reference [95% CI]", "error-detection AUROC",
                          *(f"acc. @{int(100 * c)}%" for c in COVERAGES)],
                         [[f"{c['model']}: {c['score']}", f"{c['aurc']['a']:.3f}", _ci(c["aurc"]),
                           f"{c['error_detection_auroc']['a']:.3f}",
                           *(f"{c['accuracy_at'][cov]:.3f}" for cov in COVERAGES)] for c in result["uncertainty"]]),
          ""]
    return "\n".join(md) + "\n"


def csv_rows(result: dict, goal_rows: list[dict]) -> str:
    """``table,item,metric,value,ci_low,ci_high``: per-seed AUCs, paired differences (per seed
    and pooled), the uncertainty comparisons and the goals (value 1 met, 0 missed, empty not measured)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["table", "item", "metric", "value", "ci_low", "ci_high"])
    for m, per_seed in result["auc"].items():
        w.writerows(("auc", m, f"seed {s}", v, "", "") for s, v in per_seed.items())
    for c in result["comparisons"]:
        item = f"{c['a']} - {c['b']}"
        w.writerows(("paired AUC difference", item, f"seed {s}", d["diff"], d["ci_low"], d["ci_high"])
                    for s, d in c["per_seed"].items())
        h = c["pooled"]["hierarchical"]
        w.writerow(("paired AUC difference", item, "pooled", h["diff"], h["ci_low"], h["ci_high"]))
    for c in result["uncertainty"]:
        a = c["aurc"]
        w.writerow(("AURC minus reference", f"{c['model']}: {c['score']}", "pooled", a["diff"], a["ci_low"], a["ci_high"]))
    for g in goal_rows:
        w.writerow(("goal", g["goal"], g["measured"], {"met": 1, "missed": 0}.get(g["status"], ""), "", ""))
    return buf.getvalue()


def write_pooled_figure(runs: dict, result: dict, path: Path, name: str) -> Path:
    """Risk-coverage curves averaged over the seeds and accuracy at 100/90/80/70% coverage
    (means over seeds) of the main uncertainty scores (``pooled.SHOWN``), PNG and PDF."""
    from utils.evaluation.visualization import plot_risk_coverage, save_figure

    curves = pooled_curves(runs)
    table = {f"{c['model']}: {c['score']}": c["accuracy_at"] for c in result["uncertainty"]
             if f"{c['model']}: {c['score']}" in curves}
    seeds = len(runs)
    figure = plot_risk_coverage(curves, table, title=f"{name}: risk-coverage, mean of {seeds} seeds (test; errors at "
                                                     "each model's validation threshold)")
    return save_figure(figure, path)


ABLATION_MODES = ("all", "inference", *RETRAINED_KEYS)  # utils.benchmarking.ablations.retrained_of


def finished(run_dir: Path, config: TrainConfig) -> bool:
    """Whether ``run_dir`` holds a finished run of ``config`` (its timings are written last): then
    the benchmark reads its predictions instead of scoring the test split again."""
    from utils.experiment import check_output_dir

    if not (run_dir / TIMINGS_JSON).is_file():
        return False
    check_output_dir(run_dir, config)  # another configuration: refused with the differences
    return True


def run_quality(data: str, seeds: tuple[int, ...], output_dir: Path, overrides: Optional[dict] = None,
                ablations: Optional[str] = None, device: Optional[str] = None) -> Path:
    """Run the seeds (a finished run is read, not rerun) and, with ``ablations`` ("all", or
    "inference" for the inference-only variants alone), the ablations on every seed; write
    ``quality_<name>.md`` / ``.csv``; returns the .md path."""
    from utils.run import run_experiment

    if ablations is not None:
        retrained_of(ablations)  # a bad mode fails here, before any seed is trained

    name, base, data_dir = dataset_setup(data)
    base = replace(base, **(overrides or {}))
    runs_dir = output_dir / "benchmark_runs"
    runs = {}
    for seed in seeds:
        run_dir = runs_dir / f"quality_{name}_seed{seed}"
        if not finished(run_dir, replace(base, seed=seed)):
            run_experiment(replace(base, seed=seed), run_dir, data_dir, device=device)
        runs[seed] = read_split(run_dir)
    result = analyse(runs, base.n_resamples)
    goal_rows = goals(name, result)
    n_test = len(next(iter(runs.values())).labels)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / f"quality_{name}.md"
    atomic_write_text(path, render(name, data, seeds, base, n_test, result, goal_rows, overrides))
    atomic_write_text(path.with_suffix(".csv"), csv_rows(result, goal_rows))
    write_pooled_figure(runs, result, output_dir / f"risk_coverage_{name}.png", name)
    if ablations is not None:
        write_ablations(base, seeds, name, data, runs_dir, data_dir, output_dir, device, ablations)
    return path
