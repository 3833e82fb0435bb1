"""The benchmark suite computes its figures, and its report's targets are met, missed or
not measured for a stated reason.

The pieces are tested at tiny sizes (under ~90 s on 2 CPU cores); the whole
``python -m utils.benchmark --quick`` (several minutes) runs only with
``MEDISCOPE_BENCHMARK_QUICK=1``. The full suite is run by hand.
"""
import csv
import math
import os
import subprocess
import sys
import time
import pytest
import torch

import utils.benchmarking.speed as speed_section
from utils.benchmarking.quality_reports import goal_targets, quality, read_quality_csv
from utils.benchmarking.report import Report
from utils.benchmarking.speed import speed
from utils.benchmarking.timing import probe, timed
from utils.paths import REPO_ROOT

CPU = torch.device("cpu")


# ------------------------------------------------------------------------------------------
# timing and report rows
# ------------------------------------------------------------------------------------------

def test_timed_returns_the_median_of_the_timed_calls_not_the_warmup():
    durations = iter([0.30, 0.02, 0.12, 0.06])  # warmup, then three timed calls: median 0.06
    calls = []

    def fn():
        calls.append(1)
        time.sleep(next(durations))

    value = timed(fn, CPU, repeats=3, warmup=1)
    assert len(calls) == 4
    assert 0.06 <= value < 0.06 + 0.03  # the median, not the mean (0.067) nor the warm-up (0.30)


def test_report_csv_leaves_missing_spread_empty():
    report = Report()
    report.add("s", "i", "m", 1.5)
    report.add("s", "i", "m2", 2.0, 0.25, "s")
    lines = report.csv().splitlines()
    assert lines == ["section,item,metric,value,spread,unit", "s,i,m,1.5,,", "s,i,m2,2,0.25,s"]


def test_target_statuses_need_a_reason_when_not_measured():
    report = Report()
    assert report.check("a", 0.2, True, "0.2") == "met"
    assert report.check("b", 0.9, False, "0.9") == "missed"
    with pytest.raises(ValueError):
        report.target("c", "not measured", " ")
    with pytest.raises(ValueError):
        report.target("d", "unknown", "x")
    report.target("e", "not measured", "report absent")
    assert [r["status"] for r in report.targets] == ["met", "missed", "not measured"]
    assert [(r["item"], r["value"]) for r in report.rows] == [("a", 0.2), ("b", 0.9)]  # no row for 'not measured'


# ------------------------------------------------------------------------------------------
# quality targets from the reports of utils.benchmark_quality
# ------------------------------------------------------------------------------------------

def _write_quality(folder, stem, aucs, diffs, goals=()):
    rows = ["table,item,metric,value,ci_low,ci_high"]
    rows += [f"auc,{m},seed {s},{v},," for m, per in aucs.items() for s, v in enumerate(per)]
    rows += [f"paired AUC difference,DiffMIC-3D - {o},seed {s},{d},{lo},{hi}"
             for o, per in diffs.items() for s, (d, lo, hi) in enumerate(per)]
    rows += [f"goal,{g},{measured},{value},," for g, measured, value in goals]
    (folder / f"{stem}.csv").write_text("\n".join(rows) + "\n")
    (folder / f"{stem}.md").write_text(f"## Quality on {stem}\n\n### Test ROC-AUC\n\nbody of {stem}\n")


def test_quality_targets_are_the_goal_rows_of_each_report(tmp_path):
    _write_quality(tmp_path, "quality_adrenalmnist3d",
                   {"DiffMIC-3D": [0.86, 0.88, 0.84], "3D ResNet-18": [0.80, 0.85, 0.86]},
                   {"3D ResNet-18": [(0.06, 0.01, 0.11), (0.03, -0.02, 0.08), (-0.02, -0.07, 0.03)]},
                   goals=[("gain over the DCG", "+0.020 [+0.004; +0.031]", 1), ("AURC below", "0.1 vs 0.2", 0),
                          ("threshold", "binary thresholds not available", "")])
    data = read_quality_csv(tmp_path / "quality_adrenalmnist3d.csv")
    assert data["auc"]["DiffMIC-3D"] == {0: 0.86, 1: 0.88, 2: 0.84}
    assert data["diff"]["3D ResNet-18"][1] == (0.03, -0.02, 0.08)
    report = Report()
    statuses = goal_targets(report, "AdrenalMNIST3D", data, "x.csv")
    assert statuses == ["met", "missed", "not measured"]
    assert report.targets[0]["target"] == "AdrenalMNIST3D: gain over the DCG"
    assert "x.csv" in report.targets[2]["measured"]  # the reason names its source
    assert goal_targets(report, "phantoms", None, "quality_phantoms300.csv") == ["not measured"]
    assert "--data phantoms" in report.targets[-1]["measured"]


def test_quality_section_includes_present_reports_and_marks_absent_ones(tmp_path, monkeypatch):
    """Section 1 without --quick: text inclusion, CSV rows, targets (the histogram baseline on the smoke phantoms)."""
    import utils.histogram_baseline as hb
    monkeypatch.setattr(hb, "histogram_baseline_accuracy", lambda paths, labels: (0.55, 0.05))
    monkeypatch.setattr("utils.benchmarking.quality_reports.REPO_ROOT", tmp_path)  # the fallback phantom folder
    from utils.data.phantoms import PhantomConfig, write_dataset
    write_dataset(tmp_path / "data" / "phantoms_300", 6, seed=0, config=PhantomConfig(size=32), progress=False)
    qdir = tmp_path / "q"
    qdir.mkdir()
    _write_quality(qdir, "quality_phantoms300",
                   {"DiffMIC-3D": [0.8, 0.9], "DCG without diffusion": [0.7, 0.8], "3D ResNet-18": [0.85, 0.95]},
                   {"DCG without diffusion": [(0.1, 0.01, 0.2), (0.1, 0.02, 0.2)],
                    "3D ResNet-18": [(-0.05, -0.1, 0.01), (-0.05, -0.1, 0.02)]},
                   goals=[("above its DCG", "+0.1", 1), ("AURC", "0.3 vs 0.2", 0)])
    report = Report()
    assert quality(report, qdir, False, tmp_path / "out", "cpu") is None
    text = "\n".join(report.blocks)
    assert "### Quality on quality_phantoms300" in text  # demoted one level
    assert "python -m utils.benchmark_quality --data phantoms --seeds 0 1 2 3 4" in text
    assert "quality_adrenalmnist3d.md`: not present" in text and "accuracy 0.550 ± 0.050" in text
    status = {t["target"]: t["status"] for t in report.targets}
    assert list(status.values()) == ["not measured", "met", "missed", "not measured", "not measured"]  # external sets absent
    for seed in (1, 2):
        assert f"external_phantoms_seed{seed}_2000.md`: not present\n\nNot measured: run `python scripts/external_test.py" in text
    aucs = [r for r in report.rows if r["section"] == "quality" and r["metric"].startswith("test ROC-AUC")]
    assert len(aucs) == 6 and all(math.isfinite(r["value"]) for r in aucs)


# ------------------------------------------------------------------------------------------
# probes and the speed section on the new model
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stage", ["dcg", "diffusion"])
def test_probe_trains_the_stage_and_measures_it(stage):
    out = probe(stage, (32, 32, 16), "tiny", 2, 1, "cpu")
    assert out["seconds_per_step"] > 0 and 0 < out["peak_rss_gb"] < 64


def test_speed_section_measures_the_new_phase_2_and_samplers(tmp_path, monkeypatch):
    """One tiny smoke run, then section 2: every figure positive, the ratio targets computed from them."""
    from utils.training.profiles import get_profile
    from utils.run import run_experiment

    config = get_profile("smoke", seed=0, progress=False, dcg_epochs=1, diffusion_epochs=1, baseline_epochs=1,
                         oof_folds=0, baselines=("resnet18",),
                         model_overrides={"diffusion": {"num_samples": 2, "num_timesteps": 50}})  # DDPM: 50 steps
    run_dir = tmp_path / "run"
    run_experiment(config, run_dir, train_only=True)  # the section reads the checkpoints, not the test split
    calls = []
    real_timed = speed_section.timed

    def counting_timed(fn, device, repeats=3, warmup=1):
        calls.append((repeats, warmup))
        return real_timed(fn, device, repeats, warmup)

    monkeypatch.setattr(speed_section, "timed", counting_timed)
    report = Report()
    figures = speed(report, run_dir, config, CPU, quick=True)
    assert len(calls) >= 7 and all(r >= 1 for r, _ in calls)
    speed_rows = {(r["item"], r["metric"]): r["value"] for r in report.rows if r["section"] == "speed"}
    assert all(math.isfinite(v) for v in speed_rows.values())
    seconds = [r["value"] for r in report.rows if r["unit"] == "s"]
    assert len(seconds) >= 8 and all(s > 0 for s in seconds)
    assert figures["phase1_epoch"] > 0 and figures["phase2_epoch"] > 0
    targets = {t["target"]: t for t in report.targets}
    assert len(targets) == 4 and [t["status"] for t in targets.values()].count("not measured") == 1
    main_job = next(t for name, t in targets.items() if "main job" in name)
    assert main_job["status"] == "not measured" and "main_job_timings.json" in main_job["measured"]
    parts = {r["item"].removeprefix("inference: "): r["value"] for r in report.rows if r["item"].startswith("inference: ")}
    assert set(parts) == {"one DCG forward", "all DCG members", "condition branch (encoder, priors, U-Net)",
                          "sampling (chains x steps)", "DiffMIC-3D predict", "3D ResNet-18 forward"}
    inference = [r for r in report.rows if r["section"] == "targets" and "inference" in r["item"]]
    assert [r["value"] for r in inference] == pytest.approx(
        [parts["DiffMIC-3D predict"] / parts["one DCG forward"], parts["DiffMIC-3D predict"] / parts["3D ResNet-18 forward"]])
    ratio = next(r["value"] for r in report.rows if r["section"] == "targets" and r["item"].startswith("phase-2"))
    # a notebook run's times, when present, become the main-job target
    (run_dir / "main_job_timings.json").write_text('{"runner": "utils.run_notebooks", "profile": "smoke", '
                                                   '"01_data_loading": 3.0, "07_evaluation": 4.0, "total": 600.0}')
    again = Report()
    paragraph = speed_section.main_job_time(again, run_dir)
    assert [(t["status"], t["measured"]) for t in again.targets] == [("missed", "10.0 min")]
    assert "| 07_evaluation | 4 |" in paragraph and "**10.0 min**" in paragraph
    assert ratio == pytest.approx(figures["phase2_epoch"] / figures["phase1_epoch"])
    text = report.blocks[-1]
    for sampler in ("DDPM (all T = 50 steps)", "DDIM 10 steps", "DDIM 1 step", "3D ResNet-18 forward"):
        assert f"| {sampler} |" in text
    growth = text[text.index("| chains | steps |"):].split("\n\n")[0].splitlines()[2:]
    assert len(growth) >= 3 and all(float(line.split("|")[3]) > 0 for line in growth)


# ------------------------------------------------------------------------------------------
# the whole --quick suite (opt-in: several minutes)
# ------------------------------------------------------------------------------------------

SECTIONS = ["## Targets", "## 1. Quality", "## 2. Speed", "## 3. Checkpoints", "## 4. Memory",
            "## 5. Projected wall time", "## 6. Scaling", "## 7. Design choices"]


@pytest.mark.skipif(os.environ.get("MEDISCOPE_BENCHMARK_QUICK") != "1",
                    reason="several minutes: set MEDISCOPE_BENCHMARK_QUICK=1")
def test_quick_suite_end_to_end(tmp_path):
    run = subprocess.run([sys.executable, "-m", "utils.benchmark", "--quick", "--output-dir", str(tmp_path),
                          "--quality-dir", str(tmp_path / "no_reports")],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stderr[-3000:]
    text = (tmp_path / "benchmark.md").read_text()
    positions = [text.index(s) for s in SECTIONS]
    assert positions == sorted(positions)
    block = text[text.index("## Targets"):text.index("## 1. Quality")]
    rows = [line for line in block.splitlines() if line.startswith("| ") and not line.startswith("| target")]
    assert len(rows) >= 10
    for line in rows:
        assert line.rstrip(" |").endswith(("**met**", "**missed**", "**not measured**")), line
    # one quality row per dataset (no reports there) and the main job (the smoke run is no notebook run)
    assert sum("not measured" in line for line in rows) == 3
    with open(tmp_path / "benchmark.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    for row in csv_rows:
        if row["section"] != "machine":
            assert math.isfinite(float(row["value"])), row
    assert {"quality", "speed", "checkpoints", "memory", "scaling", "projection", "targets",
            "design (hard phantoms)"} <= \
        {r["section"] for r in csv_rows}
