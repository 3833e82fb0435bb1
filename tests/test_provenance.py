"""Every run folder records where and with what it ran; its CSVs hold relative paths."""
import csv
import json
import subprocess

import pytest
import torch

from utils.paths import REPO_ROOT
from utils.training.profiles import get_profile
from utils.provenance import collect, record
from utils.run import run_experiment

pytestmark = pytest.mark.usefixtures("one_thread")


def test_provenance_names_versions_commit_and_machine(tmp_path):
    entry = collect("cpu")
    assert entry["libraries"]["torch"] and entry["libraries"]["numpy"] and entry["python"].count(".") == 2
    assert entry["libraries"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
    assert entry["git_commit"] == head and isinstance(entry["git_dirty"], bool)
    assert entry["device"] == "cpu" and entry["gpu"] is None and entry["cpu"]
    record(tmp_path, "cpu")
    record(tmp_path, "cpu")  # a resume appends, keeping the first start
    assert len(json.loads((tmp_path / "provenance.json").read_text())["starts"]) == 2


def test_a_run_folder_has_provenance_and_relative_paths(tmp_path):
    config = get_profile("smoke", progress=False, baselines=("resnet18",), phantom_dir=str(tmp_path / "phantoms"))
    run_experiment(config, tmp_path / "run", cache_dir=tmp_path / "cache", device="cpu")
    starts = json.loads((tmp_path / "run" / "provenance.json").read_text())["starts"]
    assert len(starts) == 1 and starts[0]["device"] == "cpu"
    for name in ("splits.csv", "predictions.csv"):
        with open(tmp_path / "run" / name, newline="") as f:
            paths = [row["path"] for row in csv.DictReader(f)]
        assert paths and not any(p.startswith("/") for p in paths), name
        assert all((tmp_path / "phantoms" / p).is_file() for p in paths), name
    figures = tmp_path / "run" / "figures"
    expected = {"confusion_matrix", "confusion_matrices", "roc_curves", "reliability_diagram", "learning_curves",
                "saliency_rois", "denoising_trajectory", "baseline_gradcam"}
    for stem in expected:  # every figure, as PNG and PDF
        assert (figures / f"{stem}.png").stat().st_size > 1000 and (figures / f"{stem}.pdf").is_file(), stem
    assert {p.stem for p in figures.glob("*.png")} == {p.stem for p in figures.glob("*.pdf")}
