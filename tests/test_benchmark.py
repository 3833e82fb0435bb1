"""The benchmark suite runs end to end at smoke sizes and writes a well-formed report.

``python -m utils.benchmark --quick`` (about 1.5 minutes on 2 CPU cores) exercises every
section of the full suite with the same code; the full suite is run by hand and its report
committed as outputs/benchmark.md.
"""
import csv
import math
import subprocess
import sys

import pytest

from utils.benchmark import Report, timed
from utils.prepare_data import REPO_ROOT

SECTIONS = ["## Targets", "## 1. Quality", "## 2. Speed", "## 3. Memory", "## 4. Scaling",
            "## 5. Projected wall time", "## 6. Design choices"]
TARGETS = ["trains in < 45 min", "phase-2 epoch <= 0.25", "DDIM-10 per volume", "peak memory", "ours above 3D ResNet-18"]


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("benchmark")
    run = subprocess.run([sys.executable, "-m", "utils.benchmark", "--quick", "--output-dir", str(out)],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return out


def test_quick_report_has_every_section_and_target(quick_report):
    text = (quick_report / "benchmark.md").read_text()
    positions = [text.index(s) for s in SECTIONS]
    assert positions == sorted(positions)  # in order
    assert "Command: `python -m utils.benchmark --quick`" in text and "torch " in text and "cores" in text
    target_block = text[text.index("## Targets"):text.index("## 1. Quality")]
    for target in TARGETS:
        line = next(line for line in target_block.splitlines() if target in line)
        assert line.rstrip(" |").endswith(("met", "missed")), line
    for model in ("DiffMIC-3D", "3D ResNet-18", "3D DenseNet-121", "DCG global prior only", "DCG without diffusion"):
        assert f"| {model} |" in text
    for sampler in ("DDPM (all T steps)", "DDIM 10 steps", "DDIM 1 step", "3D ResNet-18 forward"):
        assert f"| {sampler} |" in text


def test_quick_csv_rows_are_numeric_and_match_the_sections(quick_report):
    with open(quick_report / "benchmark.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and set(rows[0]) == {"section", "item", "metric", "value", "spread", "unit"}
    sections = {r["section"] for r in rows}
    assert {"quality", "speed", "memory", "scaling", "projection", "targets", "machine",
            "design (hard phantoms)"} <= sections
    for row in rows:
        if row["section"] != "machine":
            assert math.isfinite(float(row["value"])), row
    seconds = [float(r["value"]) for r in rows if r["unit"] == "s"]
    assert seconds and all(s > 0 for s in seconds)
    quality_seeds = {r["metric"] for r in rows if r["section"] == "quality" and r["item"] == "DiffMIC-3D"}
    assert {"roc_auc seed 0", "roc_auc seed 1", "roc_auc mean over seeds"} <= quality_seeds


def test_report_csv_leaves_missing_spread_empty():
    report = Report()
    report.add("s", "i", "m", 1.5)
    report.add("s", "i", "m2", 2.0, 0.25, "s")
    lines = report.csv().splitlines()
    assert lines == ["section,item,metric,value,spread,unit", "s,i,m,1.5,,", "s,i,m2,2,0.25,s"]


def test_timed_returns_the_median_of_repeats():
    calls = []
    assert timed(lambda: calls.append(1), device=__import__("torch").device("cpu"), repeats=3, warmup=2) >= 0
    assert len(calls) == 5
