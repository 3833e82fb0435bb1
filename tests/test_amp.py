"""Mixed precision that cannot go NaN, and a non-finite loss that names its module.

Runs on the CPU with CPU autocast: float16 overflows at 65504 on every device, so the
overflow that stopped phase 2 on a GPU reproduces here (issue: AMP NaN in phase 2)."""
import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from models.diffmic3d import DiffMIC3D, ModelConfig
from models.precision import float32_forward
from utils.training.nonfinite import first_nonfinite_module
from utils.training.profiles import get_profile
from utils.seeding import amp_dtype
from utils.training.loop import FitConfig, fit, make_epoch_loader

pytestmark = pytest.mark.usefixtures("one_thread")


def guidance_with_feature_scale(model, x, scale):
    """The frozen DCG's guidance for ``x`` with its feature vectors (the inputs of the feature
    prior F) multiplied by ``scale``."""
    g = model.guidance(x)
    return dataclasses.replace(g, global_features=g.global_features * scale, roi_features=g.roi_features * scale)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scale", [1e3, 1e6])
def test_phase2_stays_finite_under_autocast_with_a_huge_feature_prior(dtype, scale):
    torch.manual_seed(0)
    model = DiffMIC3D(ModelConfig.tiny()).freeze_dcg()
    x, y = torch.rand(2, 1, 32, 32, 16), torch.tensor([0, 1])
    usual = model.priors(model.guidance(x)).feature_prior.abs().max()
    guidance = guidance_with_feature_scale(model, x, scale)
    priors = model.priors(guidance)
    assert priors.feature_prior.abs().max() > 0.5 * scale * usual  # the feature prior really is that large
    with torch.autocast("cpu", dtype=dtype):
        out = model.diffusion_loss(x, guidance, y, generator=torch.Generator().manual_seed(0))
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    if dtype == torch.bfloat16:
        return  # CPU bfloat16 conv3d backward (torch 2.13) gives sporadic inf weight gradients at any
        # input scale, run to run on the same input; tests/test_cuda.py checks bfloat16 gradients on a GPU
    out["loss"].backward()
    grads = [p.grad for p in model.denoiser.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_the_feature_prior_test_fails_without_the_layernorm():
    """The control: a 1e6x feature prior overflows float16 when it reaches the projection
    un-normalised (at 1e3x the tiny model's projection happens to stay below 65504)."""
    torch.manual_seed(0)
    model = DiffMIC3D(ModelConfig.tiny()).freeze_dcg()
    model.denoiser.prior_norm = nn.Identity()
    x, y = torch.rand(2, 1, 32, 32, 16), torch.tensor([0, 1])
    guidance = guidance_with_feature_scale(model, x, 1e6)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = model.diffusion_loss(x, guidance, y, generator=torch.Generator().manual_seed(0))["loss"]
    assert not torch.isfinite(loss)


def test_heads_and_prior_generator_run_in_float32_under_autocast():
    torch.manual_seed(0)
    model = DiffMIC3D(ModelConfig.tiny()).eval()
    x = torch.rand(2, 1, 32, 32, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        out = model.dcg(x)
        priors = model.priors(out)
        M, cond = model.condition(x, out)
        y0 = model.denoiser(M, M, torch.zeros(M.shape[0], *M.shape[2:], dtype=torch.long), cond)
    assert cond.dtype == torch.float16  # the U-Net itself does run in half precision
    for name, t in {"global_logits": out.global_logits, "local_logits": out.local_logits, "saliency": out.saliency,
                    "guidance_map": priors.guidance_map, "feature_prior": priors.feature_prior, "y0_hat": y0}.items():
        assert t.dtype == torch.float32, name


def test_float32_forward_casts_inputs_and_switches_autocast_off():
    class Probe(nn.Module):
        @float32_forward
        def forward(self, a, b=None):
            return a, b, torch.is_autocast_enabled("cpu"), (a @ a).dtype

    a = torch.ones(2, 2, dtype=torch.float16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a32, b, enabled, matmul = Probe()(a, b=torch.arange(3))
    assert a32.dtype == torch.float32 and b.dtype == torch.int64 and not enabled and matmul == torch.float32
    assert torch.is_autocast_enabled("cpu") is False  # restored after the block


# naming the module that overflowed --------------------------------------------------------------


class Overflowing(nn.Module):
    """A net whose middle layer leaves float16's range (outputs ~1e6) but is fine in float32."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.blowup = nn.Linear(8, 8)
        self.out = nn.Linear(8, 2)
        with torch.no_grad():
            self.blowup.weight.fill_(1e5)

    def forward(self, x):
        return self.out(self.blowup(torch.relu(self.inp(x)) + 1.0))


def test_first_nonfinite_module_names_the_innermost_first_culprit():
    net = Overflowing()
    x = torch.ones(3, 4)
    assert first_nonfinite_module(net, lambda: net(x)) is None  # float32: all finite
    with torch.autocast("cpu", dtype=torch.float16):
        assert first_nonfinite_module(net, lambda: net(x)) == "blowup (Linear, float16)"
    assert not net.blowup._forward_hooks  # hooks removed


class Toy(torch.utils.data.Dataset):
    def __init__(self, n=12):
        self.x = np.random.default_rng(0).normal(size=(n, 4)).astype(np.float32)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"image": torch.from_numpy(self.x[i]), "label": torch.tensor(i % 2)}


def run_fit(net, path, amp, dtype="float16"):
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    step = lambda batch, gen: nn.functional.cross_entropy(net(batch["image"]), batch["label"])  # noqa: E731
    return fit(net, opt, None, train_step=step, evaluate=lambda: {"val_loss": 1.0, "val_auc": 0.5, "val_acc": 0.5},
               train_batches=lambda epoch: make_epoch_loader(Toy(), 4, 0, epoch),
               config=FitConfig(name="toy", epochs=1, patience=1, amp=amp, amp_dtype=dtype, progress=False),
               checkpoint_path=path, model_config={"toy": 1})


def test_a_nonfinite_loss_names_the_module_and_the_precision(tmp_path):
    with pytest.raises(FloatingPointError) as err:
        run_fit(Overflowing(), tmp_path / "a.pth", amp=True)
    message = str(err.value)
    assert "[toy] epoch 1 batch 0" in message and "float16 autocast" in message
    assert "first non-finite output: blowup (Linear, float16)" in message and "amp=False" in message
    assert not (tmp_path / "a.pth").exists()  # nothing half-written


def test_the_same_net_trains_in_float32_and_in_bfloat16(tmp_path):
    """bfloat16 has float32's range: the net that overflows float16 trains; no GradScaler."""
    assert run_fit(Overflowing(), tmp_path / "f32.pth", amp=False).epochs_run == 1
    assert run_fit(Overflowing(), tmp_path / "bf16.pth", amp=True, dtype="bfloat16").epochs_run == 1


def test_amp_dtype_follows_the_card(monkeypatch):
    assert amp_dtype("cpu") == "float16"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))  # T4
    assert amp_dtype("cuda") == "float16"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # H100
    assert amp_dtype("cuda") == "bfloat16"
    assert get_profile("smoke", amp_dtype="float16").autocast_dtype("cuda") == "float16"  # explicit wins


def test_amp_is_never_on_for_the_cpu_and_dtype_is_validated():
    assert get_profile("smoke", amp=True).use_amp("cpu") is False
    assert get_profile("smoke", amp=True).use_amp("cuda") is True
    with pytest.raises(ValueError, match="amp_dtype"):
        get_profile("smoke", amp_dtype="float8")
