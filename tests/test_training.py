"""Phase 1 and the guidance cache on a tiny model and a tiny separable problem.

Phase 2 and the temperature (``utils.training.diffusion``) are tested in
test_diffusion_training.py and test_diffusion_method.py."""
from dataclasses import replace

import pytest
import torch

from helpers import SHAPE, BlobVolumes
from models.dcg_model import DCGOutput
from models.diffmic3d import DiffMIC3D
from utils.training.checkpoint import load_checkpoint
from utils.training.precise_bn import bn_stats_loader, recompute_batchnorm_stats
from utils.training.profiles import get_profile
from utils.training.dcg import cache_guidance, dcg_lr_factor, dcg_steps_per_epoch, train_dcg

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def config():
    return get_profile("smoke", input_shape=SHAPE, dcg_epochs=5, diffusion_epochs=2, patience=5, batch_size=4,
                       lr_dcg=3e-3, progress=False)


def count_dcg_calls(model):
    calls = []
    model.dcg.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    return calls


def test_phase1_loss_decreases_and_checkpoint_completes(tmp_path, config):
    torch.manual_seed(0)
    model = DiffMIC3D(config.model_config("cpu"))
    result = train_dcg(model, BlobVolumes(16, 0), BlobVolumes(8, 1), config, torch.device("cpu"),
                       tmp_path / "dcg.pth", meta={"label_mode": "binary"})
    losses = result.history["train_loss"]
    assert len(losses) == result.epochs_run >= 3
    assert min(losses[-2:]) < losses[0] - 0.1, losses
    ckpt = load_checkpoint(tmp_path / "dcg.pth")
    assert ckpt["fit"]["complete"] and ckpt["label_mode"] == "binary"
    assert ckpt["model_config"] == {"dcg": model.config.dcg.to_dict()}  # the section the DCG depends on


def test_phase1_keeps_precise_batchnorm_statistics(tmp_path, config):
    # the kept DCG's BatchNorm statistics are the training-split average for its weights
    # (recomputed before every evaluation over the shuffled, seeded bn_stats_loader), not the
    # running estimate of the last batches
    torch.manual_seed(0)
    model = DiffMIC3D(config.model_config("cpu"))
    train = BlobVolumes(12, 0)
    train_dcg(model, train, BlobVolumes(8, 1), replace(config, dcg_epochs=2, patience=5), torch.device("cpu"),
              tmp_path / "dcg.pth")
    bns = [m for m in model.dcg.global_encoder.modules() if isinstance(m, torch.nn.BatchNorm3d)]
    kept = [m.running_mean.clone() for m in bns]
    kept_var = [m.running_var.clone() for m in bns]
    loader = bn_stats_loader(train, config.batch_size, config.seed)
    assert recompute_batchnorm_stats(model.dcg, loader, lambda b: model.dcg(b["image"])) == len(bns) > 0
    for before, before_var, m in zip(kept, kept_var, bns):
        assert torch.allclose(before, m.running_mean, atol=1e-5)
        assert torch.allclose(before_var, m.running_var, atol=1e-5)


def test_phase1_lr_schedule_warmup_then_cosine():
    factors = [dcg_lr_factor(step, 100, 0.05) for step in range(100)]
    assert factors[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert factors[5] == 1.0 and all(a >= b for a, b in zip(factors[5:], factors[6:]))
    assert factors[-1] < 1e-3
    assert dcg_steps_per_epoch(16, 4) == 4 and dcg_steps_per_epoch(17, 4) == 4 and dcg_steps_per_epoch(18, 4) == 5


def test_phase1_sets_lr_per_step_from_epoch_and_batch(tmp_path, config):
    # the lr of each step is a function of (epoch, batch index) only; the logged lr of an
    # epoch is that of its last step (no ReduceLROnPlateau in phase 1)
    cfg = replace(config, dcg_epochs=3, patience=5)
    torch.manual_seed(0)
    model = DiffMIC3D(cfg.model_config("cpu"))
    result = train_dcg(model, BlobVolumes(8, 0), BlobVolumes(4, 1), cfg, torch.device("cpu"), tmp_path / "a.pth")
    per_epoch = dcg_steps_per_epoch(8, cfg.batch_size)
    expected = [cfg.lr_dcg * dcg_lr_factor((e + 1) * per_epoch - 1, 3 * per_epoch, cfg.dcg_lr_warmup)
                for e in range(3)]
    assert result.history["lr"] == pytest.approx(expected)


def test_cache_guidance_runs_the_dcg_once_per_volume_in_index_order(config):
    torch.manual_seed(0)
    model = DiffMIC3D(config.model_config("cpu"))
    data = BlobVolumes(6, 2)
    calls = count_dcg_calls(model)
    cache = cache_guidance(model, data, torch.device("cpu"), batch_size=4, progress=False)
    assert sum(calls) == len(data) and calls == [4, 2]
    assert isinstance(cache, DCGOutput) and len(cache) == 6 and cache.global_probs.shape == (6, 2)
    single = model.guidance(data[4]["image"][None])
    for name, value in single.as_dict().items():  # every field, row 4 = the volume alone
        torch.testing.assert_close(getattr(cache, name)[4], value[0].to(getattr(cache, name).dtype), atol=1e-5,
                                   rtol=1e-5, msg=name)
