"""What every test run shares, ``tests/`` and the notebooks alike: pytest-xdist's grouping and
threads (``pyproject.toml``: ``-n auto --dist loadgroup``), and the smoke profile's phantoms,
written once before any test."""
import os

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):  # one of pytest-xdist's workers
    # the workers share the cores: one thread each, here and in the processes they start
    # (kernels, torchrun ranks, utils.run), or OpenMP threads spin-wait on each other
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


def xdist_group(nodeid: str) -> str:
    """The pytest-xdist group of a test: its file, so module fixtures (e.g. a smoke run) are
    built once; the notebooks all in one, as they run in order, each reading what the previous
    one wrote."""
    path = nodeid.split("::")[0]
    return "notebooks" if path.startswith("notebooks/") else path


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        item.add_marker(pytest.mark.xdist_group(xdist_group(item.nodeid)))


@pytest.fixture(scope="session", autouse=True)
def smoke_phantoms():
    """The smoke profile's default phantom set, written before any test under a file lock:
    xdist's workers and the notebooks' kernels then only read it, never write it at once."""
    from filelock import FileLock

    from utils.prepare_data import phantom_folder, run_data_dir
    from utils.training.profiles import get_profile

    config = get_profile("smoke", progress=False)
    folder = phantom_folder(config)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        run_data_dir(config)
