#!/usr/bin/env bash
# The GPU path end to end, on a CUDA machine, in one command:
#   1. tests: the CUDA-marked tests, one process (pytest -m cuda tests/)
#   2. memory: the benchmark's memory section on the GPU: each full stage's measured peak CUDA
#      memory beside the estimate made without a GPU (the check of the T4 answer; benchmark.md in
#      $GPU_CHECK_DIR/benchmark)
#   3. run: utils.run --profile full, AMP in float16 (the Kaggle T4 / P100 path; a bfloat16 card
#      such as an A100/H100 would pick bfloat16 on its own): data, DCG, diffusion, baselines, test
#   4. notebooks: the seven notebooks via papermill at --profile full on the same run folder: they
#      load the finished stages and run every cell on the GPU (figures, ROI checks, evaluation)
#   5. scaling: with two or more GPUs, scripts/gpu_scaling.py, each training stage's time on 1 vs N
# and prints each stage's wall time and peak GPU memory: the device's used memory sampled every
# 0.5 s by nvidia-smi (all processes, CUDA context included) and, for utils.run, torch's own
# per-stage peak (timings.json). Stages run even when an earlier one failed; the exit status is
# non-zero when any failed. Logs go to $GPU_CHECK_DIR (default outputs/gpu_check), the summary is
# appended to its summary.txt.
# Measured on one H200 (README, "GPU"): tests 51-53 s, memory 238 s, run 226-257 s, notebooks 154 s,
# so the whole is about 11 min: over one 10-minute device call. GPU_CHECK_STAGES picks stages
# (default "tests memory run notebooks scaling"), so it can be split over calls on one machine
# (e.g. "tests memory run", then "notebooks"): the notebooks stage reads the run folder the run
# stage left (GPU_CHECK_TESTS=0, the older switch, still drops the tests).
# Usage, from anywhere:   bash scripts/gpu_check.sh    or    GPU_CHECK_STAGES="notebooks tests" bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
OUT=${GPU_CHECK_DIR:-outputs/gpu_check}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
STAGES=" ${GPU_CHECK_STAGES:-tests memory run notebooks scaling} "
[ "${GPU_CHECK_TESTS:-1}" = 0 ] && STAGES=${STAGES/ tests / }
want() { [[ "$STAGES" == *" $1 "* ]]; }
for s in $STAGES; do
  case $s in tests|memory|run|notebooks|scaling) ;;
    *) echo "gpu_check: unknown stage '$s' in GPU_CHECK_STAGES; choose from: tests memory run notebooks scaling" >&2
       exit 2 ;;
  esac
done
export MEDISCOPE_PROGRESS=0 PYTHONUNBUFFERED=1

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: torch sees no CUDA device; run this on a GPU machine" >&2
  exit 2
fi
echo "== $(date -u '+%Y-%m-%d %H:%M UTC'), stages:$STAGES" | tee -a "$SUMMARY"
"$PY" - <<'PYEOF' | tee -a "$SUMMARY"
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
if want tests; then
  stage tests "$PY" -m pytest -q -p no:cacheprovider -o addopts=-ra -m cuda tests/
  grep -E "passed|failed|error" "$OUT/tests.log" | tail -n 1 | sed 's/^/  tests: /' | tee -a "$SUMMARY"
fi
if want memory; then
  stage memory "$PY" -m utils.benchmark --sections memory --output-dir "$OUT/benchmark" --device cuda
  grep -A7 "| stage | weights + grads" "$OUT/benchmark/benchmark.md" | tee -a "$SUMMARY"
fi
want run && stage run_fp16 "$PY" -m utils.run --profile full --output-dir "$RUN" --set amp=True --set amp_dtype=float16 \
  --set progress=False
want notebooks && stage notebooks "$PY" -m utils.run_notebooks --profile full --output-dir "$RUN"
if ! want scaling; then
  :
elif [ "$("$PY" -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then  # several GPUs: 1 vs N
  stage scaling "$PY" scripts/gpu_scaling.py --profile full --output-dir "$OUT/scaling"
  cat "$OUT/scaling/scaling.md" 2>/dev/null | tee -a "$SUMMARY"
else
  echo "scaling: one GPU visible, 1 vs N GPUs not measured (scripts/gpu_scaling.py)" | tee -a "$SUMMARY"
fi

if want run && [ -f "$RUN/timings.json" ]; then
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
