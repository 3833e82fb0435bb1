"""The composed DiffMIC-3D: config round trips and consistency, shapes, determinism,
checkpoints, what runs once per volume and what once per step, and that the whole two-phase
recipe can fit a tiny problem.

(The method's own guards -- no label leak between grid points, the prediction comes from the
condition, phase 2 learns -- are in test_diffusion_method.py.)"""
import json

import pytest
import torch

from helpers import SHAPE, BlobVolumes
from models.dcg_config import DCGConfig
from models.diffmic3d import DiffMIC3D, ModelConfig
from models.prior_generator import PriorConfig
from utils.training.precise_bn import recompute_batchnorm_stats

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(num_classes=2, seed=0, trained_head=True):
    """A tiny model in eval mode; ``trained_head``: the head's zero-initialised correction layer
    gets random weights, as after training (untrained, the head returns its prior M exactly)."""
    torch.manual_seed(seed)
    model = DiffMIC3D(ModelConfig.tiny(num_classes, input_shape=SHAPE)).eval()
    if trained_head:
        torch.nn.init.normal_(model.denoiser.head.out.weight, std=0.1)
    return model


def scans(batch, seed=0):
    return torch.randn(batch, 1, *SHAPE, generator=torch.Generator().manual_seed(seed))


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# config ------------------------------------------------------------------------------------


def test_config_round_trips_through_json_and_weights_only_load(tmp_path):
    cfg = ModelConfig.tiny(5, input_shape=SHAPE)
    data = json.loads(json.dumps(cfg.to_dict()))
    assert ModelConfig.from_dict(data) == cfg
    torch.save({"model_config": cfg.to_dict()}, tmp_path / "c.pt")
    assert ModelConfig.from_dict(torch.load(tmp_path / "c.pt", weights_only=True)["model_config"]) == cfg


def test_shared_sizes_propagate_from_create():
    cfg = ModelConfig.create(num_classes=5, input_shape=(64, 64, 32), grid_size=4, feature_dim=64)
    assert cfg.dcg.num_classes == cfg.prior.num_classes == cfg.denoiser.num_classes == cfg.num_classes == 5
    assert cfg.prior.grid_size == cfg.denoiser.grid_size == cfg.grid_size == 4
    assert cfg.prior.feature_dim == cfg.denoiser.feature_dim == 64
    assert cfg.prior.global_dim == cfg.dcg.feature_dim and cfg.prior.roi_dim == cfg.dcg.local_dim
    assert cfg.prior.num_rois == cfg.dcg.num_rois and cfg.dcg.input_shape == (64, 64, 32)


@pytest.mark.parametrize("preset, grid", [(ModelConfig.tiny, 4), (ModelConfig.small, 8), (ModelConfig.full, 8)])
def test_presets_are_consistent_and_propagate_to_the_denoiser(preset, grid):
    cfg = preset(num_classes=5)
    assert cfg.dcg.num_classes == cfg.prior.num_classes == cfg.denoiser.num_classes == 5
    assert cfg.prior.grid_size == cfg.denoiser.grid_size == grid
    assert cfg.prior.feature_dim == cfg.denoiser.feature_dim
    assert cfg.prior.global_dim == cfg.dcg.feature_dim and cfg.prior.roi_dim == cfg.dcg.local_dim
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda c: ModelConfig(dcg=DCGConfig(num_classes=5), prior=c.prior, denoiser=c.denoiser,
                               diffusion=c.diffusion),
         "dcg.num_classes=5 != prior.num_classes=2"),
        (lambda c: ModelConfig(dcg=c.dcg, prior=PriorConfig(grid_size=4), denoiser=c.denoiser,
                               diffusion=c.diffusion),
         "prior.grid_size=4 != denoiser.grid_size=8"),
        (lambda c: ModelConfig.create(denoiser=dict(num_classes=3)), r"create\(\) arguments"),
        (lambda c: ModelConfig.create(dcg=dict(input_shape=(32, 32, 32))), r"create\(\) arguments"),
        (lambda c: ModelConfig.from_dict({"dcg": {}}), "sections"),
    ],
)
def test_inconsistent_configs_error(build, match):
    with pytest.raises(ValueError, match=match):
        build(ModelConfig.full())


@pytest.mark.parametrize("changes, expected", [
    (dict(dcg={"num_rois": 3}), {"dcg.num_rois": 3, "prior.num_rois": 3}),
    (dict(dcg={"global_channels": (8, 16, 16, 48), "feature_dim": 48, "local_channels": (8, 24), "local_dim": 24}),
     {"prior.global_dim": 48, "prior.roi_dim": 24}),
    (dict(num_classes=3), {"dcg.num_classes": 3, "prior.num_classes": 3, "denoiser.num_classes": 3}),
    (dict(grid_size=2, feature_dim=8), {"prior.grid_size": 2, "denoiser.grid_size": 2, "denoiser.feature_dim": 8}),
    (dict(diffusion={"num_samples": 7}), {"diffusion.num_samples": 7, "diffusion.ddim_steps": 5}),
])
def test_with_changes_rebuilds_a_consistent_config(changes, expected):
    base = ModelConfig.tiny()
    changed = base.with_changes(**changes)
    for path, value in expected.items():
        section, name = path.split(".")
        assert getattr(getattr(changed, section), name) == value, path
    assert changed.denoiser.head_kernel == base.denoiser.head_kernel  # the rest is kept
    assert base.with_changes() == base


@pytest.mark.parametrize("changes, match", [
    (dict(dcg={"num_classes": 3}), r"dcg has no settable fields \['num_classes'\]"),
    (dict(prior={"num_rois": 3}), r"prior has no settable fields \['num_rois'\]"),
    (dict(priors={"blend": "fitted"}), "unknown arguments"),
    (dict(diffusion={"ddim_steps": 0}), "ddim_steps"),
])
def test_with_changes_refuses_derived_or_unknown_fields(changes, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ModelConfig.tiny().with_changes(**changes)


def test_presets_by_name():
    assert ModelConfig.preset("small", 3, (32, 32, 16)) == ModelConfig.small(num_classes=3, input_shape=(32, 32, 16))
    with pytest.raises(ValueError, match="unknown model preset"):
        ModelConfig.preset("huge")


def test_inconsistent_config_lists_every_mismatch():
    c = ModelConfig.full()
    with pytest.raises(ValueError) as info:
        ModelConfig(dcg=DCGConfig(num_classes=5), prior=PriorConfig(grid_size=4), denoiser=c.denoiser,
                     diffusion=c.diffusion)
    message = str(info.value)
    for mismatch in ("dcg.num_classes=5 != prior.num_classes=2", "dcg.num_classes=5 != denoiser.num_classes=2",
                     "prior.grid_size=4 != denoiser.grid_size=8"):
        assert mismatch in message, message


def test_full_preset_param_table():
    model = DiffMIC3D(ModelConfig.full())
    counts = model.param_counts()
    assert set(counts) == {"dcg_global", "dcg_local", "prior_generator", "image_encoder", "condition_unet",
                           "point_head", "total"}
    # every parameter is counted in exactly one component
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total")
    assert 6e6 < counts["total"] < 12e6
    assert 2e6 < counts["condition_unet"] < 6e6 and 1e6 < counts["dcg_global"] < 2.5e6
    assert 1e6 < counts["image_encoder"] < 2.5e6 and counts["point_head"] < 0.2e6
    table = model.format_param_table()
    assert table.count("\n") == 8  # header, rule, six components, total
    assert "Condition 3D U-Net" in table and "Per-point denoiser head" in table and "**Total**" in table
    assert f"({counts['total']:,})" in table


# behaviour ---------------------------------------------------------------------------------


@pytest.mark.parametrize("num_classes, batch", [(2, 1), (2, 3), (5, 1), (5, 3)])
def test_probabilities_shape_and_sum(num_classes, batch):
    model = tiny_model(num_classes)
    probs = model(scans(batch), generator=gen())
    assert probs.shape == (batch, num_classes)
    torch.testing.assert_close(probs.sum(1), torch.ones(batch))
    out = model.predict(scans(batch), num_samples=2, generator=gen(), return_trajectory=True)
    steps = model.config.diffusion.ddim_steps
    assert out["probs"].shape == out["std"].shape == (batch, num_classes)
    assert out["samples"].shape == out["y0_mean"].shape == (2, batch, num_classes)
    assert out["entropy"].shape == (batch,) and out["timesteps"].shape == (steps,)
    assert out["trajectory"].shape == (2, steps + 1, batch, num_classes)
    torch.testing.assert_close(out["samples"].sum(-1), torch.ones(2, batch))
    torch.testing.assert_close(out["probs"], out["samples"].mean(0))
    torch.testing.assert_close(out["trajectory"][:, -1], out["samples"])  # the last state is the prediction
    assert (out["entropy"] >= 0).all() and (out["entropy"] <= torch.log(torch.tensor(num_classes)) + 1e-5).all()


@pytest.mark.parametrize("num_classes", [2, 5])
def test_probabilities_are_the_calibrated_log_of_the_grid_mean(num_classes):
    model = tiny_model(num_classes)
    probs = torch.softmax(torch.randn(3, 2, num_classes), -1)  # (S, B, C) grid means on the simplex
    y = probs[..., None, None, None] + 0.1 * torch.randn(3, 2, num_classes, *[model.config.grid_size] * 3)
    y = y - y.mean(dim=(-3, -2, -1), keepdim=True) + probs[..., None, None, None]  # grid mean exactly probs
    # identity readout: a y_0 whose grid mean is a distribution reads out as that distribution
    torch.testing.assert_close(model.probabilities(y), probs)
    bias = torch.linspace(-1, 1, num_classes)
    model.set_readout(2.0, bias.tolist())
    torch.testing.assert_close(model.probabilities(y), torch.softmax(2.0 * probs.log() + bias, -1))
    # values outside the simplex (a chain overshooting 0) are clipped, never NaN
    assert torch.isfinite(model.probabilities(-y)).all()
    with pytest.raises(ValueError, match="scale > 0"):
        model.set_readout(0.0, bias.tolist())
    with pytest.raises(ValueError, match="biases"):
        model.set_readout(1.0, [0.0] * (num_classes + 1))


def test_decisions_follow_the_stored_threshold():
    model = tiny_model()
    probs = torch.tensor([[0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    assert model.decide(probs).tolist() == [0, 0, 1]
    model.set_thresholds(decision=0.3)
    assert model.decide(probs).tolist() == [0, 1, 1]
    model.set_thresholds(refer=0.25)
    assert float(model.refer_threshold) == 0.25 and float(model.decision_threshold) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="decision threshold"):
        model.set_thresholds(decision=1.0)


@pytest.mark.parametrize("num_classes", [2, 5])
def test_training_loss_is_differentiable_and_reaches_denoiser_and_priors_not_the_dcg(num_classes):
    model = tiny_model(num_classes).train().freeze_dcg()
    x, labels = scans(3), torch.arange(3) % num_classes
    out = model.diffusion_loss(x, model.guidance(x), labels, generator=gen())
    assert set(out) == {"loss", "mse", "ce"} and out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    den = model.denoiser
    for name, module in (("image encoder", den.image_encoder), ("condition U-Net", den.unet),
                         ("point head", den.head), ("prior generator", model.prior_generator)):
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads), name
    assert model.prior_generator.gate_logits.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.dcg.parameters())
    assert not model.dcg.training  # frozen: eval mode kept


def test_prior_dropout_cuts_the_prior_generator_off():
    # every volume dropped: uniform M and zero F, so nothing flows back into the priors
    model = tiny_model().train().freeze_dcg()
    x = scans(2)
    loss = model.diffusion_loss(x, model.guidance(x), torch.tensor([0, 1]), prior_dropout=1.0, generator=gen())["loss"]
    loss.backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.prior_generator.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.denoiser.image_encoder.parameters())


def test_same_seed_same_probabilities_different_seed_different():
    model, x = tiny_model(), scans(2)
    a = model(x, generator=gen(3))
    b = model(x, generator=gen(3))
    c = model(x, generator=gen(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    model, x = tiny_model(5, seed=1), scans(2)
    model.set_readout(0.5, [0.1, 0.0, 0.0, 0.0, -0.1])
    model.set_thresholds(refer=0.2)
    for key in ("readout_scale", "readout_bias", "decision_threshold", "refer_threshold"):
        assert key in model.state_dict()  # learned state: saved with the weights
    path = tmp_path / "model.pt"
    torch.save({"model_config": model.config.to_dict(), "model_state_dict": model.state_dict()}, path)

    checkpoint = torch.load(path, weights_only=True)  # the module docstring's snippet, as written
    loaded = DiffMIC3D(ModelConfig.from_dict(checkpoint["model_config"]))
    loaded.load_state_dict(checkpoint["model_state_dict"])
    loaded.eval()
    assert float(loaded.readout_scale) == 0.5 and float(loaded.refer_threshold) == pytest.approx(0.2)
    assert torch.equal(loaded(x, generator=gen()), model(x, generator=gen()))
    other = DiffMIC3D.from_config_dict(checkpoint["model_config"]).eval()  # untrained: differs
    assert not torch.equal(other(x, generator=gen()), model(x, generator=gen()))


def count_calls(module, calls, name):
    module.register_forward_hook(lambda mod, args, out: calls.setdefault(name, []).append(args[0].shape[0]))


def test_dcg_and_condition_run_once_per_predict_the_point_head_once_per_step():
    model, x = tiny_model(), scans(2)
    den = model.denoiser
    calls = {}
    for name, module in (("dcg", model.dcg), ("image_encoder", den.image_encoder), ("unet", den.unet),
                         ("head", den.head)):
        count_calls(module, calls, name)
    direct = model.predict(x, steps=4, num_samples=3, generator=gen())
    # one DCG pass and one condition pass of the B volumes; the S chains run as one batch of
    # S * B through the per-point head, once per step
    assert calls == {"dcg": [2], "image_encoder": [2], "unet": [2], "head": [6] * 4}

    calls.clear()
    cache = model.guidance(x)
    assert calls == {"dcg": [2]}
    calls.clear()
    cached = model.predict(x, cache, steps=4, num_samples=3, generator=gen())
    assert "dcg" not in calls and calls["unet"] == [2] and len(calls["head"]) == 4
    for key in ("probs", "std", "samples", "y0_mean"):
        torch.testing.assert_close(cached[key], direct[key])

    calls.clear()
    model.predict(x, model.guidance(x), steps=7, num_samples=1, generator=gen())  # per call, not per step
    assert calls["dcg"] == [2] and calls["unet"] == [2] and calls["image_encoder"] == [2]
    assert calls["head"] == [2] * 7


# overfitting a tiny problem ----------------------------------------------------------------


def test_two_phase_training_overfits_a_tiny_problem():
    torch.manual_seed(0)
    model = DiffMIC3D(ModelConfig.tiny(input_shape=SHAPE))
    data = BlobVolumes(8, 0)
    x, labels = torch.from_numpy(data.images), torch.from_numpy(data.labels)

    # phase 1: the DCG alone
    opt = torch.optim.AdamW(model.dcg.parameters(), lr=3e-3)
    for _ in range(40):
        loss = model.dcg_loss(x, labels)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()

    # phase 2: frozen DCG with precise BatchNorm statistics (as utils.training.dcg), cached
    # guidance, diffusion loss on the scans
    recompute_batchnorm_stats(model.dcg, [x], lambda batch: model.dcg(batch))
    model.freeze_dcg()
    dcg_before = {k: v.clone() for k, v in model.dcg.state_dict().items()}
    cache = model.guidance(x)
    steps = 200
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = gen()
    first = None
    for _ in range(steps):
        out = model.diffusion_loss(x, cache, labels, generator=g)
        first = first if first is not None else out["mse"].item()
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        schedule.step()
    # the denoiser starts from the DCG's (already good) prior, so the error it can remove is small
    assert out["mse"].item() < 0.5 * first, (first, out["mse"].item())
    for key, value in model.dcg.state_dict().items():
        assert torch.equal(value, dcg_before[key]), key

    encoder = model.denoiser.image_encoder
    recompute_batchnorm_stats(encoder, [x], lambda batch: encoder(batch))
    model.eval()
    for seed in (0, 1):  # robust to the start noise, not one lucky draw
        probs = model.predict(x, cache, generator=gen(seed))["probs"]
        assert (probs.argmax(1) == labels).float().mean().item() == 1.0, probs


# prior members -------------------------------------------------------------------------------


def test_chains_are_spread_over_the_prior_members_each_reading_its_own_prior():
    """With fold DCGs kept, chain s reads member s mod m; an untrained head returns its prior M,
    so each chain's probabilities are its member's grid-mean prior, read out."""
    torch.manual_seed(0)
    model = DiffMIC3D(ModelConfig.tiny(input_shape=SHAPE).with_changes(fold_dcgs=2)).eval()
    assert model.num_members == 3 and len(model.fold_dcgs) == 2
    x = scans(2)
    members = model.member_guidance(x)
    assert len(members) == 3
    out = model.predict(x, members, num_samples=4, generator=gen())  # rounded up to 6 = 2 per member
    assert out["samples"].shape == (6, 2, 2) and out["member"].tolist() == [0, 1, 2, 0, 1, 2]
    for s, j in enumerate(out["member"].tolist()):
        expected = model.probabilities(model.priors(members[j]).guidance_map)
        torch.testing.assert_close(out["samples"][s], expected)
    assert not torch.allclose(out["samples"][0], out["samples"][1])  # the members disagree
    torch.testing.assert_close(model(x, generator=gen()), out["probs"])  # forward runs every member itself


def test_the_members_conditions_batched_equal_each_member_conditioned_alone():
    """``chain_conditions`` runs the priors and the condition U-Net for all members as one
    batch; row s*B + b is chain s of scan b reading member s mod m, as if conditioned alone."""
    torch.manual_seed(0)
    model = DiffMIC3D(ModelConfig.tiny(input_shape=SHAPE).with_changes(fold_dcgs=2)).eval()
    x = scans(2)
    with torch.no_grad():
        members = model.member_guidance(x)
        M_rep, cond_rep, member = model.chain_conditions(x, members, 6)
        assert M_rep.shape[0] == cond_rep.shape[0] == 12 and member.tolist() == [0, 1, 2, 0, 1, 2]
        for s, j in enumerate(member.tolist()):
            M, cond = model.condition(x, members[j])
            torch.testing.assert_close(M_rep[2 * s:2 * s + 2], M)
            torch.testing.assert_close(cond_rep[2 * s:2 * s + 2], cond, rtol=1e-4, atol=1e-5)


def test_predict_runs_in_inference_mode():
    torch.manual_seed(0)
    model = DiffMIC3D(ModelConfig.tiny(input_shape=SHAPE)).eval()
    out = model.predict(scans(1), num_samples=2, generator=gen())
    assert out["probs"].is_inference() and not out["probs"].requires_grad


def test_a_config_of_another_version_is_refused_not_filled_with_defaults():
    data = ModelConfig.tiny().to_dict()
    del data["denoiser"]["prior_residual"]
    with pytest.raises(ValueError, match=r"lacks \['prior_residual'\]"):
        ModelConfig.from_dict(data)
    with pytest.raises(ValueError, match="fold_dcgs must be 0 or >= 2"):
        ModelConfig.tiny().with_changes(fold_dcgs=1)
    with pytest.raises(ValueError, match="prior_residual=True needs"):
        ModelConfig.tiny().with_changes(diffusion={"parameterization": "eps", "zero_terminal_snr": False})


# deep supervision of the own image encoder --------------------------------------------------


def supervised(model_seed=0):
    """A tiny model whose own image encoder is deeply supervised (image_ce_weight 0.5)."""
    torch.manual_seed(model_seed)
    cfg = ModelConfig.tiny(input_shape=SHAPE).with_changes(denoiser={"image_ce_weight": 0.5})
    return DiffMIC3D(cfg)


def test_the_image_classifiers_cross_entropy_is_added_with_its_weight():
    model = supervised().train().freeze_dcg()
    x, labels = scans(4), torch.tensor([0, 1, 1, 0])
    weight = model.config.denoiser.image_ce_weight
    assert weight > 0
    out = model.diffusion_loss(x, model.guidance(x), labels, generator=gen())
    expected = torch.nn.functional.cross_entropy(model.denoiser.classify_image(model.denoiser.encode_image(x)), labels)
    torch.testing.assert_close(out["image_ce"], expected)
    model.config.denoiser.image_ce_weight = 0.0  # the same draws without the term
    plain = model.diffusion_loss(x, model.guidance(x), labels, generator=gen())
    assert "image_ce" not in plain
    torch.testing.assert_close(out["loss"] - plain["loss"], weight * expected)


def test_without_the_weight_there_is_no_image_classifier():
    cfg = ModelConfig.tiny(input_shape=SHAPE)  # the default: off
    model = DiffMIC3D(cfg)
    assert model.denoiser.image_classifier is None
    assert not any(k.startswith("denoiser.image_classifier") for k in model.state_dict())
    with pytest.raises(ValueError, match="image_ce_weight > 0"):
        model.denoiser.classify_image(torch.zeros(1, cfg.denoiser.image_dim, 4, 4, 4))
    with pytest.raises(ValueError, match="image_ce_weight"):
        ModelConfig.tiny(input_shape=SHAPE).with_changes(denoiser={"image_ce_weight": -1.0})


def test_a_config_written_before_the_image_classifier_loads_with_it_off():
    data = supervised().config.to_dict()
    del data["denoiser"]["image_ce_weight"]
    old = ModelConfig.from_dict(data)
    assert old.denoiser.image_ce_weight == 0.0 and DiffMIC3D(old).denoiser.image_classifier is None
    del data["denoiser"]["film"]  # any other missing field is still refused
    with pytest.raises(ValueError, match="lacks \\['film'\\]"):
        ModelConfig.from_dict(data)


def test_deep_supervision_teaches_the_own_encoder_the_classes_of_a_tiny_problem():
    # bright blob = class 1; the DCG is untrained, so its priors carry nothing: what the
    # image classifier learns comes from the scan through the encoder that phase 2 trains
    model = supervised().train().freeze_dcg()
    train, test = BlobVolumes(32, seed=1), BlobVolumes(32, seed=2)
    x, y = torch.stack([train[i]["image"] for i in range(32)]), torch.as_tensor(train.labels)
    guidance = model.guidance(x)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=3e-3)
    g = gen()
    for _ in range(30):
        opt.zero_grad()
        model.diffusion_loss(x, guidance, y, generator=g)["loss"].backward()
        opt.step()
    encoder = model.denoiser.image_encoder  # precise BatchNorm statistics, as phase 2 does before validating
    recompute_batchnorm_stats(encoder, [x], lambda batch: encoder(batch))
    model.eval()
    with torch.no_grad():
        xt = torch.stack([test[i]["image"] for i in range(32)])
        logits = model.denoiser.classify_image(model.denoiser.encode_image(xt))
    accuracy = (logits.argmax(1).numpy() == test.labels).mean()
    assert accuracy >= 0.8, accuracy
