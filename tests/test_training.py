"""Phase 1, the guidance cache and phase 2 on a tiny model and a tiny separable problem."""
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from helpers import SHAPE, BlobVolumes
from models.diffmic3d import GUIDANCE_KEYS, DiffMIC3D
from utils.checkpoint import load_checkpoint
from utils.precise_bn import recompute_batchnorm_stats
from utils.profiles import get_profile
from utils.training import cache_guidance, calibrate_temperature, predict_guidance, train_dcg, train_diffusion

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
    assert ckpt["model_config"] == model.config.to_dict()


def test_phase1_keeps_precise_batchnorm_statistics(tmp_path, config):
    # the kept DCG's BatchNorm statistics are the training-split average for its weights
    # (recomputed before every evaluation), not the running estimate of the last batches
    torch.manual_seed(0)
    model = DiffMIC3D(config.model_config("cpu"))
    train = BlobVolumes(12, 0)
    train_dcg(model, train, BlobVolumes(8, 1), replace(config, dcg_epochs=2, patience=5), torch.device("cpu"),
              tmp_path / "dcg.pth")
    bns = [m for m in model.dcg.global_encoder.modules() if isinstance(m, torch.nn.BatchNorm3d)]
    kept = [m.running_mean.clone() for m in bns]
    loader = DataLoader(train, batch_size=config.batch_size)
    assert recompute_batchnorm_stats(model.dcg, loader, lambda b: model.dcg(b["image"])) == len(bns) > 0
    for before, m in zip(kept, bns):
        assert torch.allclose(before, m.running_mean, atol=1e-5)


def test_cache_guidance_runs_the_dcg_once_per_volume_in_index_order(config):
    torch.manual_seed(0)
    model = DiffMIC3D(config.model_config("cpu"))
    data = BlobVolumes(6, 2)
    calls = count_dcg_calls(model)
    cache = cache_guidance(model, data, torch.device("cpu"), batch_size=4, progress=False)
    assert sum(calls) == len(data) and calls == [4, 2]
    assert set(GUIDANCE_KEYS) <= set(cache) and cache["global_probs"].shape == (6, 2)
    single = model.guidance(data[4]["image"][None])
    assert torch.allclose(cache["global_probs"][4], single.global_probs[0], atol=1e-5)
    assert torch.allclose(cache["roi_features"][4], single.roi_features[0], atol=1e-5)


def test_phase2_trains_on_cached_guidance_without_running_the_dcg(tmp_path, config):
    torch.manual_seed(0)
    model = DiffMIC3D(config.model_config("cpu"))
    train, val = BlobVolumes(8, 0), BlobVolumes(4, 1)
    train_cache = cache_guidance(model, train, torch.device("cpu"), progress=False)
    val_cache = cache_guidance(model, val, torch.device("cpu"), progress=False)
    dcg_before = {k: v.clone() for k, v in model.dcg.state_dict().items()}
    calls = count_dcg_calls(model)
    result = train_diffusion(model, train_cache, torch.from_numpy(train.labels), val_cache,
                             torch.from_numpy(val.labels), config, torch.device("cpu"), tmp_path / "diffusion.pth")
    assert calls == [] and result.epochs_run == 2
    assert all(np.isfinite(result.history["train_loss"])) and 0 <= result.history["val_auc"][0] <= 1
    for key, value in model.dcg.state_dict().items():  # frozen
        assert torch.equal(value, dcg_before[key])
    groups = load_checkpoint(tmp_path / "diffusion.pth")
    assert groups["fit"]["complete"]


def test_temperature_is_fitted_on_validation_without_changing_predictions(config):
    torch.manual_seed(0)
    model = DiffMIC3D(config.model_config("cpu"))
    val = BlobVolumes(6, 3)
    val_cache = cache_guidance(model, val, torch.device("cpu"), progress=False)
    before = predict_guidance(model, val_cache, torch.device("cpu"), 4, config.seed, config.num_samples,
                              config.ddim_steps, keep_y0=True)
    assert before["y0_samples"].shape == (config.num_samples, 6, 2, *[model.config.grid_size] * 3)
    value = calibrate_temperature(model, val_cache, torch.from_numpy(val.labels), config, torch.device("cpu"))
    after = predict_guidance(model, val_cache, torch.device("cpu"), 4, config.seed, config.num_samples,
                             config.ddim_steps)
    assert float(model.diffusion.temperature) == value
    assert torch.equal(after["probs"].argmax(1), before["probs"].argmax(1))
    assert calibrate_temperature(model, val_cache, torch.from_numpy(val.labels), config,
                                 torch.device("cpu")) == value  # deterministic: a resumed run refits the same
