"""scripts/external_test.py: finished runs score new scans once, each model at its run's validation
threshold; scans of the runs themselves and the runs' own phantom streams are refused; the
report pools the seeds on their shared scans."""
import csv
import shutil

import numpy as np
import pytest

from utils.benchmarking.pooled import read_split
from utils.benchmarking.report import DCG_FUSED, OURS
from utils.run import run_experiment
from utils.training.profiles import get_profile
from utils.training.readout import REFER_SCORE
from helpers import load_script

external = load_script("external_test")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two seeds' finished smoke runs on one phantom set, and a report over 10 new phantoms."""
    tmp = tmp_path_factory.mktemp("external")
    for seed in (0, 1):
        config = get_profile("smoke", progress=False, baselines=(), seed=seed, phantom_dir=str(tmp / "phantoms"))
        run_experiment(config, tmp / "runs" / f"quality_smoke_seed{seed}", cache_dir=tmp / "cache", device="cpu")
    args = [str(tmp / "runs"), str(tmp / "phantoms"), str(tmp / "new"), "--phantoms", "10", "--phantom-seed", "7",
            "--out", str(tmp / "out"), "--n-resamples", "1000"]
    assert external.main(args) == 0
    return tmp, args


def _predictions(tmp, seed):
    return tmp / "out" / "external_runs" / "new" / f"quality_smoke_seed{seed}" / "predictions.csv"


def test_every_model_scores_every_new_scan_at_its_validation_threshold(runs):
    tmp, _ = runs
    new = sorted(p.relative_to(tmp / "new").as_posix() for p in (tmp / "new").rglob("study_*.nii.gz"))
    assert len(new) == 10
    for seed in (0, 1):
        split = read_split(_predictions(tmp, seed).parent)
        assert sorted(split.paths) == new  # the new scans, and none of the run's own
        assert split.labels.tolist() == [int(p.startswith("CT-23")) for p in split.paths]
        val = read_split(tmp / "runs" / f"quality_smoke_seed{seed}", "val_predictions.csv").models
        assert set(split.models) == set(val)
        for name, model in split.models.items():
            assert model.threshold == pytest.approx(val[name].threshold)
            assert np.allclose(model.probs.sum(1), 1)
        assert OURS in split.models and DCG_FUSED in split.models


def test_the_seeds_share_the_scans_so_the_report_pools_them_with_delong(runs):
    tmp, _ = runs
    text = (tmp / "out" / "quality_phantoms_external_new.md").read_text()
    assert "10 new scans, 5 positive, scored by seeds 0, 1" in text
    assert "`python scripts/external_test.py RUNS_DIR " in text and "new --phantoms 10 --phantom-seed 7`" in text
    assert "### External ROC-AUC" in text and "| DiffMIC-3D − DCG without diffusion |" in text
    assert "DeLong" in text and "DeLong skipped" not in text
    rows = list(csv.DictReader(open(tmp / "out" / "quality_phantoms_external_new.csv")))
    assert {"goal", "paired AUC difference", "auc"} <= {r["table"] for r in rows}
    assert (tmp / "out" / "risk_coverage_phantoms_external_new.png").stat().st_size > 0


def test_a_scored_seed_is_read_and_never_scored_again(runs, monkeypatch):
    tmp, args = runs
    before = _predictions(tmp, 0).read_text()

    def no_scoring(*a, **k):
        raise AssertionError("scored twice")

    monkeypatch.setattr("utils.pipeline.predict_split", no_scoring)
    assert external.main(args) == 0
    assert _predictions(tmp, 0).read_text() == before


def test_another_external_set_is_not_mixed_into_the_scored_one(runs):
    tmp, args = runs
    shutil.copytree(tmp / "new", tmp / "elsewhere" / "new")
    moved = [args[0], args[1], str(tmp / "elsewhere" / "new"), "--out", str(tmp / "out")]
    with pytest.raises(SystemExit, match="another external set"):
        external.main(moved)


def test_the_runs_own_scans_and_phantom_streams_are_refused(runs):
    tmp, args = runs
    with pytest.raises(SystemExit, match="seed of the runs' own phantoms"):
        external.main([*args[:3], "--phantoms", "10", "--phantom-seed", "0"])
    leaked = tmp / "leaked"
    shutil.copytree(tmp / "new", leaked)
    own = next((tmp / "phantoms" / "CT-23").glob("study_*.nii.gz"))
    shutil.copy(own, leaked / "CT-23" / "study_9999.nii.gz")
    with pytest.raises(SystemExit, match="1 external scans are scans of the run itself"):
        external.main([*args[:2], str(leaked), "--out", str(tmp / "out_leaked")])
    with pytest.raises(SystemExit, match="go together"):
        external.main([*args[:3], "--phantoms", "10"])


def test_the_referral_is_the_runs_validation_threshold_applied_to_the_new_scans(runs):
    from utils.benchmarking.quality import open_finished_run

    tmp, _ = runs
    run_dir = tmp / "runs" / "quality_smoke_seed0"
    split = read_split(_predictions(tmp, 0).parent)
    r = external.referral(run_dir, split)
    _, model = open_finished_run(run_dir, str(tmp / "phantoms"))
    assert r["threshold"] == pytest.approx(float(model.refer_threshold)) and r["score"] == REFER_SCORE == "risk"
    referred = split.models[OURS].scores["risk"] > float(model.refer_threshold)
    assert r["referred"] == pytest.approx(referred.mean())
    if 0 < referred.mean() < 1:  # all = kept and referred, weighted by their shares
        assert r["accuracy"] == pytest.approx(r["kept"] * (1 - r["referred"]) + r["referred_accuracy"] * r["referred"])
    text = (tmp / "out" / "quality_phantoms_external_new.md").read_text()
    assert "### Referral" in text and f"| 0 | risk | {r['threshold']:.3f} | 0.80 | {r['referred']:.3f} |" in text


def test_the_inference_ablations_score_the_same_new_scans_once(runs, monkeypatch):
    from utils.benchmarking.ablations import INFERENCE

    tmp, args = runs
    assert external.main([*args, "--ablations"]) == 0
    text = (tmp / "out" / "quality_phantoms_external_new.md").read_text()
    assert "### Inference-only ablations on the external scans (seeds 0, 1" in text and "--ablations`" in text
    for seed in (0, 1):
        with np.load(_predictions(tmp, seed).parent / "ablations.npz") as saved:
            assert sorted(saved.files) == sorted(INFERENCE)
            assert all(saved[v].shape == (10, 2) and np.allclose(saved[v].sum(1), 1) for v in INFERENCE)
    for variant in INFERENCE:
        assert f"| {variant} | " in text

    def no_sampling(*a, **k):
        raise AssertionError("ablations scored twice")

    monkeypatch.setattr("utils.training.diffusion.predict_dataset", no_sampling)
    assert external.main([*args, "--ablations"]) == 0


def test_ablations_of_other_scans_than_the_predictions_are_refused(runs, tmp_path):
    tmp, _ = runs
    split = read_split(_predictions(tmp, 0).parent)
    split.paths = split.paths[::-1]  # the same scans in another order
    with pytest.raises(SystemExit, match="are not those of"):
        external.ablate_run(tmp / "runs" / "quality_smoke_seed0", str(tmp / "phantoms"), tmp / "new", tmp_path, split)


def test_a_medmnist_run_is_refused_in_one_line(tmp_path):
    from types import SimpleNamespace

    exp = SimpleNamespace(layout="medmnist", output_dir=tmp_path / "quality_adrenalmnist3d_seed0")
    with pytest.raises(SystemExit, match="quality_adrenalmnist3d_seed0 ran on a MedMNIST .npz"):
        external.external_dataset(exp, tmp_path)


def test_a_folder_without_labelled_scans_is_one_line_on_stderr(runs, tmp_path, capsys):
    tmp, args = runs
    assert external.main([*args[:2], str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no MosMedData scans found" in err and "Traceback" not in err


def test_an_ablation_cache_without_a_newer_variant_is_completed_not_recomputed(runs):
    from utils.benchmarking.ablations import NO_CORRECTION

    tmp, args = runs
    assert external.main([*args, "--ablations"]) == 0
    path = _predictions(tmp, 0).parent / "ablations.npz"
    with np.load(path) as saved:
        full = {k: saved[k] for k in saved.files}
    older = {k: np.full_like(v, 0.5) for k, v in full.items() if k != NO_CORRECTION}  # marked: kept as they are
    np.savez(path, **older)  # as written before the variant was added
    assert external.main([*args, "--ablations"]) == 0
    with np.load(path) as saved:
        assert sorted(saved.files) == sorted(full)
        assert all(np.array_equal(saved[k], v) for k, v in older.items())  # read, not recomputed
        assert np.allclose(saved[NO_CORRECTION], full[NO_CORRECTION], atol=1e-6)  # the same seed, the same draws
    np.savez(path, **full)
