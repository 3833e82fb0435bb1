"""scripts/crossfit_correction.py: every training scan is predicted by a phase-2 model that did
not train on it, from the prior of the out-of-fold DCG that did not train on it; the result is
cached and the report pools seeds and scans."""
import json
import re

import numpy as np
import pytest

from utils.run import run_experiment
from utils.training.profiles import get_profile
from helpers import load_script

crossfit = load_script("crossfit_correction")


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("crossfit")
    config = get_profile("smoke", progress=False, baselines=(), phantom_dir=str(tmp / "phantoms"))
    run_experiment(config, tmp / "runs" / "quality_smoke_seed0", cache_dir=tmp / "cache", device="cpu")
    return tmp


@pytest.fixture(scope="module")
def crossfitted(smoke_runs):
    """The default's cross-fitted predictions, and the training scans each fold's phase 2 saw."""
    import utils.training.diffusion as diffusion

    seen, real = [], diffusion.train_diffusion

    def recording(net, train_set, *args, **kwargs):
        seen.append(np.asarray(train_set.indices))
        return real(net, train_set, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:  # module-scoped: the function-scoped fixture is not available
        patch.setattr(diffusion, "train_diffusion", recording)
        result = crossfit.crossfit_run(smoke_runs / "runs" / "quality_smoke_seed0", str(smoke_runs / "phantoms"),
                                       crossfit.DEFAULT, smoke_runs / "out")
    return result, seen


def test_every_training_scan_is_predicted_once_by_a_model_that_did_not_train_on_it(crossfitted, smoke_runs):
    result, seen = crossfitted
    n = len(result["rows"])
    assert sorted(result["rows"].tolist()) == list(range(n))
    assert len(seen) == len(result["kept"]) == 2  # the smoke profile's two folds
    for k, trained_on in enumerate(seen):
        held = result["rows"][result["fold"] == k]
        assert len(held) and not set(held.tolist()) & set(trained_on.tolist())
        assert sorted(set(held.tolist()) | set(trained_on.tolist())) == list(range(n))
    for key in ("prior", "corrected"):
        assert result[key].shape == (n, 2) and np.allclose(result[key].sum(1), 1, atol=1e-5)
    assert result["kept"].dtype == bool


def test_the_folds_are_the_out_of_fold_dcgs_folds(crossfitted, smoke_runs):
    """Fold k's prior is fold DCG k's own prediction (the model keeps the fold DCGs as members 1..K)."""
    from utils.benchmarking.quality import open_finished_run
    from utils.pipeline import cache_split_guidance

    result, _ = crossfitted
    exp, model = open_finished_run(smoke_runs / "runs" / "quality_smoke_seed0", str(smoke_runs / "phantoms"))
    for k in range(len(result["kept"])):
        member = cache_split_guidance(exp, model, ("train",), member=k + 1)["train"].fused_probs.numpy()
        rows = result["fold"] == k
        assert np.allclose(result["prior"][rows], member[result["rows"][rows]], atol=1e-6)
        other = cache_split_guidance(exp, model, ("train",), member=2 - k)["train"].fused_probs.numpy()
        assert not np.allclose(result["prior"][rows], other[result["rows"][rows]], atol=1e-6)


def test_a_finished_crossfit_is_read_from_its_cache(crossfitted, smoke_runs, monkeypatch):
    import utils.training.diffusion as diffusion

    def no_training(*args, **kwargs):
        raise AssertionError("the cached result should have been read")

    monkeypatch.setattr(diffusion, "train_diffusion", no_training)
    again = crossfit.crossfit_run(smoke_runs / "runs" / "quality_smoke_seed0", str(smoke_runs / "phantoms"),
                                  crossfit.DEFAULT, smoke_runs / "out")
    for key, value in crossfitted[0].items():
        assert np.array_equal(again[key], value)


def test_the_command_line_writes_the_report(crossfitted, smoke_runs, capsys):
    assert crossfit.main([str(smoke_runs / "runs"), str(smoke_runs / "phantoms"), "--out",
                          str(smoke_runs / "out"), "--n-resamples", "1000"]) == 0
    text = (smoke_runs / "out" / "crossfit.md").read_text()
    assert "| default | 0 |" in text and "default: cross-fitted minus its prior alone" in text
    assert text.split("\n\n", 1)[1] == capsys.readouterr().out.rstrip("\n") + "\n"


def test_an_unknown_variant_fails_before_any_training(smoke_runs):
    with pytest.raises(SystemExit, match="unknown variant 'bigger'"):
        crossfit.main([str(smoke_runs / "runs"), str(smoke_runs / "phantoms"), "--variant", "bigger"])


def test_no_finished_run_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no finished run"):
        crossfit.seed_runs(tmp_path)


def test_a_folder_with_both_datasets_runs_gives_the_named_datasets_and_never_guesses(tmp_path):
    """The quality benchmark's run folder holds AdrenalMNIST3D and phantom runs of the same seeds."""
    for name in ("quality_adrenalmnist3d_seed0", "quality_adrenalmnist3d_seed1", "quality_phantoms300_seed0"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "val_predictions.csv").write_text("x\n")
    assert crossfit.seed_runs(tmp_path, data="adrenal") == {0: tmp_path / "quality_adrenalmnist3d_seed0",
                                                            1: tmp_path / "quality_adrenalmnist3d_seed1"}
    assert crossfit.seed_runs(tmp_path, [0], "phantoms") == {0: tmp_path / "quality_phantoms300_seed0"}
    assert crossfit.seed_runs(tmp_path, [1], str(tmp_path / "scans")) == {1: tmp_path / "quality_adrenalmnist3d_seed1"}
    with pytest.raises(SystemExit, match="seed 0: several finished runs"):
        crossfit.seed_runs(tmp_path, data=str(tmp_path / "scans"))
    with pytest.raises(SystemExit, match="no finished run"):
        crossfit.seed_runs(tmp_path, [1], "phantoms")


def _synthetic(rng, labels, quality):
    """Probabilities whose positive-class score separates the classes by ``quality``."""
    score = 1 / (1 + np.exp(-(quality * (labels - 0.5) * 4 + rng.normal(size=labels.size))))
    return np.stack([1 - score, score], 1)


def test_the_report_pools_seeds_and_compares_variants_on_the_same_scans():
    rng = np.random.default_rng(0)
    labels = (rng.random(200) < 0.3).astype(int)
    rows = np.arange(200)

    def run(prior_q, corrected_q):
        return {"rows": rows, "labels": labels, "fold": rows % 2, "prior": _synthetic(rng, labels, prior_q),
                "corrected": _synthetic(rng, labels, corrected_q), "kept": np.array([True, False])}

    results = {"default": {s: run(0.2, 2.0) for s in (0, 1)}, "fine-encoder": {s: run(0.2, 0.2) for s in (0, 1)}}
    text = crossfit.report(results, n_resamples=1000)
    assert text.count("| default |") == 2 and "| 1/2 |" in text
    intervals = {line.split(":")[0][2:]: tuple(float(x) for x in re.search(r"\[([-+0-9.]+), ([-+0-9.]+)\]", line).groups())
                 for line in text.splitlines() if line.startswith("- ")}
    assert intervals["default"][0] > 0  # a much better corrected score than its prior: the interval is above 0
    assert intervals["fine-encoder minus default, cross-fitted"][1] < 0  # ... and the weaker variant below it
    reordered = {k: v if k == "kept" else v[::-1] for k, v in results["fine-encoder"][0].items()}
    results["fine-encoder"][0] = reordered  # the same scans in another order: paired by scan, same figures
    assert crossfit.report(results, n_resamples=1000) == text
    results["fine-encoder"][0] = {k: v if k == "kept" else v[1:] for k, v in reordered.items()}  # a scan short
    with pytest.raises(SystemExit, match="different scans"):
        crossfit.report(results, n_resamples=1000)


def test_within_folds_a_correction_that_ranks_each_fold_well_counts_though_its_folds_pool_badly():
    """Each fold's model ranks its own scans better than the prior, but fold 1 outputs on another
    scale: pooled over the folds the ranking breaks (the decision's reading), within folds it does
    not (the second reading), and the per-seed column is the mean of the folds' own differences."""
    rng = np.random.default_rng(1)
    labels = (rng.random(400) < 0.3).astype(int)
    rows, fold = np.arange(400), np.arange(400) % 2
    prior = _synthetic(rng, labels, 0.3)
    good = _synthetic(rng, labels, 3.0)[:, 1]
    score = np.where(fold == 1, 0.9 + 0.1 * good, 0.1 * good)  # fold 1's model: every score above fold 0's
    run = {"rows": rows, "labels": labels, "fold": fold, "prior": prior,
           "corrected": np.stack([1 - score, score], 1), "kept": np.array([True, True])}
    text = crossfit.report({"default": {0: run, 1: run}}, n_resamples=1000)
    intervals = {line.split(":")[0][2:]: tuple(float(x) for x in re.search(r"\[([-+0-9.]+), ([-+0-9.]+)\]", line).groups())
                 for line in text.splitlines() if line.startswith("- ")}
    assert intervals["default, within folds"][0] > 0 and intervals["default"][0] < intervals["default, within folds"][0]
    assert "4 seed-folds" in text
    inside = np.mean([crossfit.auc(labels[fold == k], run["corrected"][fold == k])
                      - crossfit.auc(labels[fold == k], prior[fold == k]) for k in (0, 1)])
    assert f"| {inside:+.4f} | 2/2 |" in text


def test_the_readout_probe_reads_the_crossfit_folds_and_priors(crossfitted, smoke_runs, capsys):
    """scripts/readout_probe.py on a finished run: fold k's scans carry fold DCG k's prior, as in the
    cross-fit, and its report sets the readouts beside the cached cross-fitted correction."""
    probe = load_script("readout_probe")
    result, _ = crossfitted
    run, phantoms, out = smoke_runs / "runs" / "quality_smoke_seed0", str(smoke_runs / "phantoms"), smoke_runs / "out"
    inputs = probe.probe_inputs(run, phantoms, out)
    n = len(result["rows"])
    assert np.array_equal(inputs["fold"][result["rows"]], result["fold"])
    assert np.allclose(inputs["prior"][result["rows"]], result["prior"], atol=1e-6)
    assert np.array_equal(inputs["labels"][result["rows"]], result["labels"])
    assert inputs["dcg"].shape[0] == n and inputs["morphometry"].shape == (n, len(probe.MORPHOMETRY))
    assert np.isfinite(inputs["morphometry"]).all() and (out / run.name / "probe_inputs.npz").is_file()
    capsys.readouterr()  # the run's loading messages
    assert probe.main([str(smoke_runs / "runs"), phantoms, "--out", str(out), "--features", "none", "morphometry",
                       "--n-resamples", "1000"]) == 0
    text = (out / "readout_probe.md").read_text()
    assert "| 0 |" in text and "readout (morphometry) minus the cross-fitted correction" in text
    assert text.split("\n\n", 1)[1] == capsys.readouterr().out.rstrip("\n") + "\n"


def test_the_seed_ensemble_averages_the_seeds_out_of_fold_priors_and_ranks_above_each():
    """Three seeds' priors: one signal, each with its own noise. Averaged they rank the scans better
    than any one; each seed keeps its folds and features, and the report carries the averaged prior."""
    probe = load_script("readout_probe")
    rng = np.random.default_rng(0)
    labels = np.arange(300) % 2
    signal = 1.5 * (labels - 0.5)

    def inputs(seed):
        p = 1 / (1 + np.exp(-(signal + rng.normal(scale=1.5, size=300))))
        return {"labels": labels, "fold": (np.arange(300) + seed) % 3, "prior": np.column_stack([1 - p, p]),
                "morphometry": rng.normal(size=(300, 3))}

    runs = {s: inputs(s) for s in range(3)}
    ensemble = probe.seed_ensemble(runs)
    mean = np.mean([r["prior"] for r in runs.values()], axis=0)
    for s in runs:
        np.testing.assert_allclose(ensemble[s]["prior"], mean)
        assert ensemble[s]["fold"] is runs[s]["fold"] and ensemble[s]["morphometry"] is runs[s]["morphometry"]
        assert crossfit.auc(labels, mean) > crossfit.auc(labels, runs[s]["prior"]) + 0.02
    text = probe.report(ensemble, {s: probe.probe_run(r, ["none"], s) for s, r in ensemble.items()}, {}, 1000)
    assert f"| 0 | 300 | {crossfit.auc(labels, mean):.4f} |" in text and "readout (none) minus its prior alone" in text
    runs[1] = {**runs[1], "labels": 1 - labels}
    with pytest.raises(SystemExit, match="training scans differ"):
        probe.seed_ensemble(runs)


def test_the_seed_ensemble_needs_two_seeds_and_says_so_before_any_work(smoke_runs):
    probe = load_script("readout_probe")
    with pytest.raises(SystemExit, match="2 or more seeds"):
        probe.main([str(smoke_runs / "runs"), str(smoke_runs / "phantoms"), "--out", str(smoke_runs / "ens"),
                    "--seed-ensemble"])
    assert not (smoke_runs / "ens").exists()


def test_the_prior_branches_are_read_on_the_crossfit_folds_and_the_map_weighs_the_local_prior_by_the_mean_distance(
        crossfitted, smoke_runs, capsys):
    """scripts/prior_branches.py: the same folds and fused prior as the cross-fit; the guidance map's
    grid mean is (1 - w) p_g + w p_l with the run's fitted weight w, which is not the fused
    (p_g + p_l) / 2."""
    import torch

    branches = load_script("prior_branches")
    result, _ = crossfitted
    run, phantoms = smoke_runs / "runs" / "quality_smoke_seed0", str(smoke_runs / "phantoms")
    probs = branches.branch_probs(run, phantoms)
    assert np.array_equal(probs["fold"][result["rows"]], result["fold"])
    assert np.allclose(probs["fused (DCG)"][result["rows"]], result["prior"], atol=1e-6)
    g, loc = probs["global prior"], probs["local prior"]
    saved = torch.load(run / "diffmic3d_enhanced_model.pth", weights_only=True)
    d = float(saved["model_state_dict"]["prior_generator.local_weight"])  # fitted before its phase 2
    assert np.allclose(probs["guidance-map grid mean"], (1 - d) * g + d * loc, atol=1e-5)
    if abs(d - 0.5) > 0.02:  # the fused prediction weighs the local prior 1/2
        assert not np.allclose(probs["guidance-map grid mean"], probs["fused (DCG)"], atol=1e-3)
    capsys.readouterr()
    assert branches.main([str(smoke_runs / "runs"), phantoms, "--out", str(smoke_runs / "out")]) == 0
    text = (smoke_runs / "out" / "prior_branches.md").read_text()
    assert "| guidance-map grid mean |" in text and "| 0 |" in text and "| mean |" in text


def test_the_fitted_blend_is_chosen_without_the_fold_it_scores_and_drops_a_useless_local_prior():
    branches = load_script("prior_branches")
    rng = np.random.default_rng(0)
    labels = (rng.random(600) < 0.3).astype(int)
    fold = np.arange(600) % 3
    g = _synthetic(rng, labels, 1.0)
    noise = rng.random(600)
    local = np.stack([1 - noise, noise], 1)  # carries no signal
    blend, weights = branches.held_out_blend(labels, fold, g, local)
    assert all(w <= 0.1 for w in weights) and abs(blend - branches.within_fold_auc(labels, fold, g)) < 0.01
    useful = g.copy()
    useful[fold == 0] = local[fold == 0]  # fold 0's global prior is noise: the blend fitted without it
    _, weights = branches.held_out_blend(labels, fold, useful, g)  # ... still trusts the "global" input
    assert weights[0] <= 0.1 and weights[1] >= 0.5 and weights[2] >= 0.5
    by_seed = {0: {"labels": labels, "fold": fold, "global prior": g, "local prior": local, "fused (DCG)": (g + local) / 2,
                   "guidance-map grid mean": 0.4 * g + 0.6 * local}}
    text = branches.report(by_seed)
    assert "| fitted blend (held out) |" in text and f"| {blend:.4f} |" in text


def test_a_finished_run_reopens_with_the_overrides_it_was_trained_with(tmp_path):
    # runs trained with --set baselines=() (the cross-fit's seeds) used to be refused as "another configuration"
    from dataclasses import replace

    from utils.benchmarking.quality import dataset_setup, run_setup
    from utils.paths import TRAIN_CONFIG_JSON

    _, base, adrenal = dataset_setup("adrenal")
    trained = replace(base, seed=7, baselines=())
    (tmp_path / TRAIN_CONFIG_JSON).write_text(json.dumps(trained.to_dict()))
    config, data = run_setup(tmp_path, "adrenal")
    assert config == trained and config.baselines == () and data == adrenal
    assert run_setup(tmp_path, str(tmp_path / "scans"))[1] == tmp_path / "scans"
