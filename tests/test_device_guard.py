"""Tensors made on the CPU meeting tensors on the GPU, caught on a CPU-only machine.

``tests/device_guard.py`` turns the ``meta`` device into a stand-in accelerator that holds
real data; with ``MEDISCOPE_DEVICE=meta`` the notebooks' own cells run on it, and any op that
mixes a CPU tensor with a device tensor raises as it would on CUDA. This is the class of bug
that stopped notebook 03 on a GPU (``torch.tensor(c.crop_source_shape)`` against CUDA boxes).
"""
import json
from pathlib import Path

import pytest
import torch

from device_guard import STAND_IN, OnStandIn, StandInDevice
from models.diffmic3d import DiffMIC3D, ModelConfig
from utils.training.checkpoint import load_checkpoint
from utils.training.profiles import get_profile
from utils.run import run_experiment

pytestmark = [pytest.mark.usefixtures("one_thread"),
              # load_state_dict warns that copying into a meta parameter is a no-op; into the
              # stand-in it is not (test_weights_load_into_the_stand_in)
              pytest.mark.filterwarnings("ignore:for .* copying from a non-meta parameter:UserWarning")]
NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


# the guard itself ---------------------------------------------------------------------------------


def test_the_guard_rejects_mixing_and_allows_what_cuda_allows():
    with StandInDevice():
        x = torch.arange(6.0).to(STAND_IN)
        assert isinstance(x, OnStandIn) and x.device == STAND_IN
        with pytest.raises(RuntimeError, match="same device"):
            x + torch.ones(6)  # a CPU vector meets a device vector
        assert torch.equal((x + torch.tensor(1.0)).cpu(), torch.arange(1.0, 7.0))  # 0-dim CPU scalar: fine
        assert torch.equal(x[torch.tensor([0, 2])].cpu(), torch.tensor([0.0, 2.0]))  # CPU index: fine
        y = torch.zeros(6, device=x.device)  # made on the data's device: fine
        assert torch.equal((x + y).cpu(), torch.arange(6.0)) and type((x + y).cpu()) is torch.Tensor
        assert x.sum().item() == 15.0 and x.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
        with pytest.raises((TypeError, RuntimeError)):
            x.numpy()  # as for a CUDA tensor: needs .cpu() first


def test_weights_load_into_the_stand_in():
    layer = torch.nn.Linear(3, 2)
    state = {key: torch.full_like(value, 7.0) for key, value in layer.state_dict().items()}
    with StandInDevice():
        layer.to(STAND_IN).load_state_dict(state)
        assert layer.weight.device == STAND_IN and torch.equal(layer.weight.detach().cpu(), torch.full((2, 3), 7.0))


def test_a_model_on_the_stand_in_gives_the_cpu_numbers():
    torch.manual_seed(0)
    model = DiffMIC3D(ModelConfig.tiny()).eval()
    x = torch.rand(2, 1, 32, 32, 16)
    with torch.no_grad():
        expected = model.predict(x, num_samples=2, steps=2, generator=torch.Generator().manual_seed(0))["probs"]
        with StandInDevice():
            model.to(STAND_IN)
            got = model.predict(x.to(STAND_IN), num_samples=2, steps=2, generator=torch.Generator().manual_seed(0))
            assert got["probs"].device == STAND_IN
            got = got["probs"].cpu()
    torch.testing.assert_close(got, expected)


# the notebooks on the stand-in ----------------------------------------------------------------------


def code_cells(name: str) -> list[str]:
    """The code cells of ``notebooks/<name>.ipynb`` as Python (IPython magics dropped)."""
    cells = json.loads((NOTEBOOKS / f"{name}.ipynb").read_text())["cells"]
    return ["\n".join(line for line in "".join(c["source"]).splitlines() if not line.lstrip().startswith("%"))
            for c in cells if c["cell_type"] == "code"]


def run_notebook(name: str, output_dir: Path) -> dict:
    """Execute a notebook's cells in this process, as papermill would with these parameters."""
    namespace = {"display": lambda *args, **kwargs: None}
    for source in code_cells(name):
        exec(compile(source, f"{name}.ipynb", "exec"), namespace)
        if "PROFILE = None" in source:  # the parameters cell: papermill's injected values
            namespace.update(DATA_DIR=None, OUTPUT_DIR=str(output_dir), PROFILE="smoke", SEED=0)
    return namespace


@pytest.fixture(scope="module")
def finished_smoke_run(tmp_path_factory):
    """The smoke pipeline's training (``utils.run --train-only``: data, both phases, the
    baselines, the learning curves) on the stand-in: any CPU tensor meeting a device tensor on
    the way fails here. The test evaluation and its figures run on the stand-in in notebook
    07's cells below (``evaluate_test``, the function ``utils.run`` calls), not twice."""
    output_dir = tmp_path_factory.mktemp("stand-in-run")
    with StandInDevice():
        run_experiment(get_profile("smoke", progress=False), output_dir, device=str(STAND_IN), train_only=True)
    assert (output_dir / "diffmic3d_enhanced_model.pth").is_file()
    assert not (output_dir / "evaluation_results.csv").exists()
    return output_dir


def test_the_smoke_pipeline_runs_on_the_stand_in(finished_smoke_run):
    state = load_checkpoint(finished_smoke_run / "diffmic3d_enhanced_model.pth")["model_state_dict"]
    assert all(type(v) is torch.Tensor and v.device.type == "cpu" for v in state.values())  # saved as plain CPU


@pytest.mark.parametrize("name", ["01_data_loading", "02_preprocessing", "03_dcg_model", "04_prior_generation",
                                  "05_unet", "06_training", "07_evaluation"])
def test_notebook_cells_keep_tensors_on_the_data_device(name, finished_smoke_run, monkeypatch):
    monkeypatch.setenv("MEDISCOPE_DEVICE", "meta")
    monkeypatch.setenv("MEDISCOPE_PROGRESS", "0")
    monkeypatch.chdir(NOTEBOOKS)
    with StandInDevice():
        namespace = run_notebook(name, finished_smoke_run)
    assert namespace["exp"].device == STAND_IN  # the cells really ran on the stand-in
    if name == "07_evaluation":  # the test evaluation ran here, with every figure
        assert (finished_smoke_run / "evaluation_results.csv").is_file()
        assert {p.stem for p in (finished_smoke_run / "figures").glob("*.png")} >= {
            "roc_curves", "saliency_rois", "denoising_trajectory", "baseline_gradcam", "risk_coverage"}
