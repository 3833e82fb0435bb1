#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv and install everything.
# Idempotent: a second run only checks that the requirements are satisfied.
# torch is installed first and pinned to 2.13.0, which is a CPU build on our CI machines;
# requirements.txt keeps `torch>=2.0` so Kaggle's own CUDA torch is used there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-dev.txt
# A named kernel for papermill / nbval, pointing at this environment.
.venv/bin/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (MediScopeDiffusion)" >/dev/null
echo "[setup] ready: $(.venv/bin/python -c 'import torch, numpy; print("torch", torch.__version__, "numpy", numpy.__version__)')"
