"""The house rules the code is built on, checked from the source: notebooks and ``utils.run``
reach the training stages only through ``utils.pipeline``; ``models/`` never imports ``utils/``;
no module is over 400 lines; the sampler keeps no state."""
import ast
import json
from pathlib import Path

import torch

from models.diffusion_process import DiffusionConfig, PriorShiftedDiffusion
from utils.paths import REPO_ROOT

TRAINING = {"fit", "cache_guidance", "calibrate_readout", "out_of_fold_guidance"}


def imports(source: str) -> list[tuple[str, str]]:
    """(module, name) of every ``from module import name`` in ``source``."""
    tree = ast.parse(source)
    return [(node.module or "", alias.name) for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
            for alias in node.names]


def notebook_code(path: Path) -> str:
    cells = json.loads(path.read_text())["cells"]
    lines = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    return "\n".join("\n".join(l for l in cell.splitlines() if not l.lstrip().startswith(("%", "!")))
                     for cell in lines)


def training_imports(source: str) -> list[str]:
    return [f"{module}.{name}" for module, name in imports(source)
            if (name.startswith("train_") or name in TRAINING or name == "finish_training")
            and module != "utils.pipeline"]


def test_notebooks_and_run_reach_training_only_through_the_pipeline():
    sources = {p.name: notebook_code(p) for p in sorted((REPO_ROOT / "notebooks").glob("*.ipynb"))}
    sources["utils/run.py"] = (REPO_ROOT / "utils" / "run.py").read_text()
    assert len(sources) == 8
    offenders = {name: training_imports(src) for name, src in sources.items() if training_imports(src)}
    assert offenders == {}
    # utils.run does not spell the stage sequence out: it calls the pipeline's
    run_names = {name for module, name in imports(sources["utils/run.py"]) if module == "utils.pipeline"}
    assert "train_all" in run_names and not run_names & {"train_phase1", "train_phase2", "train_baselines"}


def test_the_rule_catches_a_notebook_that_trains_on_its_own():
    assert training_imports("from utils.training.dcg import train_dcg\nfrom utils.pipeline import load_dcg") == \
        ["utils.training.dcg.train_dcg"]


def test_models_never_import_utils_and_no_module_is_over_400_lines():
    for path in sorted((REPO_ROOT / "models").glob("*.py")):
        assert not [m for m, _ in imports(path.read_text()) if m.split(".")[0] == "utils"], path.name
    long = {str(p.relative_to(REPO_ROOT)): n for p in sorted(REPO_ROOT.glob("[mu]*/**/*.py"))
            if (n := len(p.read_text().splitlines())) > 400}
    assert long == {}


def test_sampling_leaves_the_process_unchanged():
    process = PriorShiftedDiffusion(DiffusionConfig(num_timesteps=50, ddim_steps=5))
    before = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in vars(process).items() if not k.startswith("_")}
    buffers = {k: v.clone() for k, v in process.named_buffers()}
    M = torch.full((2, 2, 2, 2, 2), 0.5)
    out = process.sample(lambda y, t: torch.zeros_like(y), M, steps=3, generator=torch.Generator().manual_seed(0))
    assert out.timesteps.tolist() == [49, 32, 16]  # the steps of this call, returned with the result
    after = {k: v for k, v in vars(process).items() if not k.startswith("_")}
    assert after.keys() == before.keys() and all(after[k] is before[k] or after[k] == before[k] for k in before)
    assert all(torch.equal(v, buffers[k]) for k, v in process.named_buffers())
