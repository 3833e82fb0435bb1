"""The Kaggle cell (scripts/kaggle_cell.py, copied verbatim into the README), run against a fake
/kaggle layout in a temporary folder, and the runtime requirements it installs."""
import re
import shutil
from pathlib import Path

import pytest

from utils.install_missing import parse_requirements
from utils.notebook import resolve_parameters
from utils.training.profiles import get_profile

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CELL_FILE = ROOT / "scripts" / "kaggle_cell.py"
CELL = CELL_FILE.read_text()
# what the cell runs of the repository before anything is installed (all standard library only)
SETUP_MODULES = ("utils/__init__.py", "utils/errors.py", "utils/paths.py", "utils/install_missing.py",
                 "utils/data/__init__.py", "utils/data/discovery.py")
UNREACHABLE_INDEX = "http://127.0.0.1:9/simple"  # refused at once: Kaggle with Internet off


def run_cell():
    exec(compile(CELL, str(CELL_FILE), "exec"), {"__name__": "__kaggle__"})


def make_scans(root: Path, folders: dict[str, int]) -> None:
    for folder, count in folders.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for k in range(count):
            (root / folder / f"study_{k:04d}.nii.gz").write_bytes(b"x")


@pytest.fixture
def fake_kaggle(tmp_path, monkeypatch):
    """/kaggle with input/<dataset>/MediScopeDiffusion (a stand-in repository holding the set-up
    modules and a test scan, as the real one does), working/, temp/."""
    kaggle = tmp_path / "kaggle"
    code = kaggle / "input" / "mediscope-code" / "MediScopeDiffusion"
    (code / "models").mkdir(parents=True)
    (code / "models" / "diffmic3d.py").write_text("# stand-in\n")
    (code / "requirements.txt").write_text("numpy>=1.0\n")
    for module in SETUP_MODULES:
        (code / module).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / module, code / module)
    make_scans(code, {"tests/data": 1})  # the repository's own test scan is not the data
    (kaggle / "working").mkdir()
    (kaggle / "temp").mkdir()
    for name, value in {"KAGGLE_ROOT": str(kaggle), "MEDISCOPE_PIP": "0", "MEDISCOPE_SETUP_ONLY": "1",
                        "PIP_INDEX_URL": UNREACHABLE_INDEX}.items():
        monkeypatch.setenv(name, value)
    for name in ("MEDISCOPE_CACHE_DIR", "MEDISCOPE_SET", "MEDISCOPE_OUTPUT_DIR", "MEDISCOPE_DATA_DIR",
                 "MEDISCOPE_WHEELS", "MEDISCOPE_PYPI"):
        monkeypatch.delenv(name, raising=False)
    return kaggle


def test_the_kaggle_cell_copies_the_code_and_puts_cache_and_phantoms_in_scratch(fake_kaggle, capfd):
    import os

    run_cell()
    repo = fake_kaggle / "working" / "MediScopeDiffusion"
    assert (repo / "models" / "diffmic3d.py").is_file() and (repo / "requirements.txt").is_file()
    scratch = fake_kaggle / "temp"
    assert os.environ["MEDISCOPE_CACHE_DIR"] == str(scratch / "mediscope-cache")
    params = resolve_parameters(profile="full", kaggle_working=fake_kaggle / "working",
                                kaggle_input=fake_kaggle / "input")
    assert params.output_dir == fake_kaggle / "working" / "outputs"  # outputs saved with the notebook
    assert Path(params.config().phantom_dir) == scratch / "mediscope-phantoms"  # phantoms in scratch
    out = capfd.readouterr().out
    assert "cache and phantoms in" in out
    assert "the run uses the embedded synthetic phantoms -- not real CT" in out  # the code's test scan is no data
    run_cell()  # a second run keeps the copy
    assert (repo / "models" / "diffmic3d.py").read_text() == "# stand-in\n"


def test_without_the_code_the_cell_says_what_to_attach(fake_kaggle):
    shutil.rmtree(fake_kaggle / "input" / "mediscope-code")
    with pytest.raises(RuntimeError, match="attach the MediScopeDiffusion repository as a dataset"):
        run_cell()


def test_the_cell_says_which_data_it_found(fake_kaggle, capfd):
    make_scans(fake_kaggle / "input" / "mosmeddata", {"CT-0/CT-0": 2, "CT-23/CT-23": 3})  # zip-doubled folders
    run_cell()
    assert f"data: MosMedData at {fake_kaggle / 'input' / 'mosmeddata'} (5 scans, ct0_ct23 layout: CT-0 2, CT-23 3)" \
        in capfd.readouterr().out


def test_ct_data_in_an_unknown_layout_stop_the_cell_with_one_line(fake_kaggle):
    make_scans(fake_kaggle / "input" / "chest-ct", {"series/p001": 2})
    with pytest.raises(RuntimeError) as info:
        run_cell()
    message = str(info.value)
    assert "\n" not in message and not message.startswith("error:")
    assert "2 CT-like files" in message and "series/p001/study_0000.nii.gz" in message and "CT-0/ + CT-23/" in message


def test_the_cell_installs_nothing_when_every_requirement_is_met(fake_kaggle, monkeypatch, capfd):
    monkeypatch.setenv("MEDISCOPE_PIP", "1")
    run_cell()
    assert "packages: 1 of 1 requirements met" in capfd.readouterr().out


def test_a_missing_package_without_wheels_or_internet_stops_the_cell_with_one_line(fake_kaggle, monkeypatch):
    monkeypatch.setenv("MEDISCOPE_PIP", "1")
    requirements = fake_kaggle / "input" / "mediscope-code" / "MediScopeDiffusion" / "requirements.txt"
    requirements.write_text("numpy>=1.0\nmediscope-no-such-package>=1.0\n")
    with pytest.raises(RuntimeError) as info:
        run_cell()
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("missing packages: mediscope-no-such-package>=1.0 (no wheels dataset attached; "
                              "PyPI not reachable (no internet))")
    assert "attach the MediScopeDiffusion wheels dataset" in message and "turn on Internet" in message


# The README carries a verbatim copy of the cell that users paste.
def test_the_readme_carries_the_cell_verbatim():
    blocks = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL) if "KAGGLE_ROOT" in b]
    assert blocks == [CELL]


def test_runtime_requirements_hold_what_runs_and_tests_live_apart():
    runtime = (ROOT / "requirements.txt").read_text()
    dev = (ROOT / "requirements-dev.txt").read_text()
    requirements = {r.name: r for r in parse_requirements(runtime)}  # the installer can read every line
    for package in ("torch", "monai", "nibabel", "pydicom", "pandas", "papermill", "tqdm"):
        assert package in requirements, package
    assert requirements["monai"].optional and "baselines" in requirements["monai"].optional
    assert [name for name, r in requirements.items() if r.optional] == ["monai"]  # the rest is required
    for package in ("pytest", "nbval", "jupyter"):
        assert package not in requirements and re.search(rf"^{package}\b", dev, flags=re.M)
    assert "-r requirements.txt" in dev
    assert get_profile("full").phantom_dir == "data/MosMedData"  # only the Kaggle cell moves it
