"""``pytest --nbval-lax notebooks/`` runs the seven notebooks at the smoke profile.

The kernels nbval starts inherit this process' environment, and the notebooks' parameters
cell falls back to it (``utils.notebook.resolve_parameters``): the profile is forced to
``smoke``, the run goes to a fresh temporary folder (unless ``MEDISCOPE_OUTPUT_DIR`` is set)
and progress bars are off. The notebooks run in file order, 01 to 07, each reading what the
previous ones wrote. Cells marked ``# NBVAL_CHECK_OUTPUT`` print invariants that hold at
every profile, so the committed ``demo`` outputs are what the smoke run must reproduce.
"""
import os
import tempfile

import pytest

os.environ["MEDISCOPE_PROFILE"] = "smoke"
os.environ["MEDISCOPE_PROGRESS"] = "0"
os.environ.setdefault("MEDISCOPE_OUTPUT_DIR", tempfile.mkdtemp(prefix="mediscope-nbval-"))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (``pyproject.toml``) means one process here: the notebooks run in order, each
    reading what the previous ones wrote, so they cannot be spread over pytest-xdist's workers."""
    return 0


def pytest_configure(config):
    if hasattr(config, "workerinput"):  # a pytest-xdist worker
        raise pytest.UsageError("the notebooks run in one process, in order: pass -n 0")
