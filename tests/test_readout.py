"""The readout of DiffMIC-3D fitted on the validation split (``utils.training.readout``):
Platt / vector scaling with a bias on the log of the grid-mean y_0, the decision threshold and
the referral threshold; and phase 2's DiffMIC-v2 loss weights and warmed-up EMA
(``utils.training.diffusion``)."""
import copy
import warnings

import numpy as np
import pytest
import torch

from helpers import SHAPE, BlobVolumes
from models.dcg_model import DCGOutput
from models.diffmic3d import DiffMIC3D, ModelConfig
from utils.evaluation.thresholds import youden_threshold
from utils.training.dcg import cache_guidance
from utils.training.diffusion import error_weights, predict_dataset, prior_label_slope, warmup_ema_fn
from utils.training.profiles import get_profile
from utils.training.readout import calibrate_readout, diffmic_uncertainty, fit_readout

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


def platt_data(a0, b0, n=4000, samples=3, seed=0, prevalence_shift=0.0):
    """y0_mean (S, N, 2) whose calibrated probability is sigmoid(a0 * logit(q) + b0), labels drawn from it."""
    g = torch.Generator().manual_seed(seed)
    q = torch.sigmoid(1.5 * torch.randn(n, generator=g) + prevalence_shift)  # the raw p(class 1)
    p_true = torch.sigmoid(a0 * torch.logit(q) + b0)
    labels = (torch.rand(n, generator=g) < p_true).long()
    y0 = torch.stack([1 - q, q], dim=-1).expand(samples, -1, -1).clone()  # every chain agrees
    return y0, labels


def test_fit_readout_recovers_a_known_platt_scaling():
    y0, labels = platt_data(a0=2.0, b0=-1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an interior optimum: no warning
        scale, bias = fit_readout(y0, labels)
    assert scale == pytest.approx(2.0, rel=0.1)
    assert bias[1] - bias[0] == pytest.approx(-1.0, abs=0.15)  # only the difference of the biases matters


def test_a_bias_fixes_the_threshold_of_a_probability_map_read_as_logits():
    """The failure it replaces: y_0 values in [0, 1] divided by a temperature as if they were
    logits, with no bias, put a 23%-positive task on the wrong side of 0.5."""
    y0, labels = platt_data(a0=1.0, b0=-1.2, prevalence_shift=0.0)
    scale, bias = fit_readout(y0, labels)
    z = torch.log(y0.clamp(min=1e-3))
    calibrated = torch.softmax(scale * z + torch.tensor(bias), dim=-1).mean(0)
    raw = y0.mean(0)
    nll = lambda p: float(-p[torch.arange(len(labels)), labels].log().mean())  # noqa: E731
    assert nll(calibrated) < nll(raw) - 0.02
    # calibration in the large: the mean probability is the prevalence (the raw map's is not)
    prevalence = float(labels.float().mean())
    assert abs(float(calibrated[:, 1].mean()) - prevalence) < 0.02 < abs(float(raw[:, 1].mean()) - prevalence)


def test_fit_readout_on_a_separable_split_stays_finite_and_warns_on_its_bound():
    labels = torch.arange(20) % 2
    q = 0.2 + 0.6 * labels.float()  # perfectly separated
    y0 = torch.stack([1 - q, q], -1).expand(2, -1, -1)
    scale, bias = fit_readout(y0, labels)  # the small penalty keeps it finite and inside its bounds
    assert 1 < scale < 20 and all(np.isfinite(bias))
    barely = 0.48 + 0.04 * labels.float()  # separated by a hair: only the bound stops the scale
    with pytest.warns(RuntimeWarning, match="bound"):
        scale, _ = fit_readout(torch.stack([1 - barely, barely], -1).expand(2, -1, -1), labels, l2=0.0)
    assert scale == pytest.approx(20.0, rel=0.01)


def test_fit_readout_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"\(S, N, C\)"):
        fit_readout(torch.rand(2, 5, 2), torch.zeros(4, dtype=torch.long))


@pytest.fixture(scope="module")
def val_setup():
    torch.manual_seed(0)
    model = DiffMIC3D(ModelConfig.tiny(input_shape=SHAPE)).eval().freeze_dcg()
    torch.nn.init.normal_(model.denoiser.head.out.weight, std=0.3)  # as trained (zero-initialised)
    val = BlobVolumes(12, 1)
    return model, val, cache_guidance(model, val, CPU, progress=False)


def test_calibrate_readout_stores_its_fit_on_the_model_and_is_deterministic(val_setup):
    model, val, guidance = val_setup
    config = get_profile("smoke", input_shape=SHAPE, batch_size=4, progress=False)
    before = predict_dataset(model, val, guidance, CPU, config.batch_size, config.seed)
    val = copy.copy(val)  # labels that agree with the untrained ranking in 3 of 4 scans: an interior optimum
    val.labels = np.array([int(before["probs"][i].argmax()) ^ int(i % 4 == 0) for i in range(len(val))])
    out = calibrate_readout(model, val, guidance, config, CPU)
    scale, bias = fit_readout(before["y0_mean"], val.labels)  # the fit on the samples drawn as the test's are
    assert out["scale"] == pytest.approx(scale) and out["bias"] == pytest.approx(bias)
    assert float(model.readout_scale) == pytest.approx(scale)
    after = predict_dataset(model, val, guidance, CPU, config.batch_size, config.seed)
    torch.testing.assert_close(after["y0_mean"], before["y0_mean"])  # the readout acts after the chains
    assert out["decision_threshold"] == pytest.approx(
        np.clip(youden_threshold(val.labels, after["probs"].numpy()), 1e-6, 1 - 1e-6))
    assert float(model.decision_threshold) == pytest.approx(out["decision_threshold"])
    kept = diffmic_uncertainty(after, out["decision_threshold"]) <= out["refer_threshold"]
    assert kept.mean() >= config.refer_coverage  # the referral threshold keeps >= 80% of the validation scans
    model.set_readout(3.0, [1.0, -1.0])  # deterministic: a resumed run refits the same values
    assert calibrate_readout(model, val, guidance, config, CPU) == out


def test_error_weights_follow_diffmic_v2():
    probs = torch.tensor([[0.9, 0.1], [0.3, 0.7], [0.5, 0.5]])
    g = DCGOutput(**{k: torch.zeros(3) for k in DCGOutput.__dataclass_fields__})
    g.fused_probs = probs
    weights = error_weights(g, torch.tensor([0, 0, 1]), 10.0)
    torch.testing.assert_close(weights, torch.tensor([1 + 10 * 0.1, 1 + 10 * 0.7, 1 + 10 * 0.5]))
    label_free = error_weights(g, torch.tensor([0, 0, 1]), 10.0, "uncertainty")
    torch.testing.assert_close(label_free, torch.tensor([1 + 10 * 0.1, 1 + 10 * 0.3, 1 + 10 * 0.5]))
    torch.testing.assert_close(label_free, error_weights(g, torch.tensor([1, 1, 0]), 10.0, "uncertainty"))
    with pytest.raises(ValueError, match="error weighting mode"):
        error_weights(g, torch.tensor([0, 0, 1]), 10.0, "labels")


def test_error_weights_can_teach_phase_2_to_invert_an_overconfident_weak_prior():
    """The mechanism behind the demo's inverted DiffMIC-3D (README, "What the benchmark found"):
    weights that depend on the label reweight the classes differently at every prior value, so
    the weighted-MSE optimum given the prior can fall as the prior rises; weights that depend on
    the prior alone (its own uncertainty) keep the sign."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 4000)
    logit = 0.6 * (2 * y - 1) + 3.0 * rng.normal(size=y.size)  # weak (AUC ~0.6) and overconfident
    p1 = 1 / (1 + np.exp(-logit))
    probs = np.stack([1 - p1, p1], axis=1)
    g = DCGOutput(**{k: torch.zeros(y.size) for k in DCGOutput.__dataclass_fields__})
    g.fused_probs = torch.as_tensor(probs, dtype=torch.float32)
    weighted = error_weights(g, torch.as_tensor(y), 10.0).numpy()
    label_free = error_weights(g, torch.as_tensor(y), 10.0, "uncertainty").numpy()
    assert prior_label_slope(probs, y) > 0.03
    assert prior_label_slope(probs, y, weighted) < -0.03
    assert prior_label_slope(probs, y, label_free) > 0.03
    # a strong prior keeps a positive slope under the error weights
    p_good = 1 / (1 + np.exp(-(2.5 * (2 * y - 1) + rng.normal(size=y.size))))
    good = np.stack([1 - p_good, p_good], axis=1)
    g.fused_probs = torch.as_tensor(good, dtype=torch.float32)
    assert prior_label_slope(good, y, error_weights(g, torch.as_tensor(y), 10.0).numpy()) > 0.3
    with pytest.raises(ValueError, match="weights must be"):
        prior_label_slope(probs, y, -weighted)


def test_the_ema_decay_is_warmed_up():
    update = warmup_ema_fn(0.995)
    ema, new = [torch.zeros(3)], [torch.ones(3)]
    update(ema, new, torch.tensor(1))  # after the first copy: decay (1 + 1) / (10 + 1)
    torch.testing.assert_close(ema[0], torch.full((3,), 1 - 2 / 11))
    late = [torch.zeros(1)]
    update(late, [torch.ones(1)], torch.tensor(10_000))  # late: the configured decay
    torch.testing.assert_close(late[0], torch.full((1,), 0.005))
    with pytest.raises(ValueError):
        warmup_ema_fn(1.5)


def test_an_inverted_phase_2_is_reported_not_silently_shipped(caplog):
    """The demo run once selected a phase-2 epoch with validation AUC 0.22: the run must say so."""
    from utils.training.readout import warn_if_inverted

    inverted = {"val_auc": [0.77, 0.25, 0.22], "best_epoch": 3}
    with caplog.at_level("WARNING"):
        message = warn_if_inverted(inverted)
    assert message is not None and "validation AUC is 0.220 (below chance)" in message
    assert "error_weighting='label'" in caplog.text
    assert warn_if_inverted({"val_auc": [0.77, 0.8], "best_epoch": 2}) is None
    assert warn_if_inverted({"val_auc": [float("nan")], "best_epoch": 1}) is None  # one class in val


def test_the_inversion_warning_reads_the_model_kept(caplog):
    """After check_correction the model kept is the prior ensemble where the correction was
    switched off; the pipeline passes phase 2's history.json entry (it once passed the bare
    per-epoch series, without the selected epoch, so the warning never fired)."""
    from utils.pipeline import history_entry
    from utils.training.loop import FitResult
    from utils.training.readout import warn_if_inverted

    switched_off = {"val_auc_trained": 0.27, "val_auc_prior_only": 0.75, "kept": False}
    series = {"val_auc": [0.75, 0.27], "correction_check": switched_off}
    assert warn_if_inverted({**series, "best_epoch": 2}) is None  # the prior ensemble, 0.75, is kept
    bad_prior = {**switched_off, "val_auc_prior_only": 0.3}
    with caplog.at_level("WARNING"):
        message = warn_if_inverted({**series, "correction_check": bad_prior, "best_epoch": 2})
    assert message is not None and "prior ensemble" in message and "0.300" in message
    kept = {"val_auc_trained": 0.27, "val_auc_prior_only": 0.2, "kept": True}
    result = FitResult(history={"val_auc": [0.75, 0.27], "correction_check": kept},
                       best={"epoch": 2, "val_auc": 0.27}, epochs_run=2, stopped_early=False)
    assert "selected epoch 2" in warn_if_inverted(history_entry(result))
