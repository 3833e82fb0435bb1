"""Tests of utils.predict: checkpoint loading, prediction of new scans, and the CLI."""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import DATA, toy_ct, write_nifti
from models.diffmic3d import DiffMIC3D, ModelConfig
from utils.training.checkpoint import save_checkpoint
from utils.errors import DataError
from utils.predict import expand_inputs, format_result, load_model, main, predict_scan
from utils.evaluation.ood import fit_feature_stats
from utils.notebook import resolve_parameters
from utils.paths import default_output_dir
from utils.data.preprocessing import PreprocessConfig, preprocess

ROOT = Path(__file__).resolve().parents[1]
INPUT_SHAPE = (32, 32, 16)
CLASS_NAMES = ["Normal", "COVID-19"]


pytestmark = pytest.mark.usefixtures("one_thread")


def preprocess_dict(shape):
    """``preprocess_config`` as the training run stores it (target_shape as a list)."""
    config = PreprocessConfig(target_shape=shape).as_dict()
    return {**config, "target_shape": list(config["target_shape"])}


def write_checkpoint(path, config: ModelConfig, state_dict=None, **overrides):
    """A checkpoint following the run's contract for a randomly initialised tiny model."""
    torch.manual_seed(0)
    model = DiffMIC3D(config)
    torch.nn.init.normal_(model.denoiser.head.out.weight, std=0.1)  # as trained (zero at initialisation)
    h, w, d = config.dcg.input_shape
    s = config.dcg.roi_scale
    entries = {
        "preprocess_config": preprocess_dict((h, w, d)),
        "hires_preprocess_config": preprocess_dict((s * h, s * w, d)) if s > 1 else None,
        "label_mode": "binary",
        "class_names": list(CLASS_NAMES),
        "train_config": {"seed": 0},
        "history": {},
    }
    entries.update(overrides)
    entries = {k: v for k, v in entries.items() if v is not Ellipsis}  # Ellipsis: leave the key out
    return save_checkpoint(path, model_config=config.to_dict(),
                           model_state_dict=model.state_dict() if state_dict is None else state_dict, **entries)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    config = ModelConfig.tiny(input_shape=INPUT_SHAPE).with_changes(diffusion={"num_samples": 2})
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pth", config)


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    """A folder of two small NIfTI CT scans (24 x 20 x 8 voxels) and a stray text file."""
    folder = tmp_path_factory.mktemp("scans")
    write_nifti(folder / "a.nii.gz", toy_ct(seed=1))
    write_nifti(folder / "b.nii", toy_ct(seed=2))
    (folder / "notes.txt").write_text("not a scan")
    return folder


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return load_model(checkpoint, "cpu")


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------------------
# load_model
# ----------------------------------------------------------------------------------------

def test_load_model_restores_weights_and_metadata(checkpoint, loaded):
    model, meta = loaded
    saved = torch.load(checkpoint, weights_only=True)["model_state_dict"]
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    assert not model.training
    assert meta.class_names == tuple(CLASS_NAMES)
    assert meta.preprocess.target_shape == INPUT_SHAPE and meta.hires_preprocess is None
    assert model.config.diffusion.num_samples == 2  # the training profile's sampling, kept in the model


def bad_checkpoints(tmp: Path) -> dict:
    """name -> (path, fragment of the expected one-line message)."""
    config = ModelConfig.tiny(input_shape=INPUT_SHAPE)
    corrupt = tmp / "corrupt.pth"
    corrupt.write_bytes(b"\x00not a torch file at all")
    baseline = tmp / "resnet18.pth"
    save_checkpoint(baseline, model_config={"name": "resnet18", "num_classes": 2, "in_channels": 1},
                    model_state_dict={"fc.weight": torch.zeros(2, 4)})
    foreign = tmp / "foreign.pth"
    save_checkpoint(foreign, model_config={"layers": 3}, model_state_dict={})
    other = DiffMIC3D(ModelConfig.tiny(num_classes=3, input_shape=INPUT_SHAPE)).state_dict()
    return {
        "missing": (tmp / "absent.pth", "python -m utils.run"),
        "corrupt": (corrupt, "corrupt or truncated"),
        "baseline": (baseline, "resnet18 baseline, not a DiffMIC-3D model"),
        "foreign config": (foreign, "model_config is not a DiffMIC-3D configuration"),
        "state dict of another config": (write_checkpoint(tmp / "mismatch.pth", config, state_dict=other),
                                         "does not match its model_config"),
        "no preprocess_config": (write_checkpoint(tmp / "noprep.pth", config, preprocess_config=...),
                                 "no preprocess_config"),
        "preprocess shape != input": (write_checkpoint(tmp / "shape.pth", config,
                                                       preprocess_config=preprocess_dict((64, 64, 32))),
                                      "target_shape (64, 64, 32) != model input (32, 32, 16)"),
        "class names": (write_checkpoint(tmp / "names.pth", config, class_names=["a", "b", "c"]),
                        "3 class_names for a model with 2 classes"),
        "older preprocessing": (write_checkpoint(tmp / "old.pth", config, preprocess_config={
                                    "hu_min": -1000.0, "hu_max": 400.0, "target_shape": list(INPUT_SHAPE)}),
                                "trained by an older version, retrain"),
        "older model version": (_older(tmp / "older.pth", config),
                                "written by an older version of the model ("),
        "dcg stage checkpoint": (write_checkpoint(tmp / "dcg.pth", config, history=...,
                                                  fit={"name": "dcg", "complete": True}),
                                 "training checkpoint of the 'dcg' stage, not a finished model"),
        "diffusion stage checkpoint": (write_checkpoint(tmp / "diffusion.pth", config, history=...,
                                                        fit={"name": "diffusion", "complete": True}),
                                       "'diffusion' stage, not a finished model (uncalibrated)"),
        "no history": (write_checkpoint(tmp / "nohistory.pth", config, history=...), "not a finished model file"),
        "medmnist": (write_checkpoint(tmp / "medmnist.pth", config,
                                      preprocess_config={"source": "medmnist", "target_shape": list(INPUT_SHAPE)},
                                      label_mode="medmnist",
                                      data_source={"kind": "medmnist", "name": "nodulemnist3d"}),
                     "a MedMNIST model cannot read a CT file"),
    }


def _older(path, config):
    """A model file of the version before ``denoiser.film`` existed (same weights' keys)."""
    write_checkpoint(path, config)
    ckpt = torch.load(path, weights_only=True)
    del ckpt["model_config"]["denoiser"]["film"]
    torch.save(ckpt, path)
    return path


BAD_CHECKPOINTS = ["missing", "corrupt", "baseline", "foreign config", "state dict of another config", "no preprocess_config",
                   "preprocess shape != input", "class names", "older preprocessing", "dcg stage checkpoint",
                   "diffusion stage checkpoint", "no history", "medmnist", "older model version"]


@pytest.mark.parametrize("case", BAD_CHECKPOINTS)
def test_bad_checkpoint_gives_one_line_error(tmp_path, toy_nifti, capsys, case):
    path, fragment = bad_checkpoints(tmp_path)[case]
    with pytest.raises(DataError) as info:
        load_model(path)
    assert fragment in str(info.value) and str(path) in str(info.value)
    code, out, err = run_cli(capsys, toy_nifti, "--checkpoint", path)
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and fragment in err


# ----------------------------------------------------------------------------------------
# predict_scan(s)
# ----------------------------------------------------------------------------------------

def test_predict_scan_record(loaded, scans):
    model, meta = loaded
    result = predict_scan(model, meta, scans / "a.nii.gz", num_samples=3, seed=0)
    probs = np.array(list(result["probs"].values()))
    assert list(result["probs"]) == CLASS_NAMES == list(result["std"])
    assert probs.sum() == pytest.approx(1.0, abs=1e-5) and (probs >= 0).all()
    assert result["predicted_class"] == CLASS_NAMES[int(probs.argmax())]
    assert result["probability"] == pytest.approx(probs.max())
    assert result["entropy"] == pytest.approx(-(probs * np.log(probs)).sum(), abs=1e-5)
    assert 0 <= result["entropy"] <= math.log(2) + 1e-6
    assert all(s >= 0 for s in result["std"].values())


def test_predict_scan_is_seeded_and_independent_of_order(loaded, scans):
    model, meta = loaded
    a, b = scans / "a.nii.gz", scans / "b.nii"
    first = [predict_scan(model, meta, p, num_samples=2, seed=7) for p in (a, b)]
    again = [predict_scan(model, meta, p, num_samples=2, seed=7) for p in (b, a)]
    assert first == again[::-1]  # no generator state carried from one scan to the next
    other_seed = predict_scan(model, meta, a, num_samples=2, seed=8)
    assert other_seed["probs"] != first[0]["probs"]


def test_one_sample_has_zero_std(loaded, scans):
    model, meta = loaded
    result = predict_scan(model, meta, scans / "a.nii.gz", num_samples=1)
    assert set(result["std"].values()) == {0.0}


def test_roi_scale_two_checkpoint_uses_hires_copy(tmp_path, toy_nifti):
    data = ModelConfig.tiny(input_shape=INPUT_SHAPE).to_dict()
    data["dcg"]["roi_scale"] = 2
    path = write_checkpoint(tmp_path / "hires.pth", ModelConfig.from_dict(data))
    model, meta = load_model(path)
    assert meta.hires_preprocess.target_shape == (64, 64, 16)
    probs = predict_scan(model, meta, toy_nifti)["probs"]
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
    broken = write_checkpoint(tmp_path / "nohires.pth", ModelConfig.from_dict(data), hires_preprocess_config=None)
    with pytest.raises(DataError, match="roi_scale 2 needs hires_preprocess_config"):
        load_model(broken)


def test_preprocessing_comes_from_the_checkpoint(tmp_path, toy_nifti):
    """anti_alias and target_spacing are read back (from_dict) and the scan's spacing is used."""
    config = ModelConfig.tiny(input_shape=INPUT_SHAPE)
    prep = PreprocessConfig(target_shape=INPUT_SHAPE, anti_alias=False, target_spacing=(12.0, 12.0, 20.0)).as_dict()
    model, meta = load_model(write_checkpoint(tmp_path / "spacing.pth", config, preprocess_config=prep))
    assert meta.preprocess.target_spacing == (12.0, 12.0, 20.0) and meta.preprocess.anti_alias is False
    probs = predict_scan(model, meta, toy_nifti, num_samples=1)["probs"]
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)


# ----------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------

def test_expand_inputs(scans, tmp_path):
    dicom = DATA / "example_ct_dicom"
    found, notes = expand_inputs([scans, dicom, tmp_path / "x.nii.gz"])
    assert found == [scans / "a.nii.gz", scans / "b.nii", dicom, tmp_path / "x.nii.gz"]
    assert notes == [f"{scans / 'notes.txt'}: skipped (not a .nii / .nii.gz file)"]


def test_cli_text_output_names_class_probability_and_uncertainty(checkpoint, loaded, scans, capsys):
    code, out, err = run_cli(capsys, scans / "a.nii.gz", "--checkpoint", checkpoint, "--samples", "3")
    assert code == 0 and err == "Research use only, not for diagnosis: this model was trained on unknown data " \
                                "(the checkpoint does not say) (model.pth).\n"  # the test file has no data_source
    expected = predict_scan(*loaded, scans / "a.nii.gz", num_samples=3, seed=0)
    name = expected["predicted_class"]
    assert out.count("\n") == 1
    assert f": {name} (probability {expected['probability']:.3f}" in out
    assert f"std {expected['std'][name]:.3f}, entropy {expected['entropy']:.3f} nats" in out


def test_cli_json_same_seed_same_output(checkpoint, scans, capsys):
    argv = [scans / "b.nii", "--checkpoint", checkpoint, "--json", "--samples", "2", "--seed", "3"]
    code, out, _ = run_cli(capsys, *argv)
    code2, out2, _ = run_cli(capsys, *argv)
    assert code == code2 == 0 and out == out2
    (result,) = json.loads(out)
    assert sum(result["probs"].values()) == pytest.approx(1.0, abs=1e-5)
    assert result["path"] == str(scans / "b.nii")


def test_cli_folder_predicts_every_scan_and_reports_the_rest(checkpoint, scans, capsys):
    code, out, err = run_cli(capsys, scans, "--checkpoint", checkpoint, "--json")
    assert code == 0
    assert [r["path"] for r in json.loads(out)] == [str(scans / "a.nii.gz"), str(scans / "b.nii")]
    assert "notes.txt: skipped" in err


# ----------------------------------------------------------------------------------------
# which model: the run folder of the notebooks (utils.paths.default_output_dir), or --checkpoint
# ----------------------------------------------------------------------------------------

def test_the_default_run_folder_follows_the_notebooks_rule(tmp_path):
    kaggle = tmp_path / "kaggle" / "working"
    assert default_output_dir({}, kaggle) == ROOT / "outputs"  # not on Kaggle: the repository's, whatever the cwd
    kaggle.mkdir(parents=True)
    assert default_output_dir({}, kaggle) == kaggle / "outputs"
    environ = {"MEDISCOPE_OUTPUT_DIR": str(tmp_path / "mine")}
    assert default_output_dir(environ, kaggle) == tmp_path / "mine"
    for env in ({}, environ):  # the notebooks resolve their OUTPUT_DIR with the same function
        assert resolve_parameters(profile="smoke", environ=env, kaggle_working=kaggle, kaggle_input=tmp_path).output_dir \
            == default_output_dir(env, kaggle)


def test_cli_finds_the_model_of_the_run_folder(checkpoint, scans, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copyfile(checkpoint, run / "diffmic3d_enhanced_model.pth")
    monkeypatch.chdir(tmp_path)  # the current directory plays no part
    monkeypatch.setenv("MEDISCOPE_OUTPUT_DIR", str(run))
    code, out, _ = run_cli(capsys, scans / "a.nii.gz", "--json", "--samples", "1")
    assert code == 0 and len(json.loads(out)) == 1
    monkeypatch.delenv("MEDISCOPE_OUTPUT_DIR")
    code, out, _ = run_cli(capsys, scans / "a.nii.gz", "--output-dir", run, "--json", "--samples", "1")
    assert code == 0 and len(json.loads(out)) == 1
    code, _, err = run_cli(capsys, scans / "a.nii.gz", "--output-dir", run, "--checkpoint", tmp_path / "absent.pth")
    assert code == 1 and "absent.pth" in err  # --checkpoint wins over the run folder


def test_cli_without_a_model_names_the_folder_and_how_to_choose_another(scans, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MEDISCOPE_OUTPUT_DIR", str(tmp_path / "empty_run"))
    code, out, err = run_cli(capsys, scans / "a.nii.gz")
    assert code == 1 and out == "" and err.count("\n") == 1 and err.startswith("error: ")
    assert str(tmp_path / "empty_run") in err and "diffmic3d_enhanced_model.pth" in err
    assert all(hint in err for hint in ("python -m utils.run", "--output-dir", "--checkpoint"))


def test_cli_dicom_series_folder(checkpoint, capsys):
    code, out, err = run_cli(capsys, DATA / "example_ct_dicom", "--checkpoint", checkpoint, "--json")
    assert code == 0, err
    assert json.loads(out)[0]["path"] == str(DATA / "example_ct_dicom")


def test_cli_bad_scans_are_reported_and_good_ones_still_predicted(checkpoint, scans, tmp_path, capsys):
    folder = tmp_path / "mixed"
    write_nifti(folder / "good.nii.gz", toy_ct())
    (folder / "corrupt.nii.gz").write_bytes(b"\x1f\x8b\x08\x00 truncated gzip")
    code, out, err = run_cli(capsys, folder, tmp_path / "absent.nii.gz", "--checkpoint", checkpoint, "--json")
    assert code == 1
    assert [Path(r["path"]).name for r in json.loads(out)] == ["good.nii.gz"]
    note, *lines = err.splitlines()
    assert note.startswith("Research use only") and len(lines) == 2 and all(line.startswith("error: ") for line in lines)
    assert str(folder / "corrupt.nii.gz") in lines[0] and "absent.nii.gz: file not found" in lines[1]


def test_cli_as_subprocess(checkpoint, scans):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # see single_thread
    proc = subprocess.run([sys.executable, "-m", "utils.predict", str(scans / "a.nii.gz"), "--checkpoint",
                           str(checkpoint), "--json", "--device", "cpu"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    (result,) = json.loads(proc.stdout)
    assert result["predicted_class"] in CLASS_NAMES
    bad = subprocess.run([sys.executable, "-m", "utils.predict", str(scans / "a.nii.gz"), "--checkpoint",
                          str(scans / "absent.pth")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.count("\n") == 1 and "python -m utils.run" in bad.stderr


# ----------------------------------------------------------------------------------------
# input not in Hounsfield units; out-of-distribution flag
# ----------------------------------------------------------------------------------------

def test_a_scan_not_in_hu_is_refused_unless_allowed_then_marked(checkpoint, tmp_path, capsys):
    raw = write_nifti(tmp_path / "uint8.nii.gz", np.clip((toy_ct(seed=1) + 1000) / 8, 0, 255).astype(np.uint8))
    code, out, err = run_cli(capsys, raw, "--checkpoint", checkpoint)
    assert code == 1 and out == "" and err.count("\n") == 2 and err.startswith("Research use only")
    assert "not a CT in Hounsfield units" in err and "--allow-non-hu" in err
    code, out, err = run_cli(capsys, raw, "--checkpoint", checkpoint, "--allow-non-hu")
    assert code == 0 and "OUT OF DISTRIBUTION: not Hounsfield units" in out
    code, out, _ = run_cli(capsys, raw, "--checkpoint", checkpoint, "--allow-non-hu", "--json")
    record = json.loads(out)[0]
    assert record["out_of_distribution"] is True and "Hounsfield" in record["ood_reasons"][0]


def test_feature_distance_flags_scans_unlike_the_training_scans(tmp_path, scans):
    """The flag follows the stored training statistics: a scan beyond the threshold is marked
    with its distance, one within it is not; a file without statistics reports None."""
    config = ModelConfig.tiny(input_shape=INPUT_SHAPE)
    model, meta = load_model(write_checkpoint(tmp_path / "m.pth", config), "cpu")
    plain = predict_scan(model, meta, scans / "a.nii.gz", num_samples=1)
    assert plain["out_of_distribution"] is False and plain["feature_distance"] is None
    features = []
    for seed in range(3, 9):  # "training scans": toy CTs like the test scans
        volume = torch.from_numpy(preprocess(toy_ct(seed=seed), meta.preprocess))[None]
        features.append(model.guidance(volume).global_features)
    stats = fit_feature_stats(torch.cat(features))
    model, meta = load_model(write_checkpoint(tmp_path / "stats.pth", config, feature_stats=stats), "cpu")
    near = predict_scan(model, meta, scans / "a.nii.gz", num_samples=1)
    assert near["feature_distance"] > 0 and near["feature_threshold"] == pytest.approx(stats["threshold"])
    far_stats = {**stats, "threshold": near["feature_distance"] / 2}
    model, meta = load_model(write_checkpoint(tmp_path / "far.pth", config, feature_stats=far_stats), "cpu")
    far = predict_scan(model, meta, scans / "a.nii.gz", num_samples=1)
    assert far["out_of_distribution"] and "unlike the training scans" in far["ood_reasons"][0]
    assert far["feature_distance"] == pytest.approx(near["feature_distance"])
    assert near["out_of_distribution"] is (near["feature_distance"] > stats["threshold"])


@pytest.mark.parametrize("source, words", [
    ({"kind": "mosmeddata", "root": "data/MosMedData", "n_scans": 100, "synthetic": True},
     "trained on synthetic chest-CT phantoms (100 scans), not real patients"),
    ({"kind": "mosmeddata", "root": "/kaggle/input/mosmed/MosMedData", "n_scans": 1110, "synthetic": False},
     "trained on the dataset folder 'MosMedData' (1110 scans)"),
])
def test_the_research_note_names_the_training_data(tmp_path, scans, capsys, source, words):
    path = write_checkpoint(tmp_path / "model.pth", ModelConfig.tiny(input_shape=INPUT_SHAPE), data_source=source)
    code, out, err = run_cli(capsys, scans / "a.nii.gz", "--checkpoint", path, "--samples", "1", "--json")
    assert code == 0 and err.startswith("Research use only, not for diagnosis") and words in err
    assert words in json.loads(out)[0]["note"]


def test_refer_when_the_uncertainty_is_above_the_stored_threshold(tmp_path, scans):
    """The referral threshold comes with the model (chosen on the validation split in training);
    a scan above it is marked REFER in the text and ``refer: true`` in the JSON."""
    config = ModelConfig.tiny(input_shape=INPUT_SHAPE).with_changes(diffusion={"num_samples": 2})
    torch.manual_seed(0)
    state = DiffMIC3D(config)
    torch.nn.init.normal_(state.denoiser.head.out.weight, std=0.1)
    results = {}
    for name, refer_at in (("never", float("inf")), ("always", -1e9)):
        state.set_thresholds(decision=0.4, refer=refer_at)
        path = write_checkpoint(tmp_path / f"{name}.pth", config, state_dict=state.state_dict())
        model, meta = load_model(path)
        results[name] = predict_scan(model, meta, scans / "a.nii.gz", seed=0)
    never, always = results["never"], results["always"]
    assert never["refer"] is False and always["refer"] is True
    assert never["uncertainty"] == pytest.approx(always["uncertainty"]) and never["decision_threshold"] == pytest.approx(0.4)
    assert "REFER" in format_result(always) and "REFER" not in format_result(never)
    # the class is decided at the stored threshold, not at 0.5
    p_pos = always["probs"][CLASS_NAMES[1]]
    assert always["predicted_class"] == CLASS_NAMES[int(p_pos >= 0.4)]


def test_the_referral_score_is_the_one_the_model_file_names(tmp_path, scans):
    """A model file names the score its referral threshold is on (the decision risk since it was
    stored); one written before that has a margin threshold and is read with the margin."""
    config = ModelConfig.tiny(input_shape=INPUT_SHAPE).with_changes(diffusion={"num_samples": 2})
    results = {}
    for name, score in (("risk", "risk"), ("older", ...)):
        path = write_checkpoint(tmp_path / f"{name}.pth", config, refer_score=score)
        model, meta = load_model(path)
        results[name] = predict_scan(model, meta, scans / "a.nii.gz", seed=0)
    risk, older = results["risk"], results["older"]
    assert risk["refer_score"] == "risk" and older["refer_score"] == "margin"
    p_pos, t = risk["probs"][CLASS_NAMES[1]], risk["decision_threshold"]
    assert risk["probs"] == older["probs"]
    assert risk["uncertainty"] == pytest.approx(1 - p_pos if p_pos >= t else p_pos)
    assert older["uncertainty"] == pytest.approx(-abs(math.log(p_pos / (1 - p_pos)) - math.log(t / (1 - t))), rel=1e-5)
    path = write_checkpoint(tmp_path / "bad.pth", config, refer_score="coin")
    with pytest.raises(DataError, match="refer_score 'coin'"):
        load_model(path)
