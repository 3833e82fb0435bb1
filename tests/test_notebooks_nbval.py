"""The seven notebooks executed under nbval, as one test.

``pytest notebooks/`` runs them at the smoke profile (notebooks/conftest.py), in order, each
reading what the previous ones wrote, in one process of its own: pytest-xdist spreads
``tests/`` over the cores a file at a time, and a notebook's cells must not be spread (nbval
keeps one kernel per notebook). This test runs that command in a subprocess while the other
workers run the other test files, and fails with nbval's report of the failing cells.
"""
import os
import re
import subprocess
import sys

import nbformat

from utils.notebook import NOTEBOOKS
from utils.paths import REPO_ROOT

# a hung kernel fails the test instead of the CI job (the smoke notebooks take ~5 min)
TIMEOUT_S = 1800


def nbval_environment(tmp_path) -> dict:
    """This process' environment for the subprocess, without pytest-xdist's worker variables
    (the subprocess is a pytest session of its own) and with its run in ``tmp_path``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    env.pop("PYTEST_CURRENT_TEST", None)
    env["MEDISCOPE_OUTPUT_DIR"] = str(tmp_path / "run")
    return env


def code_cells() -> int:
    """How many code cells the seven committed notebooks hold: nbval's items."""
    return sum(cell.cell_type == "code" for name in NOTEBOOKS
               for cell in nbformat.read(REPO_ROOT / "notebooks" / f"{name}.ipynb", as_version=4).cells)


def test_the_seven_notebooks_pass_nbval(tmp_path):
    command = [sys.executable, "-m", "pytest", "notebooks", "-n", "0", "-p", "no:cacheprovider",
               "-q", "--color=no", "--durations=0"]
    result = subprocess.run(command, cwd=REPO_ROOT, env=nbval_environment(tmp_path), capture_output=True,
                            text=True, timeout=TIMEOUT_S)
    print(result.stdout[-4000:])  # shown by -ra / on failure: the cells' durations
    assert result.returncode == 0, f"`{' '.join(command[2:])}` failed:\n{result.stdout[-12000:]}\n{result.stderr[-3000:]}"
    # every code cell of the seven notebooks ran as a test item (none silently uncollected)
    summary = result.stdout.strip().splitlines()[-1]
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|skipped)", summary)}
    assert sum(counts.values()) == code_cells(), summary
