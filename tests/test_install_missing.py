"""utils.install_missing (the Kaggle cell's installer) and scripts/build_kaggle_wheels.py.

The installs run in a throw-away environment holding only Python's standard library and pip
(a venv without site packages, pip put on its path alone), from a wheel built here: no network,
and the project's .venv is never touched. That environment also shows that the installer
imports nothing outside the standard library.
"""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from helpers import load_script
from utils.install_missing import (WHEELS_MARKER, Requirement, at_least, find_wheels, parse_requirements, release,
                                   split_met)
from utils.paths import REPO_ROOT

UNREACHABLE_INDEX = "http://127.0.0.1:9/simple"  # refused at once: no internet


def load_builder():
    return load_script("build_kaggle_wheels")


# ------------------------------------------------------------------------------------------
# reading requirements and comparing versions
# ------------------------------------------------------------------------------------------

def test_requirements_lines_and_the_optional_mark():
    reqs = parse_requirements("# a comment\n\ntorch>=2.3   # why\nipykernel\n"
                              "monai>=1.3  # optional: the baselines and their Grad-CAM\nscikit-learn >= 1.2\n")
    assert reqs == [Requirement("torch", "2.3"), Requirement("ipykernel"),
                    Requirement("monai", "1.3", "the baselines and their Grad-CAM"), Requirement("scikit-learn", "1.2")]
    assert [r.spec() for r in reqs] == ["torch>=2.3", "ipykernel", "monai>=1.3", "scikit-learn>=1.2"]
    with pytest.raises(ValueError, match="line 2 .*'numpy<2'"):
        parse_requirements("scipy\nnumpy<2\n")


@pytest.mark.parametrize("version, minimum, expected", [
    ("2.5.1+cu121", "2.3", True), ("2.3", "2.3.0", True), ("2.2.9", "2.3", False), ("1.10.0", "1.9", True),
    ("0.13.2", "0.12", True), ("1.3.0rc1", "1.3", True), ("1.24.4", "1.24", True), ("1.23.5", "1.24", False),
    ("2024.1", "2023.12", True), ("1!0.5", "0.4", True),
])
def test_versions_compare_by_their_release_numbers(version, minimum, expected):
    assert at_least(version, minimum) is expected


def test_release_numbers():
    assert release("2.5.1+cu121") == (2, 5, 1) and release("1.3.0rc1") == (1, 3, 0) and release("0.4.post2") == (0, 4)


def test_what_is_met_missing_or_kept():
    installed = {"numpy": "1.23.5", "scipy": "1.13.1", "torch": "2.1.0+cu121", "pandas": None}
    reqs = parse_requirements("numpy>=1.24\nscipy>=1.10\ntorch>=2.3\npandas>=1.5\n")
    met, missing, warnings = split_met(reqs, installed.get)
    assert met == {"scipy": "1.13.1", "torch": "2.1.0+cu121"}  # a CUDA torch >= 2.0 is never replaced
    assert [r.name for r in missing] == ["numpy", "pandas"]
    assert len(warnings) == 1 and "torch 2.1.0+cu121 kept" in warnings[0]
    _, missing, _ = split_met(parse_requirements("torch>=2.3\n"), {"torch": "1.13.1"}.get)
    assert [r.name for r in missing] == ["torch"]  # older than 2.0: not Kaggle's, installed as any other


def test_the_wheels_folder_is_found_by_its_marker_or_named(tmp_path):
    kaggle = tmp_path / "input"
    (kaggle / "some-data" / "a").mkdir(parents=True)
    assert find_wheels(kaggle, {}) is None
    wheels = kaggle / "mediscope-wheels" / "v1"
    wheels.mkdir(parents=True)
    (wheels / WHEELS_MARKER).write_text("made by scripts/build_kaggle_wheels.py\n")
    assert find_wheels(kaggle, {}) == wheels
    assert find_wheels(kaggle, {"MEDISCOPE_WHEELS": str(tmp_path / "mine")}) == tmp_path / "mine"
    deep = tmp_path / "deep" / "1" / "2" / "3" / "4" / "5"
    deep.mkdir(parents=True)
    (deep / WHEELS_MARKER).write_text("")
    assert find_wheels(tmp_path / "deep", {}) is None  # not searched below four levels


# ------------------------------------------------------------------------------------------
# installing, in an environment with the standard library and pip only
# ------------------------------------------------------------------------------------------

def build_wheel(folder: Path, name: str, version: str = "1.0") -> Path:
    """A minimal pure-Python wheel of package ``name`` (import name with underscores)."""
    module = name.replace("-", "_")
    dist = f"{module}-{version}"
    files = {f"{module}/__init__.py": "VALUE = 42\n",
             f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{dist}.dist-info/RECORD"] = "".join(f"{path},,\n" for path in [*files, f"{dist}.dist-info/RECORD"])
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for member, text in files.items():
            archive.writestr(member, text)
    return path


@pytest.fixture
def bare_python(tmp_path):
    """(python, environment variables) of a venv with no packages, pip reachable on PYTHONPATH alone."""
    import pip

    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "venv")], check=True)
    pip_only = tmp_path / "pip-only"
    pip_only.mkdir()
    (pip_only / "pip").symlink_to(Path(pip.__file__).parent)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(pip_only),
           "PIP_INDEX_URL": UNREACHABLE_INDEX, "PIP_NO_CACHE_DIR": "1"}
    return str(tmp_path / "venv" / "bin" / "python"), env


def test_the_installer_and_the_data_check_import_only_the_standard_library(bare_python):
    """The Kaggle cell runs both before (or without) installing anything."""
    python, env = bare_python
    probe = ("import sys, utils.install_missing, utils.data.discovery; "
             "print(sorted({m.split('.')[0] for m in sys.modules} - set(sys.stdlib_module_names) - {'utils', '__main__'}))")
    done = subprocess.run([python, "-c", probe], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_offline_install_from_an_attached_wheels_folder(tmp_path, bare_python):
    python, env = bare_python
    wheels = tmp_path / "kaggle" / "input" / "mediscope-wheels"
    build_wheel(wheels, "mediscope-dummy", "1.2")
    (wheels / WHEELS_MARKER).write_text("test wheels\n")
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("mediscope-dummy>=1.0\nmediscope-extra>=1.0  # optional: the dummy baselines\n")
    done = subprocess.run([python, "-m", "utils.install_missing", "--requirements", str(requirements),
                           "--kaggle-input", str(tmp_path / "kaggle" / "input")],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"installing mediscope-dummy>=1.0, mediscope-extra>=1.0 from {wheels}"
    assert any(line.startswith("warning: mediscope-extra>=1.0 is not installed (") and
               "the dummy baselines will be skipped" in line for line in lines)
    assert lines[-1] == "packages: 1 of 2 requirements met"
    check = subprocess.run([python, "-c", "import mediscope_dummy; print(mediscope_dummy.VALUE)"],
                           env=env, capture_output=True, text=True)
    assert check.stdout.strip() == "42"
    again = subprocess.run([python, "-m", "utils.install_missing", "--requirements", str(requirements),
                            "--kaggle-input", str(tmp_path / "nothing")],
                           cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "installing mediscope-dummy" not in again.stdout  # met now: untouched


def test_a_missing_required_package_without_any_source_is_one_line(tmp_path, bare_python):
    python, env = bare_python
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("mediscope-no-such-package>=1.0\n")
    done = subprocess.run([python, "-m", "utils.install_missing", "--requirements", str(requirements),
                           "--kaggle-input", str(tmp_path / "input")],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith("error: missing packages: mediscope-no-such-package>=1.0 "
                                  "(no wheels dataset attached; PyPI not reachable (no internet)); ")
    assert "attach the MediScopeDiffusion wheels dataset" in done.stderr and "turn on Internet" in done.stderr


# ------------------------------------------------------------------------------------------
# building the wheels dataset (commands only: no network here)
# ------------------------------------------------------------------------------------------

def test_the_wheels_builder_targets_kaggles_python_and_leaves_torch_out(tmp_path):
    builder = load_builder()
    resolve = builder.resolve_command(["monai>=1.3", "numpy>=1.24"], "3.11", tmp_path / "r.json", tmp_path / "t", "py")
    assert resolve[:4] == ["py", "-m", "pip", "install"] and "--dry-run" in resolve and "--report" in resolve
    for option in ("--only-binary=:all:", "manylinux2014_x86_64", "--python-version", "3.11", "cp311"):
        assert option in resolve
    assert resolve[-2:] == ["monai>=1.3", "numpy>=1.24"]
    report = {"install": [{"metadata": {"name": n, "version": v}} for n, v in [
        ("monai", "1.6.1"), ("torch", "2.10.0"), ("nvidia-cudnn-cu12", "9.1"), ("triton", "3.0"),
        ("cuda-bindings", "12.9"), ("numpy", "2.4.6"), ("typing_extensions", "4.16.0")]]}
    assert builder.pins_from_report(report) == ["monai==1.6.1", "numpy==2.4.6", "typing_extensions==4.16.0"]
    download = builder.download_command(["monai==1.6.1"], "3.12", tmp_path / "out", "py")
    assert download[:5] == ["py", "-m", "pip", "download", "--no-deps"] and "cp312" in download
    assert download[-3:] == ["-d", str(tmp_path / "out"), "monai==1.6.1"]
    assert not builder.kept("torch") and builder.kept("monai")
