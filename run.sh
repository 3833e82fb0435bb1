#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, then execute the seven notebooks in order
# with papermill (python -m utils.run_notebooks) at the `demo` profile on the embedded
# phantoms (generated on first use): data, preprocessing, phase 1 (DCG), priors, U-Net,
# phase 2 and the baselines, evaluation on the test split with figures.
# Executed notebooks go to outputs/notebooks/, results to outputs/.
# Arguments are passed on, e.g. `bash run.sh --data-dir /path/to/MosMedData` or `--profile full`.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
.venv/bin/python -m utils.run_notebooks "$@"
