"""Put the repository root on ``sys.path`` so tests import ``utils.*`` and ``models.*``;
shared fixtures (``toy_nifti``, ``one_thread``). Helpers live in ``helpers.py``.
"""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import toy_ct, write_nifti  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` are skipped, with the reason, where torch sees no GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run scripts/gpu_check.sh on one)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


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
