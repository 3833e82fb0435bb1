"""The README's Kaggle cell, run against a fake /kaggle layout in a temporary folder."""
import re
from pathlib import Path

import pytest

from utils.notebook import resolve_parameters
from utils.training.profiles import get_profile

README = Path(__file__).resolve().parents[1] / "README.md"
CELL = next(b for b in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL) if "KAGGLE_ROOT" in b)


@pytest.fixture
def fake_kaggle(tmp_path, monkeypatch):
    """/kaggle with input/<dataset>/MediScopeDiffusion (a stand-in repository), working/, temp/."""
    kaggle = tmp_path / "kaggle"
    code = kaggle / "input" / "mediscope-code" / "MediScopeDiffusion"
    (code / "models").mkdir(parents=True)
    (code / "models" / "diffmic3d.py").write_text("# stand-in\n")
    (code / "requirements.txt").write_text("numpy\n")
    (kaggle / "working").mkdir()
    (kaggle / "temp").mkdir()
    for name, value in {"KAGGLE_ROOT": str(kaggle), "MEDISCOPE_PIP": "0", "MEDISCOPE_SETUP_ONLY": "1"}.items():
        monkeypatch.setenv(name, value)
    for name in ("MEDISCOPE_CACHE_DIR", "MEDISCOPE_SET", "MEDISCOPE_OUTPUT_DIR"):
        monkeypatch.delenv(name, raising=False)
    return kaggle


def test_the_kaggle_cell_copies_the_code_and_puts_cache_and_phantoms_in_scratch(fake_kaggle, monkeypatch, capsys):
    import os

    exec(compile(CELL, "README Kaggle cell", "exec"), {"__name__": "__kaggle__"})
    repo = fake_kaggle / "working" / "MediScopeDiffusion"
    assert (repo / "models" / "diffmic3d.py").is_file() and (repo / "requirements.txt").is_file()
    scratch = fake_kaggle / "temp"
    assert os.environ["MEDISCOPE_CACHE_DIR"] == str(scratch / "mediscope-cache")
    params = resolve_parameters(profile="full", kaggle_working=fake_kaggle / "working",
                                kaggle_input=fake_kaggle / "input")
    assert params.output_dir == fake_kaggle / "working" / "outputs"  # outputs saved with the notebook
    assert Path(params.config().phantom_dir) == scratch / "mediscope-phantoms"  # phantoms in scratch
    assert "cache and phantoms in" in capsys.readouterr().out
    exec(compile(CELL, "README Kaggle cell", "exec"), {"__name__": "__kaggle__"})  # a second run keeps the copy
    assert (repo / "models" / "diffmic3d.py").read_text() == "# stand-in\n"


def test_without_the_code_the_cell_says_what_to_attach(fake_kaggle):
    import shutil

    shutil.rmtree(fake_kaggle / "input" / "mediscope-code")
    with pytest.raises(RuntimeError, match="attach the MediScopeDiffusion repository as a dataset"):
        exec(compile(CELL, "README Kaggle cell", "exec"), {"__name__": "__kaggle__"})


def test_runtime_requirements_hold_what_runs_and_tests_live_apart():
    root = README.parent
    runtime = (root / "requirements.txt").read_text()
    dev = (root / "requirements-dev.txt").read_text()
    for package in ("torch", "monai", "nibabel", "pydicom", "pandas", "papermill", "tqdm"):
        assert re.search(rf"^{package}\b", runtime, flags=re.M), package
    for package in ("pytest", "nbval", "jupyter"):
        assert not re.search(rf"^{package}\b", runtime, flags=re.M) and re.search(rf"^{package}\b", dev, flags=re.M)
    assert "-r requirements.txt" in dev
    assert get_profile("full").phantom_dir == "data/MosMedData"  # only the Kaggle cell moves it
