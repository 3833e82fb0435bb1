#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, then run the whole experiment with the
# `demo` profile on the embedded phantoms (generated on first use): both training phases,
# both baselines, both ablations, evaluation on the test split and the figures.
# Arguments are passed on, e.g. `bash run.sh --data-dir /path/to/MosMedData` or `--profile full`.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
.venv/bin/python -m utils.run "$@"
