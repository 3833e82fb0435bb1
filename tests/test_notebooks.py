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
from pathlib import Path

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
