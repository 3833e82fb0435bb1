"""The composed DiffMIC-3D: config round trips, shapes, determinism, checkpoints, caching,
and that the whole two-phase recipe can fit a tiny problem."""
import json

import pytest
import torch

from models.dcg_model import DCGConfig
from models.diffmic3d import DiffMIC3D, ModelConfig
from models.prior_generator import PriorConfig
from utils.precise_bn import recompute_batchnorm_stats

SHAPE = (32, 32, 16)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(num_classes=2, seed=0):
    torch.manual_seed(seed)
    return DiffMIC3D(ModelConfig.tiny(num_classes, SHAPE)).eval()


def scans(batch, seed=0):
    return torch.randn(batch, 1, *SHAPE, generator=torch.Generator().manual_seed(seed))


# config ------------------------------------------------------------------------------------


def test_config_round_trips_through_json_and_weights_only_load(tmp_path):
    cfg = ModelConfig.tiny(5, SHAPE)
    data = json.loads(json.dumps(cfg.to_dict()))
    assert ModelConfig.from_dict(data) == cfg
    torch.save({"model_config": cfg.to_dict()}, tmp_path / "c.pt")
    assert ModelConfig.from_dict(torch.load(tmp_path / "c.pt", weights_only=True)["model_config"]) == cfg


def test_shared_sizes_propagate_from_create():
    cfg = ModelConfig.create(num_classes=5, input_shape=(64, 64, 32), grid_size=4, feature_dim=64)
    assert cfg.dcg.num_classes == cfg.prior.num_classes == cfg.unet.num_classes == 5
    assert cfg.prior.grid_size == cfg.unet.grid_size == 4
    assert cfg.prior.feature_dim == cfg.unet.feature_dim == 64
    assert cfg.prior.global_dim == cfg.dcg.feature_dim and cfg.prior.roi_dim == cfg.dcg.local_dim


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda c: ModelConfig(dcg=DCGConfig(num_classes=5), prior=c.prior, unet=c.unet, diffusion=c.diffusion),
         "dcg.num_classes=5 != prior.num_classes=2"),
        (lambda c: ModelConfig(dcg=c.dcg, prior=PriorConfig(grid_size=4), unet=c.unet, diffusion=c.diffusion),
         "prior.grid_size=4 != unet.grid_size=8"),
        (lambda c: ModelConfig.create(unet=dict(num_classes=3)), r"create\(\) arguments"),
        (lambda c: ModelConfig.from_dict({"dcg": {}}), "sections"),
    ],
)
def test_inconsistent_configs_error(build, match):
    with pytest.raises(ValueError, match=match):
        build(ModelConfig.seed())


def test_seed_param_table():
    model = DiffMIC3D(ModelConfig.seed())
    counts = model.param_counts()
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total")
    assert 15e6 < counts["unet"] < 21e6 and 1.5e6 < counts["dcg_global"] < 2.5e6
    table = model.format_param_table()
    assert table.count("\n") == 7 and "3D U-Net denoiser" in table


# behaviour ---------------------------------------------------------------------------------


@pytest.mark.parametrize("num_classes, batch", [(2, 1), (2, 3), (5, 1), (5, 3)])
def test_probabilities_shape_and_sum(num_classes, batch):
    model = tiny_model(num_classes)
    probs = model(scans(batch), training=False, generator=torch.Generator().manual_seed(0))
    assert probs.shape == (batch, num_classes)
    torch.testing.assert_close(probs.sum(1), torch.ones(batch))
    out = model.predict(scans(batch), num_samples=2, generator=torch.Generator().manual_seed(0),
                        return_trajectory=True)
    steps = model.config.diffusion.ddim_steps
    assert out["samples"].shape == (2, batch, num_classes) and out["entropy"].shape == (batch,)
    assert out["trajectory"].shape == (2, steps + 1, batch, num_classes)


@pytest.mark.parametrize("num_classes", [2, 5])
def test_training_forward_returns_differentiable_loss(num_classes):
    model = tiny_model(num_classes).train().freeze_dcg()
    labels = torch.arange(3) % num_classes
    out = model(scans(3), training=True, labels=labels, generator=torch.Generator().manual_seed(0))
    assert set(out) == {"loss", "mse", "ce"} and out["loss"].ndim == 0
    out["loss"].backward()
    assert model.unet.stem.weight.grad is not None and model.head.weight.grad is not None
    assert model.prior_generator.gate_logits.grad is not None
    assert all(p.grad is None for p in model.dcg.parameters())
    with pytest.raises(ValueError, match="labels"):
        model(scans(3), training=True)


def test_same_seed_same_probabilities_different_seed_different():
    model, x = tiny_model(), scans(2)
    a = model(x, generator=torch.Generator().manual_seed(3))
    b = model(x, generator=torch.Generator().manual_seed(3))
    c = model(x, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    model, x = tiny_model(5, seed=1), scans(2)
    path = tmp_path / "model.pt"
    torch.save({"model_config": model.config.to_dict(), "model_state_dict": model.state_dict()}, path)

    checkpoint = torch.load(path, weights_only=True)  # the README snippet, as written
    loaded = DiffMIC3D(ModelConfig.from_dict(checkpoint["model_config"]))
    loaded.load_state_dict(checkpoint["model_state_dict"])
    loaded.eval()
    assert torch.equal(loaded(x, training=False, generator=torch.Generator().manual_seed(0)),
                       model(x, training=False, generator=torch.Generator().manual_seed(0)))
    other = DiffMIC3D.from_config_dict(checkpoint["model_config"]).eval()  # untrained: differs
    assert not torch.equal(other(x, generator=torch.Generator().manual_seed(0)),
                           model(x, generator=torch.Generator().manual_seed(0)))


def test_dcg_runs_once_per_predict_and_cached_guidance_matches():
    model, x = tiny_model(), scans(2)
    calls = {"dcg": 0, "unet": 0}
    model.dcg.register_forward_hook(lambda *_: calls.__setitem__("dcg", calls["dcg"] + 1))
    model.unet.register_forward_hook(lambda *_: calls.__setitem__("unet", calls["unet"] + 1))
    direct = model.predict(x, steps=10, num_samples=3, generator=torch.Generator().manual_seed(0))
    assert calls == {"dcg": 1, "unet": 10}  # one DCG pass, one batched U-Net pass per step
    cache = model.guidance(x).as_dict()
    cached = model.predict(cache, steps=10, num_samples=3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(cached["probs"], direct["probs"])


# overfitting a tiny problem ----------------------------------------------------------------


def blob_volumes(n=8, seed=0):
    """n noisy volumes (n, 1, 32, 32, 16); odd ones carry a bright ball of radius 3 (label 1)."""
    g = torch.Generator().manual_seed(seed)
    x = 0.1 * torch.randn(n, 1, *SHAPE, generator=g)
    labels = torch.arange(n) % 2
    grid = torch.meshgrid(*(torch.arange(s, dtype=torch.float32) for s in SHAPE), indexing="ij")
    for i in range(1, n, 2):
        centre = [torch.randint(6, s - 6, (1,), generator=g).item() for s in SHAPE]
        r2 = sum((axis - c) ** 2 for axis, c in zip(grid, centre))
        x[i, 0] += (r2 <= 9).float()
    return x, labels


def test_two_phase_training_overfits_a_tiny_problem():
    torch.manual_seed(0)
    model = DiffMIC3D(ModelConfig.tiny(2, SHAPE))
    x, labels = blob_volumes()

    # phase 1: the DCG alone
    opt = torch.optim.AdamW(model.dcg.parameters(), lr=3e-3)
    for _ in range(30):
        loss = model.dcg_loss(x, labels)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()

    # phase 2: frozen DCG with precise BatchNorm statistics (as utils.training), cached
    # guidance, diffusion loss
    recompute_batchnorm_stats(model.dcg, [x], lambda batch: model.dcg(batch))
    model.freeze_dcg()
    cache = model.guidance(x).as_dict()
    steps = 800
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(0)
    first = None
    for _ in range(steps):
        out = model.diffusion_loss(cache, labels, generator=g)
        first = first if first is not None else out["mse"].item()
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        schedule.step()
    assert out["mse"].item() < 0.25 * first

    model.eval()
    for seed in (0, 1):  # robust to the start noise, not one lucky draw
        probs = model.predict(x, generator=torch.Generator().manual_seed(seed))["probs"]
        assert (probs.argmax(1) == labels).float().mean().item() == 1.0
