"""Suite section 1: the reports of ``utils.benchmark_quality`` read back and included, the
quality targets read from their CSVs, and a histogram + logistic-regression baseline."""
from __future__ import annotations

import csv
import datetime as dt
import json
from pathlib import Path
from typing import Optional

from utils.benchmarking.report import OURS, Report
from utils.paths import REPO_ROOT, display_path

QUALITY_DIR = REPO_ROOT / "outputs" / "benchmark"
SEEDS = "0 1 2 3 4"
# report stem -> the command of utils.benchmark_quality that wrote it (``--ablations`` alone: every variant)
QUALITY_REPORTS = {
    "quality_adrenalmnist3d": f"python -m utils.benchmark_quality --data adrenal --seeds {SEEDS}",
    "quality_adrenalmnist3d_ablations": f"python -m utils.benchmark_quality --data adrenal --seeds {SEEDS} "
                                        "--ablations distance-blend",
    "quality_phantoms300": f"python -m utils.benchmark_quality --data phantoms --seeds {SEEDS}",
    "quality_phantoms300_ablations": f"python -m utils.benchmark_quality --data phantoms --seeds {SEEDS} "
                                     "--ablations inference",
    "quality_phantoms300_external_phantoms_seed1_2000": "python scripts/external_test.py outputs/benchmark/benchmark_runs "
                                                        "phantoms data/phantoms_seed1_2000 --phantoms 2000 "
                                                        "--phantom-seed 1 --ablations",
    "quality_phantoms300_external_phantoms_seed2_2000": "python scripts/external_test.py outputs/benchmark/benchmark_runs "
                                                        "phantoms data/phantoms_seed2_2000 --phantoms 2000 "
                                                        "--phantom-seed 2",
}
DATASET_NAMES = {"quality_adrenalmnist3d": "AdrenalMNIST3D", "quality_phantoms300": "phantoms (300)",
                 "quality_phantoms300_external_phantoms_seed1_2000": "phantoms, 2,000 new scans",
                 "quality_phantoms300_external_phantoms_seed2_2000": "phantoms, 2,000 fresh scans (the referral rule's test)"}


def read_quality_csv(path: Path) -> dict:
    """``{'auc': {model: {seed: value}}, 'diff': {other: {seed or 'pooled': (diff, ci_low, ci_high)}},
    'goals': [{'goal', 'measured', 'status'}]}`` of a ``quality_<name>.csv`` written by
    ``utils.benchmark_quality`` (``OURS - other`` differences)."""
    out: dict = {"auc": {}, "diff": {}, "goals": []}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if row["table"] == "goal":
                status = {"1": "met", "1.0": "met", "0": "missed", "0.0": "missed"}.get(row["value"], "not measured")
                out["goals"].append({"goal": row["item"], "measured": row["metric"], "status": status})
                continue
            key = "pooled" if row["metric"] == "pooled" else int(row["metric"].split()[-1])
            if row["table"] == "auc":
                out["auc"].setdefault(row["item"], {})[key] = float(row["value"])
            elif row["table"] == "paired AUC difference" and row["item"].startswith(f"{OURS} - "):
                other = row["item"].split(" - ", 1)[1]
                out["diff"].setdefault(other, {})[key] = (float(row["value"]), float(row["ci_low"]),
                                                          float(row["ci_high"]))
    return out


def goal_targets(report: Report, dataset: str, data: Optional[dict], source: str) -> list[str]:
    """One target per goal row of a dataset's quality CSV (the report decided met / missed /
    not measured from its pooled analysis); one 'not measured' target when the CSV is absent."""
    if data is None:
        return [report.target(f"{dataset}: the goals of the method", "not measured",
                              f"{source} absent (run `{_command_of(source)}`)")]
    if not data["goals"]:
        return [report.target(f"{dataset}: the goals of the method", "not measured", f"no goal rows in {source}")]
    return [report.target(f"{dataset}: {g['goal']}", g["status"], g["measured"] if g["status"] != "not measured"
                          else f"{g['measured']} ({source})") for g in data["goals"]]


def _command_of(source: str) -> str:
    return QUALITY_REPORTS.get(Path(source).stem, "python -m utils.benchmark_quality")


def _demote(markdown: str) -> str:
    """Headings one level down, so an included report nests under section 1."""
    return "\n".join("#" + line if line.startswith("#") else line for line in markdown.splitlines())


def _quality_rows(report: Report, name: str, data: dict) -> None:
    for model, per_seed in data["auc"].items():
        for seed, value in sorted(per_seed.items()):
            report.add("quality", f"{name}: {model}", f"test ROC-AUC {'' if seed == 'pooled' else 'seed '}{seed}", value)
    for other, per_seed in data["diff"].items():
        for seed, (d, lo, hi) in per_seed.items():
            report.add("quality", f"{name}: {OURS} - {other}", f"paired AUC difference {'' if seed == 'pooled' else 'seed '}"
                       f"{seed}", d, unit=f"CI [{lo:.3f}, {hi:.3f}]")


def run_commits(quality_dir: Path, stem: str) -> str:
    """A line naming the commits of every start (training, resumes, reads) of the seed runs
    behind report ``stem`` (``provenance.json``): the quality figures are as old as those
    runs, whenever the report is assembled."""
    seeds: dict[str, list[str]] = {}
    for prov in sorted((Path(quality_dir) / "benchmark_runs").glob(f"{stem}_seed*/provenance.json")):
        starts = json.loads(prov.read_text())["starts"]
        commits = dict.fromkeys(f"`{str(s.get('git_commit'))[:7]}`{'+' if s.get('git_dirty') else ''}" for s in starts)
        seeds.setdefault(" -> ".join(commits), []).append(prov.parent.name.rsplit("_", 1)[-1])
    if not seeds:
        return ""
    return ("_Runs started at commits (`+`: with uncommitted changes) " + "; ".join(
        f"{c} ({', '.join(names)})" for c, names in seeds.items())
            + ": the figures below are those runs', not re-measured on the current code._\n\n")


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
                         + run_commits(quality_dir, stem) + _demote(md.read_text().strip()))
        else:
            parts.append(f"### `{display_path(md)}`: not present\n\nNot measured: run `{command}` to write it.")
        loaded[stem] = read_quality_csv(table) if table.is_file() else None
        if loaded[stem] is not None:
            _quality_rows(report, stem.removeprefix("quality_"), loaded[stem])

    for stem, dataset in DATASET_NAMES.items():
        goal_targets(report, dataset, loaded[stem], display_path(quality_dir / f"{stem}.csv"))

    run0 = None
    if quick:  # exercise the quality benchmark's code path at smoke size (CI)
        from utils.benchmarking.quality import run_quality
        smoke_dir = output_dir / "quality"
        md = run_quality("smoke", (0, 1), smoke_dir, device=device)
        smoke = read_quality_csv(md.with_suffix(".csv"))
        _quality_rows(report, "smoke", smoke)
        parts.append(f"### `--quick`: `run_quality('smoke', (0, 1), {display_path(smoke_dir)})` (12 phantoms; code "
                     "path only)\n\n" + _demote(md.read_text().strip()))
        goal_targets(report, "[--quick code path, not a target] smoke", smoke, display_path(md.with_suffix(".csv")))
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
