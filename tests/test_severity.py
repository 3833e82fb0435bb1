"""Five-class severity (CT-0 .. CT-4) end to end at the smoke size, from the command line: phantoms
in the five-grade layout generated into a folder of their own, both phases, baselines, test
evaluation and a prediction, through the same code as the binary task."""
import csv
import json

import numpy as np
import pandas as pd
import pytest

from utils.predict import load_model, predict_scan
from utils.run import main

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ("CT-0", "CT-1", "CT-2", "CT-3", "CT-4")


def test_five_class_severity_run_end_to_end(tmp_path, monkeypatch):
    monkeypatch.delenv("MEDISCOPE_DATA_DIR", raising=False)  # the generated phantoms, whatever the machine
    phantoms, run = tmp_path / "phantoms", tmp_path / "run"
    assert main(["--profile", "smoke", "--label-mode", "severity", "--set", "n_phantoms=20",
                 "--set", f"phantom_dir={phantoms}", "--output-dir", str(run), "--cache-dir", str(tmp_path / "cache"),
                 "--device", "cpu", "--set", "baselines=resnet18"]) == 0  # DenseNet-121: the same code path
    studies = tmp_path / "phantoms_severity" / "studies"  # the five-grade set beside the binary set's folder
    assert sorted(p.name for p in studies.iterdir()) == list(CLASSES) and not phantoms.exists()
    rows = pd.read_csv(run / "evaluation_results.csv").to_dict("records")
    aucs = {r["model"]: r["value"] for r in rows if r["metric"] == "roc_auc"}
    # DiffMIC-3D, the DCG's global prior, fused prediction and ensemble, the baseline
    assert len(aucs) == 5 and all(np.isnan(a) or 0.0 <= a <= 1.0 for a in aucs.values())
    assert not any(r["metric"].endswith("@val_threshold") for r in rows)  # thresholds are binary only
    assert {r["model"] for r in rows if r["metric"] == "ece"} == set(aucs)
    confusion = [r for r in rows if r["model"] == "DiffMIC-3D" and r["metric"].startswith("confusion_")]
    assert len(confusion) == 25  # a 5 x 5 confusion matrix
    train_config = json.loads((run / "train_config.json").read_text())
    assert train_config["label_mode"] == "severity" and train_config["n_phantoms"] == 20
    # what notebook 07 reads: a probability and a spread per grade, the figures
    predictions = pd.read_csv(run / "predictions.csv")
    assert {f"{kind}_{c}" for kind in ("prob", "std") for c in CLASSES} <= set(predictions.columns)
    for name in ("confusion_matrix", "roc_curves", "reliability_diagram", "risk_coverage", "saliency_rois",
                 "denoising_trajectory", "learning_curves"):
        assert (run / "figures" / f"{name}.png").is_file(), name
    model, meta = load_model(run / "diffmic3d_enhanced_model.pth")
    assert meta.class_names == CLASSES and model.config.num_classes == 5
    assert meta.training_data.startswith("synthetic chest-CT phantoms")  # the research-use note says so
    result = predict_scan(model, meta, sorted((studies / "CT-4").glob("*.nii.gz"))[-1], num_samples=2)
    assert list(result["probs"]) == list(meta.class_names)
    assert result["decision_threshold"] is None and isinstance(result["refer"], bool)  # argmax for C = 5
    assert sum(result["probs"].values()) == pytest.approx(1.0, abs=1e-5)
    # the model file carries the training scans' feature statistics; the flag is computed from them
    with open(run / "splits.csv", newline="") as f:
        n_train = sum(row["split"] == "train" for row in csv.DictReader(f))
    assert meta.feature_stats["n"] == n_train
    assert result["feature_distance"] > 0 and result["feature_threshold"] == meta.feature_stats["threshold"]
    assert result["out_of_distribution"] is (result["feature_distance"] > result["feature_threshold"])
