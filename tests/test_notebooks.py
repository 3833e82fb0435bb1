"""The notebook layer: parameter resolution, the papermill runner, the committed notebooks.

The notebooks themselves are executed by nbval (``notebooks/``, see notebooks/conftest.py);
these tests check what nbval cannot: that the runner stops and names a failing notebook, and
that the committed notebooks are executed, portable and comparable.
"""
import json
import re
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import nbformat
import numpy as np
import pytest
from helpers import write_nifti
from nbformat.v4 import new_code_cell, new_notebook

from utils.errors import DataError
from utils.notebook import NOTEBOOKS, open_experiment, resolve_parameters
from utils.paths import REPO_ROOT
from utils.run_notebooks import relative_to, scrub_metadata

NOTEBOOK_DIR = REPO_ROOT / "notebooks"


# ------------------------------------------------------------------------------------------
# parameters: explicit value, then environment, then Kaggle, then the embedded default
# ------------------------------------------------------------------------------------------

def test_defaults_without_environment_or_kaggle(tmp_path):
    p = resolve_parameters(environ={}, kaggle_working=tmp_path / "none", kaggle_input=tmp_path / "none")
    assert p.data_dir is None and p.output_dir == REPO_ROOT / "outputs"
    assert (p.profile, p.seed, p.progress) == ("demo", 0, True)


def test_environment_fills_what_is_not_given(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    env = {"MEDISCOPE_DATA_DIR": str(data), "MEDISCOPE_OUTPUT_DIR": str(tmp_path / "out"),
           "MEDISCOPE_PROFILE": "smoke", "MEDISCOPE_SEED": "3", "MEDISCOPE_PROGRESS": "0"}
    p = resolve_parameters(environ=env, kaggle_working=tmp_path / "none", kaggle_input=tmp_path / "none")
    assert (p.data_dir, p.output_dir, p.profile, p.seed, p.progress) == (data, tmp_path / "out", "smoke", 3, False)
    explicit = resolve_parameters("d", "o", "full", 7, environ=env)
    assert (explicit.data_dir, explicit.output_dir, explicit.profile, explicit.seed) == (Path("d"), Path("o"), "full", 7)


def test_kaggle_folders_are_detected(tmp_path):
    working, kaggle_input = tmp_path / "working", tmp_path / "input"
    scans = kaggle_input / "mosmeddata" / "MosMedData" / "CT-0"
    scans.mkdir(parents=True)
    (kaggle_input / "mosmeddata" / "MosMedData" / "CT-23").mkdir()
    working.mkdir()
    volume = np.zeros((8, 8, 4), dtype=np.int16)
    write_nifti(scans / "study_0001.nii.gz", volume)
    write_nifti(kaggle_input / "mosmeddata" / "MosMedData" / "CT-23" / "study_0002.nii.gz", volume)
    p = resolve_parameters(environ={}, kaggle_working=working, kaggle_input=kaggle_input)
    assert p.output_dir == working / "outputs"
    assert p.data_dir == kaggle_input / "mosmeddata" / "MosMedData"


@pytest.mark.parametrize("kwargs, match", [(dict(profile="huge"), "PROFILE"), (dict(seed="x"), "SEED")])
def test_bad_parameters_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        resolve_parameters(environ={}, **kwargs)


def test_a_later_notebook_says_which_to_run_first(tmp_path):
    params = resolve_parameters(output_dir=tmp_path / "empty", profile="smoke", environ={})
    with pytest.raises(DataError, match="run notebook 01_data_loading first"):
        open_experiment(params)


# ------------------------------------------------------------------------------------------
# the runner
# ------------------------------------------------------------------------------------------

def test_parameters_are_passed_relative_inside_the_repository(tmp_path):
    assert relative_to(REPO_ROOT / "outputs", NOTEBOOK_DIR) == "../outputs"
    assert relative_to(tmp_path, NOTEBOOK_DIR) == str(tmp_path.resolve())


def test_scrub_metadata_removes_absolute_paths(tmp_path):
    nb = new_notebook()
    nb.metadata["papermill"] = {"input_path": "/abs/in/01_x.ipynb", "output_path": "/abs/out/01_x.ipynb"}
    path = tmp_path / "01_x.ipynb"
    nbformat.write(nb, path)
    scrub_metadata(path, "01_x")
    assert "/abs" not in path.read_text()


def test_runner_stops_at_a_failing_notebook_and_names_it(tmp_path):
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    failing = new_notebook(cells=[new_code_cell("x = 1"), new_code_cell("raise ValueError('broken on purpose')")])
    failing.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(failing, notebooks / f"{NOTEBOOKS[0]}.ipynb")
    run = subprocess.run([sys.executable, "-m", "utils.run_notebooks", "--profile", "smoke", "--no-progress",
                          "--notebooks-dir", str(notebooks), "--output-dir", str(tmp_path / "out")],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stderr[-2000:]
    assert f"{NOTEBOOKS[0]} failed in cell" in run.stderr
    assert "ValueError: broken on purpose" in run.stderr
    assert NOTEBOOKS[1] not in run.stdout  # stopped: the next notebook never started
    assert (tmp_path / "out" / "notebooks" / f"{NOTEBOOKS[0]}.ipynb").is_file()  # kept, with the traceback
    assert not (tmp_path / "out" / "main_job_timings.json").exists()  # no main-job time for a failed job


def test_a_whole_main_job_records_the_time_of_every_notebook(tmp_path):
    """All seven notebooks (trivial stand-ins here) ran: their seconds and the total go to
    main_job_timings.json, which the benchmark's speed section reads."""
    from utils.run_notebooks import run_notebooks

    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    for name in NOTEBOOKS:
        nb = new_notebook(cells=[new_code_cell("x = 1")])
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbformat.write(nb, notebooks / f"{name}.ipynb")
    run_notebooks("smoke", data_dir=tmp_path, output_dir=tmp_path / "out", notebook_dir=notebooks, progress=False)
    timings = json.loads((tmp_path / "out" / "main_job_timings.json").read_text())
    assert timings["runner"] == "utils.run_notebooks" and timings["profile"] == "smoke"
    assert all(timings[name] > 0 for name in NOTEBOOKS)
    assert timings["total"] >= sum(timings[name] for name in NOTEBOOKS)


# ------------------------------------------------------------------------------------------
# the committed notebooks
# ------------------------------------------------------------------------------------------

def committed():
    return [(name, nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)) for name in NOTEBOOKS]


def test_the_seven_notebooks_exist_in_order():
    assert sorted(p.stem for p in NOTEBOOK_DIR.glob("*.ipynb")) == list(NOTEBOOKS)


@pytest.mark.parametrize("name, nb", committed(), ids=list(NOTEBOOKS))
def test_committed_notebook_is_executed_parameterised_and_checked(name, nb):
    code = [c for c in nb.cells if c.cell_type == "code"]
    parameter_cells = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(parameter_cells) == 1
    assert all(re.search(rf"^{v} = None", parameter_cells[0].source, re.M) for v in
               ("DATA_DIR", "OUTPUT_DIR", "PROFILE", "SEED"))
    assert not any("injected-parameters" in c.metadata.get("tags", []) for c in code)
    assert all(c.execution_count is not None for c in code), "commit the executed notebook (runner --update-notebooks)"
    assert not any(o.output_type == "error" for c in code for o in c.outputs)
    checked = [c for c in code if "NBVAL_CHECK_OUTPUT" in c.source]
    assert checked and all(c.outputs for c in checked)
    profile_lines = [o.text for c in code for o in c.outputs if o.output_type == "stream" and "PROFILE" in o.text]
    assert profile_lines and "PROFILE    = demo" in profile_lines[0]  # the committed outputs are the demo run's


def readable_text(nb) -> str:
    """Sources, text outputs and metadata of a notebook (not the base64 image data)."""
    parts = [json.dumps(nb.metadata)]
    for cell in nb.cells:
        parts.append(cell.source)
        for out in cell.get("outputs", []):
            parts.append(out.get("text", ""))
            parts.extend(str(v) for k, v in out.get("data", {}).items() if k.startswith("text/"))
            parts.extend(k for k in out.get("data", {}))
    return "\n".join(parts)


@pytest.mark.parametrize("name, nb", committed(), ids=list(NOTEBOOKS))
def test_committed_notebook_names_no_machine_paths(name, nb):
    text = readable_text(nb)
    for marker in (str(REPO_ROOT), "/home/", "/tmp/", "/work/", "/root/", f"{socket.gethostname()}:"):
        assert marker not in text, f"{name} contains {marker!r}"
    assert "widget-view" not in text  # no progress-bar widgets


# ------------------------------------------------------------------------------------------
# several GPUs: the runner's GPUS parameter, notebook 06's training step (utils.notebook_launch)
# ------------------------------------------------------------------------------------------

def test_gpus_reaches_only_the_notebooks_that_declare_it():
    from utils.run_notebooks import declared_parameters, notebook_parameters

    notebooks = dict(committed())
    assert {name for name, nb in notebooks.items() if "GPUS" in declared_parameters(nb)} == {"06_training"}
    given = {"DATA_DIR": None, "OUTPUT_DIR": "../outputs", "PROFILE": "demo", "SEED": 0, "GPUS": 2}
    assert notebook_parameters(notebooks["06_training"], given) == given
    assert notebook_parameters(notebooks["03_dcg_model"], given) == {k: v for k, v in given.items() if k != "GPUS"}


def test_a_bad_gpus_or_a_batch_too_small_for_them_stops_the_runner_before_any_notebook(tmp_path, capsys):
    from utils.run_notebooks import main, run_notebooks

    with pytest.raises(SystemExit) as exit_info:
        main(["--profile", "smoke", "--gpus", "two", "--output-dir", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    assert "--gpus 'two': expected auto or a positive integer" in capsys.readouterr().err.splitlines()[-1]
    with pytest.raises(ValueError, match=r"batch_size=4 is the global batch and must be >= the number of processes"):
        run_notebooks("smoke", data_dir=tmp_path, output_dir=tmp_path / "run", names=(), gpus=8)
    assert not (tmp_path / "run").exists()


def notebook_params(**overrides):
    """A notebook's run at the smoke profile, its folders relative (as a kernel sees them)."""
    from utils.notebook import NotebookParameters

    return NotebookParameters(Path("data"), Path("out"), "smoke", 3, True, overrides)


def test_the_torchrun_subprocess_gets_the_notebooks_own_run(tmp_path, monkeypatch):
    """utils.run's options built from a notebook's parameters give the very TrainConfig the
    notebook trains with (what the output folder checks), absolute paths, training only."""
    from utils.cli import run_config
    from utils.notebook_launch import run_options
    from utils.paths import CACHE_DIR_ENV
    from utils.run import build_parser

    monkeypatch.chdir(tmp_path)  # a kernel's working directory is notebooks/, the subprocess's the repository
    monkeypatch.setenv(CACHE_DIR_ENV, "cache")
    overrides = {"input_shape": (48, 48, 32), "amp": False, "lr_dcg": 3e-4, "grad_clip": None, "baselines": (),
                 "label_mode": "severity", "n_phantoms": 20, "diffusion.ddim_steps": 3,
                 "model_overrides": {"denoiser": {"head_kernel": 3}}, "seed": 9, "progress": True}
    params = notebook_params(**overrides)
    options = run_options(params, "cpu")
    args = build_parser().parse_args(options)
    assert run_config(args) == replace(params.config(), progress=False)  # --set seed=9 dropped: the notebook's 3 wins
    assert (args.output_dir, args.data_dir, args.cache_dir) == (tmp_path / "out", tmp_path / "data", tmp_path / "cache")
    assert args.device == "cpu" and args.train_only and "--gpus" not in options  # torchrun's ranks do not relaunch


def test_one_process_trains_in_the_kernel_several_start_torchrun_and_a_failure_is_one_line(monkeypatch):
    import torch

    import utils.notebook_launch as notebook_launch

    calls = []
    monkeypatch.setattr(notebook_launch, "finish_training", lambda *a: calls.append(("kernel", a)) or ({}, {}))

    def launcher(module, args, nproc, env=None):
        calls.append(("torchrun", (module, list(args), nproc, env)))
        return 1

    params = notebook_params()
    exp = SimpleNamespace(device=torch.device("cpu"), config=params.config())
    model = torch.nn.Linear(2, 2)
    for gpus in ("auto", 1, "1"):  # no CUDA here: auto is one process, today's path
        assert notebook_launch.complete_training(params, exp, model, "dcg", gpus, launcher) == ({}, {})
    assert calls == [("kernel", (exp, model, "dcg"))] * 3
    calls.clear()
    with pytest.raises(RuntimeError) as info:
        notebook_launch.complete_training(params, exp, model, "dcg", 2, launcher)
    assert calls == [("torchrun", ("utils.run", notebook_launch.run_options(params, "cpu"), 2,
                                   {"PYTHONUNBUFFERED": "1"}))]
    message = str(info.value)
    assert "\n" not in message and message.startswith("training on 2 processes failed (exit status 1")
    with pytest.raises(ValueError, match="must be >= the number of processes"):  # smoke: batch 4
        notebook_launch.complete_training(params, exp, model, "dcg", 5, launcher)
    assert len(calls) == 1  # refused before starting anything


def test_after_the_torchrun_run_the_kernel_loads_what_it_wrote(tmp_path):
    """The files a finished run leaves (stage checkpoints, the main checkpoint) become what
    finish_training returns: the model holds the main checkpoint's weights, each stage's result
    is what fit returns when it only loads that stage, the baselines are the checkpoints'."""
    pytest.importorskip("monai")
    import torch

    from models.diffmic3d import DiffMIC3D
    from utils.experiment import Experiment
    from utils.notebook_launch import complete_training
    from utils.training.baselines import baseline_config, build_baseline, train_baseline
    from utils.training.checkpoint import save_checkpoint

    params = notebook_params(baselines=("densenet121",))
    config = params.config()
    exp = Experiment(config=config, output_dir=tmp_path, device=torch.device("cpu"), data_root=tmp_path,
                     layout="ct0_ct23", records=[], splits={}, class_names=["Normal", "COVID-19"], num_classes=2,
                     cache=None, hires_cache=None, datasets={}, meta={})
    model_config = config.model_config("cpu", num_classes=2)
    model, trained = DiffMIC3D(model_config), DiffMIC3D(model_config)  # two initialisations
    history = {k: [0.5, 0.25] for k in ("train_loss", "val_loss", "val_auc", "val_acc", "lr")}
    fit = {"complete": True, "epoch": 2, "history": history, "best": {"epoch": 1, "val_auc": 0.75, "val_loss": 0.5,
                                                                      "val_acc": 0.5}, "stopped_early": True,
           "bad_epochs": 1}
    readout = {"scale": 2.0, "bias": [0.1, -0.1], "decision_threshold": 0.4, "refer_threshold": 0.2}
    save_checkpoint(exp.checkpoint("diffusion"), model_config=model_config.to_dict(), model_state_dict={}, fit=fit)
    save_checkpoint(exp.main_checkpoint, model_config=model_config.to_dict(), model_state_dict=trained.state_dict(),
                    history={"diffusion": {**history, "readout": readout}})
    save_checkpoint(exp.checkpoint("densenet121"), model_config=baseline_config("densenet121", 2),
                    model_state_dict=build_baseline("densenet121", 2).state_dict(), fit={**fit, "stopped_early": False})

    def launcher(module, args, nproc, env=None):  # the run has finished: nothing left to do
        return 0

    expected = trained.state_dict()
    assert not all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    results, baselines = complete_training(params, exp, model, "dcg result", 2, launcher)
    assert list(results) == ["dcg", "diffusion", "densenet121"] and results["dcg"] == "dcg result"
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    diffusion = results["diffusion"]
    assert diffusion.history["readout"] == readout and diffusion.history["val_auc"] == [0.5, 0.25]
    assert (diffusion.epochs_run, diffusion.best["val_auc"], diffusion.stopped_early) == (2, 0.75, True)
    net, loaded = train_baseline("densenet121", None, None, config, exp.device, exp.checkpoint("densenet121"),
                                 num_classes=2)
    assert results["densenet121"] == loaded and not baselines["densenet121"].training  # as fit loads a finished stage
    expected = net.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in baselines["densenet121"].state_dict().items())
