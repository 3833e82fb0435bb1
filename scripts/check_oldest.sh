#!/usr/bin/env bash
# Test against the oldest versions requirements.txt declares: a throw-away virtual environment with
# EXACTLY the minimum of every runtime requirement (pip "==" on each; one without a minimum gets the
# newest), torch==2.13.0 (the CPU build scripts/setup.sh installs; Kaggle keeps its own), and then the
# tests that exercise those libraries: metrics (scikit-learn), figures (seaborn, matplotlib), NIfTI and
# DICOM reading (nibabel, pydicom), preprocessing and statistics (scipy), the MONAI baselines and their
# Grad-CAM, a run's data preparation, the papermill runner on one tiny notebook, and pandas as the
# notebooks use it. One thread, a few minutes.
#
#   bash scripts/check_oldest.sh [VENV_DIR]    # default: a temporary folder, removed at the end
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ $# -ge 1 ]; then
  VENV=$1
else
  TMP=$(mktemp -d)
  VENV=$TMP/oldest
  trap 'rm -rf "$TMP"' EXIT
fi
export OMP_NUM_THREADS=1
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# name==minimum for each runtime requirement (torch: the CPU build), read as the Kaggle installer reads them
mapfile -t PINS < <("$VENV/bin/python" -c '
from utils.install_missing import parse_requirements
for r in parse_requirements(open("requirements.txt").read()):
    print("torch==2.13.0" if r.name == "torch" else f"{r.name}=={r.minimum}" if r.minimum else r.name)')
echo "[oldest] installing ${PINS[*]} into $VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "${PINS[@]}" pytest
"$VENV/bin/python" -m ipykernel install --sys-prefix --name python3 >/dev/null  # the kernel papermill runs
"$VENV/bin/python" -m pip list --disable-pip-version-check 2>/dev/null \
  | grep -iE '^(torch|nibabel|pydicom|scipy|numpy|scikit-learn|pandas|seaborn|matplotlib|tqdm|monai|ipykernel|papermill) '
START=$SECONDS
"$VENV/bin/python" - <<'EOF'
# pandas as notebooks 01 and 07 use it: read_csv, groupby / size / unstack, column selection, round
import io
import pandas as pd
table = pd.read_csv(io.StringIO("split,label,model,value\ntrain,0,a,0.51\ntrain,1,a,0.25\nval,0,b,0.125\n"))
counts = table.groupby(["split", "label"]).size().unstack()
assert counts.loc["train"].tolist() == [1, 1], counts
assert table[table.model == "a"][["value"]].round(1)["value"].tolist() == [0.5, 0.2]
print("[oldest] pandas as the notebooks use it: ok")
EOF
"$VENV/bin/python" -m pytest -q -p no:cacheprovider -o addopts="-ra --durations=5" \
  tests/test_metrics.py tests/test_visualization.py tests/test_nifti_io.py tests/test_preprocessing.py \
  tests/test_protocol.py tests/test_baselines.py tests/test_data_line.py \
  "tests/test_notebooks.py::test_runner_stops_at_a_failing_notebook_and_names_it"
echo "[oldest] tests passed with the declared minimum versions in $((SECONDS - START)) s"
