"""The GPU path (marked ``cuda``: skipped without a GPU; ``scripts/gpu_check.sh`` runs them).

What broke on a CUDA machine before and what these check there: tensors made on the CPU
meeting CUDA tensors (notebook 03), and phase 2 going NaN under float16 autocast."""
import dataclasses
import json

import numpy as np
import pytest
import torch

from models.diffmic3d import DiffMIC3D, ModelConfig
from utils.data.nifti_io import save_nifti
from utils.data.phantoms import PhantomConfig, generate_phantom
from utils.pipeline import ABLATION_FUSED, ABLATION_GLOBAL, ENSEMBLE, OURS
from utils.predict import load_model, predict_scan
from utils.training.profiles import get_profile
from utils.run import run_experiment
from utils.seeding import amp_dtype
from utils.training.baselines import DISPLAY_NAMES

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_phase2_step_is_finite_under_autocast_with_a_huge_feature_prior(dtype):
    if dtype == "bfloat16" and amp_dtype(CUDA) != "bfloat16":
        pytest.skip("this card has no native bfloat16")
    torch.manual_seed(0)
    model = DiffMIC3D(ModelConfig.tiny()).to(CUDA).freeze_dcg()
    x, y = torch.rand(4, 1, 32, 32, 16, device=CUDA), torch.tensor([0, 1, 0, 1], device=CUDA)
    g = model.guidance(x)
    g = dataclasses.replace(g, global_features=g.global_features * 1e3, roi_features=g.roi_features * 1e3)
    with torch.autocast("cuda", dtype=getattr(torch, dtype)):
        loss = model.diffusion_loss(x, g, y, prior_dropout=0.3, generator=torch.Generator(CUDA).manual_seed(0))["loss"]
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.denoiser.parameters() if p.grad is not None)


def test_dcg_and_priors_on_cuda_match_the_cpu():
    """Same weights, same input: the DCG and the prior generator give the same numbers on
    both devices (float32, no autocast), and every output lives on the input's device."""
    torch.manual_seed(0)
    model = DiffMIC3D(ModelConfig.tiny()).eval()
    x = torch.rand(2, 1, 32, 32, 16)
    with torch.no_grad():
        cpu = model.dcg(x)
        gpu = model.to(CUDA).dcg(x.to(CUDA))
        priors = model.priors(gpu)
    for name, value in gpu.as_dict().items():
        assert value.device == x.to(CUDA).device, name
        torch.testing.assert_close(value.cpu(), getattr(cpu, name), rtol=1e-3, atol=1e-4, msg=name)
    assert priors.guidance_map.device == x.to(CUDA).device


def test_smoke_run_with_amp_on_cuda_and_predict(tmp_path):
    """The whole pipeline (smoke size) with AMP on the GPU: finishes, reports its peak GPU
    memory, and its model file predicts a new scan on the GPU."""
    config = get_profile("smoke", amp=True, phantom_dir=str(tmp_path / "phantoms"), progress=False)
    rows = run_experiment(config, tmp_path / "run", cache_dir=tmp_path / "cache", device=str(CUDA))
    aucs = {r["model"]: r["value"] for r in rows if r["metric"] == "roc_auc"}
    assert set(aucs) == {OURS, ABLATION_GLOBAL, ABLATION_FUSED, ENSEMBLE, *DISPLAY_NAMES.values()}
    assert all(0.0 <= a <= 1.0 for a in aucs.values())
    timings = json.loads((tmp_path / "run" / "timings.json").read_text())
    assert timings["peak_cuda_gb"]["phase 2 (diffusion)"] > 0
    model, meta = load_model(tmp_path / "run" / "diffmic3d_enhanced_model.pth", CUDA)
    hu, affine, _ = generate_phantom(np.random.default_rng(0), 1, PhantomConfig(size=config.phantom_size))
    save_nifti(tmp_path / "new.nii.gz", hu, affine)
    result = predict_scan(model, meta, tmp_path / "new.nii.gz", CUDA)
    assert abs(sum(result["probs"].values()) - 1.0) < 1e-4
