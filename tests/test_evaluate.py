"""Tests of utils.evaluation.evaluate: prediction collection, result files, tables and figures."""
import csv
import json
import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import utils.evaluation.visualization.curves as curves
import utils.evaluation.visualization.model_figures as model_figures
from models.diffmic3d import DiffMIC3D, ModelConfig
from utils.errors import DataError
from utils.evaluation.evaluate import (
    Predictions,
    evaluate_experiment,
    format_results_table,
    predict_loader,
    write_learning_curves,
    write_model_figures,
)
from utils.evaluation.metrics import CSV_COLUMNS, SCALAR_METRICS, classification_metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 5000, path


def toy_predictions(n_classes=2, n=30, seed=0):
    """Three models on the same N scans: informative with uncertainty, informative, and chance."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % n_classes
    paths = [f"/data/scan_{i:02d}.nii.gz" for i in range(n)]

    def probs(signal):
        logits = rng.normal(size=(n, n_classes)) + signal * np.eye(n_classes)[labels]
        e = np.exp(logits)
        return e / e.sum(axis=1, keepdims=True)

    ours = probs(2.0)
    return {
        "DiffMIC-3D": Predictions(paths, labels, ours, std=0.1 * ours, entropy=-(ours * np.log(ours)).sum(axis=1)),
        "3D ResNet-18": Predictions(paths, labels, probs(1.0)),
        "chance": Predictions(paths, labels, probs(0.0)),
    }


# ----------------------------------------------------------------------------------------
# Predictions and predict_loader
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(labels=np.zeros(3)), "labels must have shape"),
    (dict(probs=np.full((4, 1), 1.0)), "probs must have shape"),
    (dict(std=np.zeros((4, 3))), "std must have the shape"),
    (dict(entropy=np.zeros(5)), "entropy must have shape"),
])
def test_predictions_check_shapes(kwargs, message):
    args = dict(paths=["a", "b", "c", "d"], labels=np.zeros(4), probs=np.full((4, 2), 0.5))
    with pytest.raises(ValueError, match=message):
        Predictions(**{**args, **kwargs})


def toy_loader(n=7, batch_size=3):
    items = [{"image": torch.full((1, 4, 4, 2), float(i)), "label": torch.tensor(i % 2), "index": i,
              "path": f"scan_{i}.nii.gz"} for i in range(n)]
    return DataLoader(items, batch_size=batch_size, shuffle=False)


def toy_probs(image):
    """(B, C=2) probabilities from the mean of each image: a deterministic toy model."""
    m = image.flatten(1).mean(dim=1)  # (B,)
    return torch.stack([1 / (1 + m), m / (1 + m)], dim=1)


def test_predict_loader_concatenates_in_loader_order():
    seen = []

    def predict_batch(batch):
        assert not torch.is_grad_enabled()
        assert batch["image"].device.type == "cpu" and batch["label"].device.type == "cpu"
        seen.append(batch["index"].tolist())
        probs = toy_probs(batch["image"])
        return {"probs": probs, "std": probs / 10, "entropy": -(probs * probs.log()).sum(dim=1)}

    pred = predict_loader(predict_batch, toy_loader(), "cpu", desc="toy")
    assert seen == [[0, 1, 2], [3, 4, 5], [6]]
    assert pred.paths == [f"scan_{i}.nii.gz" for i in range(7)]
    np.testing.assert_array_equal(pred.labels, np.arange(7) % 2)
    expected = toy_probs(torch.arange(7.0)[:, None]).numpy()
    np.testing.assert_allclose(pred.probs, expected, rtol=1e-6)
    np.testing.assert_allclose(pred.std, expected / 10, rtol=1e-6)
    assert pred.entropy.shape == (7,)


def test_predict_loader_without_uncertainty_and_bad_outputs():
    pred = predict_loader(lambda b: {"probs": toy_probs(b["image"])}, toy_loader(), "cpu")
    assert pred.std is None and pred.entropy is None and pred.probs.shape == (7, 2)
    with pytest.raises(ValueError, match=r"probs of shape \(2,\) for a batch of 3"):
        predict_loader(lambda b: {"probs": torch.tensor([0.5, 0.5])}, toy_loader(), "cpu")
    calls = iter(range(10))

    def sometimes_std(batch):
        probs = toy_probs(batch["image"])
        return {"probs": probs, "std": probs} if next(calls) == 0 else {"probs": probs}

    with pytest.raises(ValueError, match="'std' for 1 of 3 batches"):
        predict_loader(sometimes_std, toy_loader(), "cpu")


# ----------------------------------------------------------------------------------------
# evaluate_experiment
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_classes", [2, 3])
def test_evaluate_experiment_writes_results_predictions_and_figures(tmp_path, n_classes):
    predictions = toy_predictions(n_classes)
    class_names = ["Normal", "COVID-19"] if n_classes == 2 else ["CT-0", "CT-1", "CT-2"]
    rows = evaluate_experiment(predictions, tmp_path, class_names, seed=0, n_resamples=1000)

    with open(tmp_path / "evaluation_results.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == CSV_COLUMNS == ("model", "metric", "value", "ci_low", "ci_high")
        written = list(reader)
    assert [(r["model"], r["metric"]) for r in written] == [(r["model"], r["metric"]) for r in rows]
    scalar = [r for r in written if r["metric"] in SCALAR_METRICS]
    assert len(scalar) == 3 * len(SCALAR_METRICS)
    for row in scalar:
        value, low, high = float(row["value"]), float(row["ci_low"]), float(row["ci_high"])
        assert low <= value <= high, row
        if row["metric"] == "accuracy":
            assert low < high  # a real interval from resampling, not the point estimate repeated
    # point estimates are those of the predictions themselves
    ours = predictions["DiffMIC-3D"]
    point = classification_metrics(ours.labels, ours.probs)
    by_metric = {r["metric"]: float(r["value"]) for r in written if r["model"] == "DiffMIC-3D"}
    assert by_metric["roc_auc"] == pytest.approx(point["roc_auc"])
    assert by_metric["confusion_true1_pred1"] == point["confusion_matrix"][1, 1]
    auc = {m: next(float(r["value"]) for r in scalar if r["model"] == m and r["metric"] == "roc_auc")
           for m in predictions}
    assert auc["DiffMIC-3D"] > auc["chance"]

    for name in ("confusion_matrix", "roc_curves", "reliability_diagram"):
        assert_png(tmp_path / "figures" / f"{name}.png")

    lines = format_results_table(rows).splitlines()  # the README table
    assert len(lines) == 2 + 3 and lines[2].startswith("| DiffMIC-3D | ")
    assert lines[2].count("[") == len(SCALAR_METRICS)


def test_predictions_csv_rows_and_columns(tmp_path):
    predictions = toy_predictions()
    evaluate_experiment(predictions, tmp_path, ["Normal", "COVID-19"], n_resamples=1000)
    with open(tmp_path / "predictions.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["model", "path", "label", "prob_Normal", "prob_COVID-19",
                                     "std_Normal", "std_COVID-19", "entropy", "threshold", "decision",
                                     "u_msp", "u_margin", "u_entropy", "u_risk", "u_spread", "u_ttest"]
        rows = list(reader)
    assert len(rows) == 3 * 30
    assert [r["model"] for r in rows[::30]] == list(predictions)
    ours, baseline = rows[:30], rows[30:60]
    expected = predictions["DiffMIC-3D"]
    assert [r["path"] for r in ours] == expected.paths
    assert [int(r["label"]) for r in ours] == expected.labels.tolist()
    np.testing.assert_array_equal([[float(r["prob_Normal"]), float(r["prob_COVID-19"])] for r in ours], expected.probs)
    np.testing.assert_array_equal([float(r["std_COVID-19"]) for r in ours], expected.std[:, 1])
    np.testing.assert_array_equal([float(r["entropy"]) for r in ours], expected.entropy)
    assert {r["std_Normal"] for r in baseline} == {""} and {r["entropy"] for r in baseline} == {""}
    # no validation predictions: no threshold, decisions at the argmax, no chain-based scores
    assert {r["threshold"] for r in rows} == {""} and {r["u_spread"] for r in rows} == {""}
    assert [int(r["decision"]) for r in ours] == expected.probs.argmax(1).tolist()


def test_validation_thresholds_decide_the_test_scans_and_uncertainty_is_reported(tmp_path):
    """Each model's threshold is chosen on ITS validation predictions (Youden), kept when the model
    brings its own, and applied unchanged to the test scans; uncertainty.csv and the
    risk-coverage figure are written."""
    from utils.evaluation.thresholds import youden_threshold
    test, val = toy_predictions(), toy_predictions()
    for pred in val.values():  # a validation split whose scores are shifted: a threshold away from 0.5
        pred.probs = np.clip(pred.probs + np.array([-0.2, 0.2]), 0.0, 1.0)
        pred.probs /= pred.probs.sum(1, keepdims=True)
    test["chance"].threshold = 0.3  # a model with its own stored threshold keeps it
    rows = evaluate_experiment(test, tmp_path, ["Normal", "COVID-19"], n_resamples=1000, val_predictions=val,
                               reference="chance")
    values = {(r["model"], r["metric"]): r["value"] for r in rows}
    expected = youden_threshold(val["DiffMIC-3D"].labels, val["DiffMIC-3D"].probs)
    assert values[("DiffMIC-3D", "threshold@val_threshold")] == pytest.approx(expected)
    assert values[("chance", "threshold@val_threshold")] == pytest.approx(0.3)
    at = classification_metrics(test["DiffMIC-3D"].labels, test["DiffMIC-3D"].probs, threshold=expected)
    assert values[("DiffMIC-3D", "recall@val_threshold")] == pytest.approx(at["recall"])
    assert values[("DiffMIC-3D", "balanced_accuracy@val_threshold")] == pytest.approx(at["balanced_accuracy"])
    assert 0 <= values[("DiffMIC-3D", "ece")] <= 1
    with open(tmp_path / "uncertainty.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert {(r["model"], r["score"]) for r in table} >= {("DiffMIC-3D", "margin"), ("chance", "msp")}
    reference = next(r for r in table if (r["model"], r["score"]) == ("chance", "msp"))
    assert reference["aurc_minus_ref"] == ""  # the reference is not compared with itself
    assert (tmp_path / "val_predictions.csv").is_file()
    assert_png(tmp_path / "figures" / "risk_coverage.png")


def test_evaluate_experiment_refuses_different_test_sets(tmp_path):
    predictions = toy_predictions()
    other = predictions["chance"]
    predictions["chance"] = Predictions(other.paths[::-1], other.labels[::-1], other.probs)
    with pytest.raises(ValueError, match="different scans"):
        evaluate_experiment(predictions, tmp_path, ["Normal", "COVID-19"])
    with pytest.raises(ValueError, match="C = 2 classes but 3 class names"):
        evaluate_experiment(toy_predictions(), tmp_path, ["a", "b", "c"])
    with pytest.raises(ValueError, match="n_resamples must be an integer >= 1000"):
        evaluate_experiment(toy_predictions(), tmp_path, ["a", "b"], n_resamples=100)


def test_format_results_table():
    rows = [
        {"model": "ours", "metric": "accuracy", "value": 0.825, "ci_low": 0.7, "ci_high": 0.925},
        {"model": "ours", "metric": "roc_auc", "value": 0.9012, "ci_low": 0.8, "ci_high": 0.97},
        {"model": "ours", "metric": "confusion_true0_pred0", "value": 17, "ci_low": None, "ci_high": None},
        {"model": "ResNet-18", "metric": "accuracy", "value": 0.75, "ci_low": 0.6, "ci_high": 0.875},
        {"model": "ResNet-18", "metric": "roc_auc", "value": math.nan, "ci_low": math.nan, "ci_high": math.nan},
    ]
    table = format_results_table(rows, metrics=("accuracy", "roc_auc"))
    assert table.splitlines() == [
        "| Model | Accuracy | ROC-AUC |",
        "|---|---:|---:|",
        "| ours | 0.825 [0.700, 0.925] | 0.901 [0.800, 0.970] |",
        "| ResNet-18 | 0.750 [0.600, 0.875] | n/a |",
    ]
    with pytest.raises(ValueError, match="no rows"):
        format_results_table(rows[2:3], metrics=("accuracy",))


# ----------------------------------------------------------------------------------------
# learning curves
# ----------------------------------------------------------------------------------------

HISTORY = {
    "dcg": {"train_loss": [1.2, 0.9, 0.7], "val_loss": [1.1, 0.95, 1.0], "val_auc": [0.6, 0.8, 0.75],
            "val_acc": [0.5, 0.7, 0.7], "lr": [1e-3, 1e-3, 5e-4], "best_epoch": 2},
    "diffusion": {"train_loss": [0.5, 0.4], "val_loss": [0.45, 0.42], "val_auc": [0.8, 0.82],
                  "best": {"epoch": 1, "val_auc": 0.8}, "stopped_early": False},
    "resnet18": {"train_loss": [0.7], "val_loss": [0.69], "val_auc": [0.55]},
    "densenet121": {"train_loss": [], "val_loss": []},  # not trained yet: left out
}


def test_learning_curves_from_history(tmp_path, monkeypatch):
    captured = {}
    real = curves.plot_learning_curves

    def spy(history, selected_epochs=None):
        captured.update(history=history, selected=selected_epochs)
        return real(history, selected_epochs)

    monkeypatch.setattr(curves, "plot_learning_curves", spy)
    (tmp_path / "history.json").write_text(json.dumps(HISTORY))
    path = write_learning_curves(tmp_path / "history.json", tmp_path)
    assert path == tmp_path / "figures" / "learning_curves.png"
    assert_png(path)
    assert list(captured["history"]) == ["phase 1: DCG", "phase 2: diffusion", "3D ResNet-18 (baseline)"]
    assert captured["history"]["phase 1: DCG"] == {k: HISTORY["dcg"][k] for k in ("train_loss", "val_loss",
                                                                                 "val_auc", "val_acc")}
    assert captured["selected"] == {"phase 1: DCG": 2, "phase 2: diffusion": 1}


@pytest.mark.parametrize("content, message", [
    (None, "training history not found"),
    ("{not json", "not a readable JSON file"),
    (json.dumps({"dcg": {"train_loss": ["a"]}}), "dcg.train_loss is not a list of numbers"),
    (json.dumps({"dcg": {"train_loss": []}}), "holds no per-epoch values"),
    (json.dumps([1, 2]), "expected a JSON object of phases"),
])
def test_learning_curves_bad_history(tmp_path, content, message):
    path = tmp_path / "history.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=message):
        write_learning_curves(path, tmp_path)


# ----------------------------------------------------------------------------------------
# model figures
# ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return DiffMIC3D(ModelConfig.tiny(input_shape=(32, 32, 16))).eval()


def test_write_model_figures(tmp_path, tiny_model, monkeypatch):
    captured = {"saliency": [], "trajectory": []}
    real_saliency, real_trajectory = model_figures.plot_saliency_overlay, model_figures.plot_denoising_trajectory

    def saliency_spy(volume, saliency, roi_boxes=None, **kwargs):
        captured["saliency"].append((volume, saliency, roi_boxes, kwargs["slices"]))
        return real_saliency(volume, saliency, roi_boxes, **kwargs)

    def trajectory_spy(probs, timesteps, class_names, **kwargs):
        captured["trajectory"].append((probs, list(timesteps)))
        return real_trajectory(probs, timesteps, class_names, **kwargs)

    monkeypatch.setattr(model_figures, "plot_saliency_overlay", saliency_spy)
    monkeypatch.setattr(model_figures, "plot_denoising_trajectory", trajectory_spy)
    rng = np.random.default_rng(0)
    volumes = [rng.random((1, 32, 32, 16), dtype=np.float32) for _ in range(2)]
    paths = ["/data/a.nii.gz", "/data/b.nii.gz"]
    written = write_model_figures(tiny_model, volumes, paths, tmp_path, seed=3, class_names=["Normal", "COVID-19"],
                                  labels=[0, 1], num_samples=2)
    assert written == {"saliency_rois": tmp_path / "figures" / "saliency_rois.png",
                       "denoising_trajectory": tmp_path / "figures" / "denoising_trajectory.png"}
    for path in written.values():
        assert_png(path)

    # saliency: one figure per scan, the DCG's map of its predicted class, boxes on shown slices
    guidance = tiny_model.guidance(torch.from_numpy(np.stack(volumes)))
    assert len(captured["saliency"]) == 2
    for i, (volume, saliency, boxes, slices) in enumerate(captured["saliency"]):
        c = int(guidance.fused_probs[i].argmax())
        np.testing.assert_array_equal(volume, volumes[i][0])
        np.testing.assert_array_equal(saliency, guidance.saliency[i, c].numpy())
        np.testing.assert_array_equal(boxes, guidance.roi_boxes[i].numpy())
        centres = {int(k) for k in (boxes[:, 2] + boxes[:, 5] - 1) // 2}
        assert centres <= set(slices) and len(slices) == 4 and slices == sorted(slices)

    # trajectory: states at T, the DDIM timesteps (+1), then 0; the last state is the prediction
    expected = tiny_model.predict(torch.from_numpy(np.stack(volumes)), guidance, num_samples=2,
                                  generator=torch.Generator().manual_seed(3))
    steps = tiny_model.config.diffusion.ddim_steps
    for i, (probs, timesteps) in enumerate(captured["trajectory"]):
        assert probs.shape == (steps + 1, 2, 2)  # (steps + 1, S, C)
        assert timesteps == [1000, 800, 600, 400, 200, 0]  # T = 1000, 5 trailing DDIM steps
        np.testing.assert_allclose(probs[-1].mean(axis=0), expected["probs"][i].numpy(), atol=1e-5)


def test_write_model_figures_roi_scale_two_maps_boxes_to_the_input(tmp_path, monkeypatch):
    data = ModelConfig.tiny(input_shape=(32, 32, 16)).to_dict()
    data["dcg"]["roi_scale"] = 2
    torch.manual_seed(0)
    model = DiffMIC3D(ModelConfig.from_dict(data)).eval()
    captured = []
    real = model_figures.plot_saliency_overlay

    def spy(volume, saliency, boxes, **kwargs):
        captured.append(boxes)
        return real(volume, saliency, boxes, **kwargs)

    monkeypatch.setattr(model_figures, "plot_saliency_overlay", spy)
    rng = np.random.default_rng(1)
    volume = rng.random((1, 32, 32, 16), dtype=np.float32)
    hires = rng.random((1, 64, 64, 16), dtype=np.float32)
    with pytest.raises(ValueError, match="hires_volumes must be given"):
        write_model_figures(model, [volume], ["a.nii.gz"], tmp_path)
    write_model_figures(model, [volume], ["a.nii.gz"], tmp_path, hires_volumes=[hires], num_samples=1)
    hires_boxes = model.guidance(torch.from_numpy(volume[None]), torch.from_numpy(hires[None])).roi_boxes[0].numpy()
    (boxes,) = captured
    np.testing.assert_array_equal(boxes[:, [0, 1, 3, 4]], hires_boxes[:, [0, 1, 3, 4]] // 2)  # crops are 16 wide, even
    np.testing.assert_array_equal(boxes[:, [2, 5]], hires_boxes[:, [2, 5]])
