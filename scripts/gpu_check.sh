#!/usr/bin/env bash
# The GPU path end to end, on a CUDA machine, in one command. On one H100 its parts were measured
# separately (tests 42 s; utils.run reached DenseNet-121 epoch 8 of 15 in 5 min; notebooks 01-05
# took 2.5 min): about 10 min in all, estimated, over the 8-minute goal (README, "GPU").
#   1. the CUDA-marked tests, one process    (pytest -m cuda tests/; skipped with GPU_CHECK_TESTS=0)
#   1b. the benchmark's memory section on the GPU: each full stage's measured peak CUDA memory
#      beside the estimate made without a GPU (the check of the T4 answer; benchmark.md in
#      $GPU_CHECK_DIR/benchmark)
#   2. utils.run --profile full, AMP in float16 (the Kaggle T4 / P100 path; a bfloat16 card such
#      as an A100/H100 would pick bfloat16 on its own): data, DCG, diffusion, baselines, test
#   3. the seven notebooks via papermill at --profile full on the same run folder: they load the
#      finished stages and run every cell on the GPU (figures, ROI checks, evaluation)
#   4. with two or more GPUs: scripts/gpu_scaling.py, each training stage's time on 1 vs N GPUs
# and prints each stage's wall time and peak GPU memory: the device's used memory sampled
# every 0.5 s by nvidia-smi (all processes, CUDA context included) and, for utils.run, torch's
# own per-stage peak (timings.json). Stages run even when an earlier one failed; the exit
# status is non-zero when any failed. Logs and the summary go to $GPU_CHECK_DIR
# (default outputs/gpu_check). Usage, from anywhere:   bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
OUT=${GPU_CHECK_DIR:-outputs/gpu_check}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
export MEDISCOPE_PROGRESS=0 PYTHONUNBUFFERED=1

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: torch sees no CUDA device; run this on a GPU machine" >&2
  exit 2
fi
"$PY" - <<'PYEOF' | tee "$SUMMARY"
import platform, torch
from utils.seeding import amp_dtype
p = torch.cuda.get_device_properties(0)
print(f"card: {p.name}, {p.total_memory / 1024**3:.1f} GiB, compute capability {p.major}.{p.minor}, "
      f"AMP dtype {amp_dtype('cuda')}; torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"python {platform.python_version()}")
PYEOF

failed=0
stage() {  # stage NAME COMMAND...: run it, log to $OUT/NAME.log, print time, peak memory and status
  local name=$1; shift
  local mem="$OUT/$name.memory"
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 > "$mem" 2>/dev/null &
  local sampler=$!
  local start=$SECONDS
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null
  local peak
  peak=$(sort -n "$mem" 2>/dev/null | tail -1)
  local status=ok
  [ "$rc" -ne 0 ] && { status="FAILED (rc $rc, see $OUT/$name.log)"; failed=1; }
  printf '%-12s %5d s   peak GPU memory used %6s MiB   %s\n' "$name" $((SECONDS - start)) "${peak:-n/a}" "$status" \
    | tee -a "$SUMMARY"
  [ "$rc" -ne 0 ] && tail -n 25 "$OUT/$name.log"
  return 0
}

RUN="$OUT/run_full"
if [ "${GPU_CHECK_TESTS:-1}" != 0 ]; then
  stage tests "$PY" -m pytest -q -p no:cacheprovider -o addopts=-ra -m cuda tests/
  grep -E "passed|failed|error" "$OUT/tests.log" | tail -n 1 | sed 's/^/  tests: /' | tee -a "$SUMMARY"
fi
stage memory "$PY" -m utils.benchmark --sections memory --output-dir "$OUT/benchmark" --device cuda
grep -A7 "| stage | weights + grads" "$OUT/benchmark/benchmark.md" | tee -a "$SUMMARY"
stage run_fp16 "$PY" -m utils.run --profile full --output-dir "$RUN" --set amp=True --set amp_dtype=float16 \
  --set progress=False
stage notebooks "$PY" -m utils.run_notebooks --profile full --output-dir "$RUN"
if [ "$("$PY" -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then  # several GPUs: 1 vs N
  stage scaling "$PY" scripts/gpu_scaling.py --profile full --output-dir "$OUT/scaling"
  cat "$OUT/scaling/scaling.md" 2>/dev/null | tee -a "$SUMMARY"
else
  echo "scaling: one GPU visible, 1 vs N GPUs not measured (scripts/gpu_scaling.py)" | tee -a "$SUMMARY"
fi

if [ -f "$RUN/timings.json" ]; then
  echo "utils.run --profile full (float16 AMP), per stage (seconds; torch's peak allocated GiB):" | tee -a "$SUMMARY"
  "$PY" -c "
import json, sys
t = json.load(open(sys.argv[1])); peak = t.pop('peak_cuda_gb', {})
for k, v in t.items():
    print(f'  {k:<22}{v:7.1f} s' + (f'   {peak[k]:5.2f} GiB' if k in peak else ''))
" "$RUN/timings.json" | tee -a "$SUMMARY"
  grep -A8 "^Test split" "$OUT/run_fp16.log" | tee -a "$SUMMARY"
fi
exit $failed
