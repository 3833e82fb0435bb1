"""Check that the tests catch three deliberate bugs (issue: tests that passed on broken code).

    python scripts/check_mutations.py

For each mutation: copy the repository's tracked files to a temporary folder, break one line,
run the tests that guard it, and report whether at least one failed (it must). The mutations:

1. the phase-2 loss multiplied by 0 in ``utils.training.diffusion.train_diffusion``;
2. ``calibrate_readout`` leaving the identity readout without fitting;
3. ``utils.benchmarking.timing.timed`` returning 0.0 without measuring.

Exit status 0 when every mutation was caught. Takes about a minute on 2 CPU cores.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MUTATIONS = [
    ("phase-2 loss x 0", "utils/training/diffusion.py", 'generator=generator)["loss"]',
     'generator=generator)["loss"] * 0.0',
     ["tests/test_diffusion_method.py::test_c_phase2_learns_and_b_the_condition_carries_the_prediction"]),
    ("calibrate_readout does not fit", "utils/training/readout.py",
     "    model.set_readout(scale, bias)\n", "    scale, bias = 1.0, [0.0] * len(bias)\n    model.set_readout(scale, bias)\n",
     ["tests/test_readout.py"]),
    ("timed returns 0.0", "utils/benchmarking/timing.py",
     '    """Median seconds of ``fn()`` over ``repeats`` calls after ``warmup`` (untimed) calls."""',
     '    """Median seconds of ``fn()`` over ``repeats`` calls after ``warmup`` (untimed) calls."""\n    return 0.0',
     ["tests/test_benchmark.py"]),
]


def main() -> int:
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    caught_all = True
    for name, rel, old, new, tests in MUTATIONS:
        with tempfile.TemporaryDirectory() as tmp:
            for f in files:
                (Path(tmp) / f).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / f, Path(tmp) / f)
            target = Path(tmp) / rel
            text = target.read_text()
            if text.count(old) != 1:
                print(f"{name}: the line to break was not found once in {rel}; update this script")
                return 2
            target.write_text(text.replace(old, new))
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                                     "-o", "addopts=", *tests], cwd=tmp, env=env, capture_output=True, text=True)
            caught = result.returncode != 0
            caught_all &= caught
            last = (result.stdout.strip().splitlines() or ["(no output)"])[-1]
            print(f"{name}: {'caught' if caught else 'NOT CAUGHT'} ({last})")
    return 0 if caught_all else 1


if __name__ == "__main__":
    sys.exit(main())
