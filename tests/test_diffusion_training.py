"""Phase 2 (``utils.training.diffusion``): the run itself -- cached guidance, frozen DCG,
resumable checkpoints, EMA, learning-rate schedule. The validation-fitted readout is tested in
test_readout.py.

Whether phase 2 actually learns (and reads the scan) is tested in test_diffusion_method.py.
"""
import copy

import numpy as np
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from helpers import SHAPE, BlobVolumes
from models.diffmic3d import DiffMIC3D, ModelConfig
from utils.training.diffusion import correction_kept, recompute_encoder_bn, train_diffusion, warmup_cosine
from utils.training.profiles import get_profile
from utils.training.dcg import cache_guidance

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")
N_TRAIN, N_VAL, BATCH, EPOCHS = 8, 4, 4, 2
STEPS_PER_EPOCH = N_TRAIN // BATCH


@pytest.fixture(scope="module")
def config():
    # warmup over half the 4 steps, so the schedule is visible; prior dropout on, so its
    # draws must also replay on resume
    return get_profile("smoke", input_shape=SHAPE, diffusion_epochs=EPOCHS, patience=5, batch_size=BATCH,
                       lr_diffusion=3e-3, warmup_fraction=0.5, ema_decay=0.5, prior_dropout=0.5, progress=False)


def new_model(seed=0):
    torch.manual_seed(seed)
    return DiffMIC3D(ModelConfig.tiny(input_shape=SHAPE))


@pytest.fixture(scope="module")
def data():
    train, val = BlobVolumes(N_TRAIN, 0), BlobVolumes(N_VAL, 1)
    model = new_model()
    return {"train": train, "val": val,
            "train_guidance": cache_guidance(model, train, CPU, progress=False),
            "val_guidance": cache_guidance(model, val, CPU, progress=False)}


class StepRecorder:
    """Per optimiser step: the learning rate and the trained parameters after the step."""

    def __init__(self):
        self.lrs, self.weights = [], []

    def __enter__(self):
        def hook(optimizer, args, kwargs):
            self.lrs.append(optimizer.param_groups[0]["lr"])
            self.weights.append([p.detach().clone() for group in optimizer.param_groups for p in group["params"]])
        self.handle = register_optimizer_step_post_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def run(model, data, config, path):
    return train_diffusion(model, data["train"], data["train_guidance"], data["val"], data["val_guidance"],
                           config, CPU, path)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data, config):
    """One uninterrupted phase-2 run, observed: DCG calls, per-step lr and weights.

    On one thread like the tests (this module-scoped fixture is set up before the function-
    scoped ``one_thread``): a different thread count changes float reductions in the last bits,
    and the resume test compares bit for bit."""
    path = tmp_path_factory.mktemp("phase2") / "diffusion.pth"
    model = new_model()
    dcg_before = {k: v.clone() for k, v in model.dcg.state_dict().items()}
    dcg_calls = []
    model.dcg.register_forward_hook(lambda *_: dcg_calls.append(1))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with StepRecorder() as steps:
            result = run(model, data, config, path)
    finally:
        torch.set_num_threads(threads)
    return {"model": model, "result": result, "path": path, "dcg_before": dcg_before, "dcg_calls": dcg_calls,
            "steps": steps}


# -- the run ------------------------------------------------------------------------------------


def test_phase2_trains_on_cached_guidance_with_the_dcg_frozen(uninterrupted):
    model, result = uninterrupted["model"], uninterrupted["result"]
    assert uninterrupted["dcg_calls"] == []  # the guidance comes from the cache
    assert result.epochs_run == EPOCHS and len(uninterrupted["steps"].lrs) == EPOCHS * STEPS_PER_EPOCH
    assert all(np.isfinite(result.history["train_loss"])) and all(0 <= a <= 1 for a in result.history["val_auc"])
    for key, value in model.dcg.state_dict().items():
        assert torch.equal(value, uninterrupted["dcg_before"][key]), key
    assert all(not p.requires_grad for p in model.dcg.parameters()) and not model.dcg.training


def test_phase2_checkpoint_loads_with_weights_only(uninterrupted):
    model = uninterrupted["model"]
    ckpt = torch.load(uninterrupted["path"], weights_only=True)
    assert ckpt["fit"]["complete"] and ckpt["fit"]["epoch"] == EPOCHS
    assert ckpt["model_config"] == model.config.to_dict()
    assert ModelConfig.from_dict(ckpt["model_config"]) == model.config


def test_lr_follows_warmup_cosine_per_optimizer_step(uninterrupted, config):
    total = EPOCHS * STEPS_PER_EPOCH
    expected = [config.lr_diffusion * warmup_cosine(s, total, config.warmup_fraction) for s in range(total)]
    assert uninterrupted["steps"].lrs == pytest.approx(expected)
    assert expected == pytest.approx([config.lr_diffusion * f for f in (0.5, 1.0, 1.0, 0.5)])
    # the logged lr of an epoch is that of its last step
    assert uninterrupted["result"].history["lr"] == pytest.approx(expected[STEPS_PER_EPOCH - 1::STEPS_PER_EPOCH])


def test_warmup_cosine_shape():
    factors = [warmup_cosine(step, 100, 0.05) for step in range(100)]
    assert factors[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert all(a >= b for a, b in zip(factors[4:], factors[5:]))
    assert 0 <= factors[-1] < 1e-3
    assert warmup_cosine(0, 10, 0.0) == 1.0  # no warmup: start at the peak


def test_model_ends_with_the_selected_ema_weights(uninterrupted, data, config):
    model, result = uninterrupted["model"], uninterrupted["result"]
    saved = torch.load(uninterrupted["path"], weights_only=True)["model_state_dict"]  # the selected epoch's state
    assert 1 <= result.best["epoch"] <= EPOCHS
    # where validation preferred the priors alone, the head's last layer is zeroed (check_correction)
    switched_off = ("denoiser.head.out.",) if not result.history["correction_check"]["kept"] else ()
    for key, value in model.state_dict().items():
        if key.startswith(("dcg.", "fold_dcgs.")):  # frozen: phase 1's files hold them, phase 2's does not
            assert f"ema.module.{key}" not in saved and f"model.{key}" not in saved, key
        elif switched_off and key.startswith(switched_off):
            assert not value.any(), key
        else:
            assert torch.equal(value, saved[f"ema.module.{key}"]), key
    # ... which are not the raw weights of the optimiser ...
    assert any(not torch.equal(value, saved[f"model.denoiser.{key}"])
               for key, value in model.denoiser.state_dict().items() if value.is_floating_point())
    # ... but an average of them: every trained weight lies within the range of its values
    # after the optimiser steps
    trajectory = uninterrupted["steps"].weights
    assert len(trajectory) == EPOCHS * STEPS_PER_EPOCH
    trained = list(model.prior_generator.named_parameters(prefix="prior_generator")) + \
        list(model.denoiser.named_parameters(prefix="denoiser"))  # the optimiser's order
    assert len(trained) == len(trajectory[0])
    for i, (name, final) in enumerate(trained):
        if switched_off and name.startswith(switched_off):
            continue
        stacked = torch.stack([w[i] for w in trajectory])
        assert (final >= stacked.min(0).values - 1e-6).all() and (final <= stacked.max(0).values + 1e-6).all(), name

    # its image encoder carries precise BatchNorm statistics over the (shuffled) training split
    encoder = model.denoiser.image_encoder
    bns = [m for m in encoder.modules() if isinstance(m, torch.nn.BatchNorm3d)]
    kept = [(m.running_mean.clone(), m.running_var.clone()) for m in bns]
    check = copy.deepcopy(model)
    recompute_encoder_bn(check, data["train"], config, CPU)
    fresh = [m for m in check.denoiser.image_encoder.modules() if isinstance(m, torch.nn.BatchNorm3d)]
    assert len(bns) > 0
    for (mean, var), m in zip(kept, fresh):
        torch.testing.assert_close(mean, m.running_mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(var, m.running_var, atol=1e-5, rtol=1e-5)


class Killed(Exception):
    pass


def test_killed_and_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path, monkeypatch, data, config,
                                                                              uninterrupted):
    path = tmp_path / "diffusion.pth"
    original = DiffMIC3D.diffusion_loss
    train_calls = []

    def dying_loss(self, *args, **kwargs):
        if self.training:  # a training step (validation runs the EMA copy in eval mode)
            train_calls.append(1)
            if len(train_calls) == STEPS_PER_EPOCH + 2:  # killed in epoch 2, after one of its steps
                raise Killed()
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DiffMIC3D, "diffusion_loss", dying_loss)
    with pytest.raises(Killed):
        run(new_model(), data, config, path)
    monkeypatch.undo()

    ckpt = torch.load(path, weights_only=True)  # the checkpoint written after epoch 1
    assert ckpt["fit"]["epoch"] == 1 and not ckpt["fit"]["complete"] and "optimizer" in ckpt["fit"]

    model = new_model(seed=123)  # a different start: everything phase 2 trains must come from the checkpoint ...
    frozen = new_model()  # ... while the frozen DCGs come from phase 1, as in the pipeline (not stored twice)
    model.dcg.load_state_dict(frozen.dcg.state_dict())
    model.fold_dcgs.load_state_dict(frozen.fold_dcgs.state_dict())
    with StepRecorder() as steps:
        result = run(model, data, config, path)
    assert result.resumed_from == 1 and result.epochs_run == EPOCHS
    assert steps.lrs == pytest.approx(uninterrupted["steps"].lrs[STEPS_PER_EPOCH:])  # the schedule continues
    assert result.history == uninterrupted["result"].history and result.best == uninterrupted["result"].best
    reference = uninterrupted["model"].state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, reference[key]), key
    final = torch.load(path, weights_only=True)
    reference_ckpt = torch.load(uninterrupted["path"], weights_only=True)
    for key, value in final["model_state_dict"].items():
        assert torch.equal(value, reference_ckpt["model_state_dict"][key]), key


def test_the_correction_check_keeps_ties_up_to_float_noise_and_drops_one_pair_worse():
    # AdrenalMNIST3D seed 4 (98 validation scans, 22 positive): the same AUC, summed in another order
    assert correction_kept(0.8672248803827751, 0.8672248803827752)
    assert correction_kept(0.87, 0.87) and correction_kept(0.9, 0.8)
    one_pair = 1.0 / (22 * 76)  # the smallest true difference of two AUCs on that split, and half of it
    assert not correction_kept(0.86, 0.86 + one_pair) and not correction_kept(0.86, 0.86 + one_pair / 2)
    assert correction_kept(float("nan"), float("nan")) and correction_kept(0.7, float("nan"))
