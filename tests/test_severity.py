"""Five-class severity (CT-0 .. CT-4) end to end at the smoke size: data, both phases,
baselines, test evaluation and a prediction, through the same code as the binary task."""
import csv
import json

import numpy as np
import pytest

from utils.data.phantoms import PhantomConfig, write_dataset
from utils.predict import load_model, predict_scan
from utils.training.profiles import get_profile
from utils.run import run_experiment

pytestmark = pytest.mark.usefixtures("one_thread")


def test_five_class_severity_run_end_to_end(tmp_path):
    config = get_profile("smoke", label_mode="severity", progress=False)
    data = tmp_path / "studies"
    paths = write_dataset(data, 40, seed=0, layout="studies", config=PhantomConfig(size=config.phantom_size),
                          progress=False)
    rows = run_experiment(config, tmp_path / "run", data_dir=data, cache_dir=tmp_path / "cache", device="cpu")
    aucs = {r["model"]: r["value"] for r in rows if r["metric"] == "roc_auc"}
    # DiffMIC-3D, the DCG's global prior, fused prediction and ensemble, two baselines
    assert len(aucs) == 6 and all(np.isnan(a) or 0.0 <= a <= 1.0 for a in aucs.values())
    assert not any(r["metric"].endswith("@val_threshold") for r in rows)  # thresholds are binary only
    assert {r["model"] for r in rows if r["metric"] == "ece"} == set(aucs)
    confusion = [r for r in rows if r["model"] == "DiffMIC-3D" and r["metric"].startswith("confusion_")]
    assert len(confusion) == 25  # a 5 x 5 confusion matrix
    train_config = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert train_config["label_mode"] == "severity"
    model, meta = load_model(tmp_path / "run" / "diffmic3d_enhanced_model.pth")
    assert meta.class_names == ("CT-0", "CT-1", "CT-2", "CT-3", "CT-4") and model.config.num_classes == 5
    assert meta.training_data.startswith("synthetic chest-CT phantoms")  # the research-use note says so
    result = predict_scan(model, meta, paths[-1], num_samples=2)
    assert list(result["probs"]) == list(meta.class_names)
    assert result["decision_threshold"] is None and isinstance(result["refer"], bool)  # argmax for C = 5
    assert sum(result["probs"].values()) == pytest.approx(1.0, abs=1e-5)
    # the model file carries the training scans' feature statistics; the flag is computed from them
    with open(tmp_path / "run" / "splits.csv", newline="") as f:
        n_train = sum(row["split"] == "train" for row in csv.DictReader(f))
    assert meta.feature_stats["n"] == n_train
    assert result["feature_distance"] > 0 and result["feature_threshold"] == meta.feature_stats["threshold"]
    assert result["out_of_distribution"] is (result["feature_distance"] > result["feature_threshold"])
