"""Put the repository root on ``sys.path`` so tests import ``utils.*`` and ``models.*``;
shared fixtures (``toy_nifti``, ``one_thread``, the smoke phantoms written once). Helpers live
in ``helpers.py``. Under pytest-xdist (``pyproject.toml``: ``-n auto``) each worker runs on one
thread.
"""
import os
import sys
from pathlib import Path

import pytest

XDIST_WORKER = bool(os.environ.get("PYTEST_XDIST_WORKER"))  # one of pytest-xdist's workers
if XDIST_WORKER:
    # the workers share the cores: one thread each, here and in the processes they start
    # (notebook kernels, torchrun ranks, utils.run), or OpenMP threads spin-wait on each other;
    # the variables must be set before torch is imported, its own thread count after
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"

import torch  # noqa: E402

if XDIST_WORKER:
    torch.set_num_threads(1)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import toy_ct, write_nifti  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """The notebooks' nbval run (the longest test by far) goes first, so pytest-xdist starts it
    while the other workers share the other files (``--no-loadscope-reorder``: files in this
    order). Tests marked ``cuda`` are skipped, with the reason, where torch sees no GPU."""
    items.sort(key=lambda item: item.nodeid.split("::")[0] != "tests/test_notebooks_nbval.py")
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run scripts/gpu_check.sh on one)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def smoke_phantoms():
    """The smoke profile's default phantom set, written before any test under a file lock:
    the xdist workers and the notebooks' kernels then only read it, never write it at once."""
    from filelock import FileLock

    from utils.prepare_data import phantom_folder, run_data_dir
    from utils.training.profiles import get_profile

    config = get_profile("smoke", progress=False)
    folder = phantom_folder(config)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        run_data_dir(config)


@pytest.fixture
def toy_nifti(tmp_path):
    """Path of a small valid int16 CT NIfTI file (24 x 20 x 8 voxels)."""
    return write_nifti(tmp_path / "toy.nii.gz", toy_ct())


@pytest.fixture
def one_thread():
    """Run tiny models on one intra-op thread: their ops gain nothing from more, and OpenMP
    threads spin-waiting on a busy 2-core machine made them 10-100x slower. Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
