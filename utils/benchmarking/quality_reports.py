"""Suite section 1: the reports of ``utils.benchmark_quality`` read back and included, the
quality targets read from their CSVs, and a histogram + logistic-regression baseline."""
from __future__ import annotations

import csv
import datetime as dt
from pathlib import Path
from typing import Optional

import numpy as np

from utils.benchmarking.report import DCG_FUSED, OURS, RESNET, TARGETS, Report
from utils.paths import REPO_ROOT, display_path

QUALITY_DIR = REPO_ROOT / "outputs" / "benchmark"
# report stem -> the command of utils.benchmark_quality that writes it
QUALITY_REPORTS = {
    "quality_phantoms300": "python -m utils.benchmark_quality --data phantoms --seeds 0 1 2",
    "quality_adrenalmnist3d": "python -m utils.benchmark_quality --data adrenal --seeds 0 1 2",
    "quality_adrenalmnist3d_ablations": "python -m utils.benchmark_quality --data adrenal --seeds 0 --ablations",
}


def read_quality_csv(path: Path) -> dict:
    """``{'auc': {model: {seed: value}}, 'diff': {other: {seed: (diff, ci_low, ci_high)}}}`` of a
    ``quality_<name>.csv`` written by ``utils.benchmark_quality`` (``OURS - other`` differences)."""
    out: dict = {"auc": {}, "diff": {}}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            seed = int(row["metric"].split()[-1])
            if row["table"] == "auc":
                out["auc"].setdefault(row["item"], {})[seed] = float(row["value"])
            elif row["table"] == "paired AUC difference":
                other = row["item"].split(" - ", 1)[1]
                out["diff"].setdefault(other, {})[seed] = (float(row["value"]), float(row["ci_low"]),
                                                           float(row["ci_high"]))
    return out


def _seeds_text(per_seed: dict) -> str:
    return ", ".join(f"seed {s} {v:.3f}" for s, v in sorted(per_seed.items()))


def auc_target(report: Report, name: str, data: Optional[dict], source: str, threshold: float) -> str:
    """Met iff the mean test AUC of DiffMIC-3D over the report's seeds is >= ``threshold``."""
    if data is None:
        return report.target(name, "not measured", f"{source} absent (run `{_command_of(source)}`)")
    per_seed = data["auc"].get(OURS)
    if not per_seed:
        return report.target(name, "not measured", f"no `auc,{OURS}` rows in {source}")
    mean = float(np.mean(list(per_seed.values())))
    return report.check(name, mean, mean >= threshold,
                        f"mean {mean:.3f} over {len(per_seed)} seeds ({_seeds_text(per_seed)})")


def paired_target(report: Report, name: str, data: Optional[dict], source: str, other: str) -> str:
    """Met iff the mean over seeds of the paired test-AUC difference ``OURS - other`` is > 0;
    quotes each seed's 95% paired CI and how many seeds' CIs exclude 0."""
    if data is None:
        return report.target(name, "not measured", f"{source} absent (run `{_command_of(source)}`)")
    per_seed = data["diff"].get(other)
    if not per_seed:
        return report.target(name, "not measured", f"no `{OURS} - {other}` rows in {source}")
    diffs = [d for d, _, _ in per_seed.values()]
    mean = float(np.mean(diffs))
    above = sum(lo > 0 for _, lo, _ in per_seed.values())
    below = sum(hi < 0 for _, _, hi in per_seed.values())
    cis = "; ".join(f"seed {s} {d:+.3f} [{lo:+.3f}, {hi:+.3f}]" for s, (d, lo, hi) in sorted(per_seed.items()))
    return report.check(name, mean, mean > 0,
                        f"mean paired AUC difference {mean:+.3f} over {len(per_seed)} seeds ({cis}); "
                        f"CI excludes 0 in {above} seed(s) above, {below} below")


def _command_of(source: str) -> str:
    return QUALITY_REPORTS.get(Path(source).stem, "python -m utils.benchmark_quality")


def _demote(markdown: str) -> str:
    """Headings one level down, so an included report nests under section 1."""
    return "\n".join("#" + line if line.startswith("#") else line for line in markdown.splitlines())


def _quality_rows(report: Report, name: str, data: dict) -> None:
    for model, per_seed in data["auc"].items():
        for seed, value in sorted(per_seed.items()):
            report.add("quality", f"{name}: {model}", f"test ROC-AUC seed {seed}", value)
    for other, per_seed in data["diff"].items():
        for seed, (d, lo, hi) in sorted(per_seed.items()):
            report.add("quality", f"{name}: {OURS} - {other}", f"paired AUC difference seed {seed}", d,
                       unit=f"CI [{lo:.3f}, {hi:.3f}]")


def quality(report: Report, quality_dir: Path, quick: bool, output_dir: Path, device: Optional[str]) -> Optional[Path]:
    """Section 1 and the quality targets; returns the seed-0 smoke run folder with ``quick``."""
    from utils.data.discovery import discover_scans, find_dataset_root
    from utils.histogram_baseline import histogram_baseline_accuracy
    from utils.training.profiles import get_profile

    quality_dir = Path(quality_dir)
    parts = [f"## 1. Quality\n\nThe quality benchmark is `utils.benchmark_quality` (DiffMIC-3D against its own DCG "
             "and the 3D CNN baselines on the same test scans, paired 95% bootstrap intervals, over seeds); its "
             f"reports in `{display_path(quality_dir)}/` are included below as written (each states its own command)."]
    loaded: dict[str, Optional[dict]] = {}
    for stem, command in QUALITY_REPORTS.items():
        md, table = quality_dir / f"{stem}.md", quality_dir / f"{stem}.csv"
        if md.is_file():
            when = dt.datetime.fromtimestamp(md.stat().st_mtime, dt.timezone.utc)
            parts.append(f"### `{display_path(md)}` (written {when:%Y-%m-%d %H:%M} UTC by `{command}`)\n\n"
                         + _demote(md.read_text().strip()))
        else:
            parts.append(f"### `{display_path(md)}`: not present\n\nNot measured: run `{command}` to write it.")
        loaded[stem] = read_quality_csv(table) if table.is_file() else None
        if loaded[stem] is not None:
            _quality_rows(report, stem.removeprefix("quality_"), loaded[stem])

    adrenal, phantoms = "quality_adrenalmnist3d", "quality_phantoms300"
    src = {k: display_path(quality_dir / f"{k}.csv") for k in (adrenal, phantoms)}
    auc_target(report, f"AdrenalMNIST3D: {OURS} test AUC >= {TARGETS['adrenal_auc']} (mean over seeds)",
               loaded[adrenal], src[adrenal], TARGETS["adrenal_auc"])
    paired_target(report, f"AdrenalMNIST3D: {OURS} >= the same-run {RESNET} (paired test AUC)",
                  loaded[adrenal], src[adrenal], RESNET)
    paired_target(report, f"phantoms (300): {OURS} above its own DCG (fused prediction)",
                  loaded[phantoms], src[phantoms], DCG_FUSED)
    paired_target(report, f"phantoms (300): {OURS} above the same-run {RESNET}",
                  loaded[phantoms], src[phantoms], RESNET)

    run0 = None
    if quick:  # exercise the quality benchmark's code path at smoke size (CI)
        from utils.benchmarking.quality import run_quality
        smoke_dir = output_dir / "quality"
        md = run_quality("smoke", (0, 1), smoke_dir, device=device)
        smoke = read_quality_csv(md.with_suffix(".csv"))
        _quality_rows(report, "smoke", smoke)
        parts.append(f"### `--quick`: `run_quality('smoke', (0, 1), {display_path(smoke_dir)})` (12 phantoms; code "
                     "path only)\n\n" + _demote(md.read_text().strip()))
        src_smoke = display_path(md.with_suffix(".csv"))
        paired_target(report, f"[--quick code path, not a target] smoke: {OURS} above its DCG (fused)",
                      smoke, src_smoke, DCG_FUSED)
        paired_target(report, f"[--quick code path, not a target] smoke: {OURS} above {RESNET}",
                      smoke, src_smoke, RESNET)
        run0 = smoke_dir / "benchmark_runs" / "quality_smoke_seed0"

    # histogram + logistic regression on the phantoms (global intensity statistics only)
    if quick:
        phantom_dir = REPO_ROOT / get_profile("smoke").phantom_dir
    else:
        phantom_dir = REPO_ROOT / "data" / "phantoms_300"
        if not phantom_dir.is_dir():
            phantom_dir = REPO_ROOT / get_profile("demo").phantom_dir
    root, _ = find_dataset_root(phantom_dir)
    records = discover_scans(root)
    hist_mean, hist_std = histogram_baseline_accuracy([r.path for r in records], [r.label for r in records])
    report.add("quality", "histogram + logistic regression", "accuracy 5-fold CV", hist_mean, hist_std)
    parts.append(f"### Histogram + logistic regression\n\n32 HU bins, 5-fold CV on all {len(records)} scans of "
                 f"`{display_path(root)}`: accuracy {hist_mean:.3f} ± {hist_std:.3f}"
                 + (": global intensity statistics do not separate the classes." if hist_mean <= 0.7
                    else ": above 0.7, global intensity statistics separate the classes."))
    report.text("\n\n".join(parts))
    return run0
