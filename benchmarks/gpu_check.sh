#!/usr/bin/env bash
# One call on a fresh CUDA machine (H100/H200): install; the CUDA tests; a profile of the
# encoder's compiled step (benchmarks/gpu_profile.py); three models at full size; the quick step
# benchmark with every variant; peak memory; the kernel tests. Logs, JUnit XML and the benchmark
# JSON are packed into $OUT/gpu_check.tgz (default ./gpu_check_out). Every stage runs under
# `timeout`, capped by what is left of TOTAL_S (default 500 s), so the script ends in time.
#   bash benchmarks/gpu_check.sh            # exit status: 0 when every stage passed
# The interpreter: $PYTHON, else the first of python3 / python that imports torch (images where
# `python` is missing or is not the one with torch). A machine without network and without
# opacus (fx_bk imports it) needs its wheel beside the repo, in ./.whl, installed here into a
# private target (never into the image's packages):
#   python -m pip download --no-deps opacus==1.6.0 -d .whl   # on a machine with network
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-$REPO/gpu_check_out}  # gets gpu_check.tgz (everything), summary.txt, the JSON, test_cuda.log
FINAL_OUT=$OUT
OUT=$(mktemp -d)  # the stages write here; packed into $FINAL_OUT on exit (a few files, not 13)
pack() {
  mkdir -p "$FINAL_OUT"
  tar -czf "$FINAL_OUT/gpu_check.tgz" -C "$OUT" . 2>/dev/null
  cp "$OUT"/summary.txt "$OUT"/test_cuda.log "$OUT"/*.json "$FINAL_OUT"/ 2>/dev/null
}
trap pack EXIT
TOTAL_S=${TOTAL_S:-500}
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu: a dry run of the stages on a machine without a GPU
mkdir -p "$OUT"
PY=${PYTHON:-}
if [[ -z $PY ]]; then
  for cand in python3 python; do
    if command -v "$cand" >/dev/null && "$cand" -c "import torch" 2>/dev/null; then
      PY=$(command -v "$cand")
      break
    fi
  done
fi
[[ -n $PY ]] || { echo "no python with torch on PATH (set PYTHON)"; exit 2; }
SITE=""
if compgen -G "$REPO/.whl/*.whl" >/dev/null; then  # carried wheels, e.g. opacus
  SITE=$(mktemp -d)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$REPO"/.whl/*.whl \
    || echo "installing .whl/*.whl failed"
fi
export PYTHONPATH="$REPO${SITE:+:$SITE}${PYTHONPATH:+:$PYTHONPATH}"  # works where install fails
export PYTHONUNBUFFERED=1
SUMMARY=()
FAILED=0
PYTEST=("$PY" -m pytest -q -rs -o addopts= -p no:cacheprovider)

# run NAME BUDGET_S CMD...: CMD under timeout min(BUDGET_S, time left), output to $OUT/NAME.log
run() {
  local name=$1 budget=$2
  shift 2
  local left=$((TOTAL_S - SECONDS - 5))
  local limit=$((budget < left ? budget : left))
  if ((limit < 10)); then
    SUMMARY+=("$(printf '%-16s SKIPPED (no time left of TOTAL_S=%s)' "$name" "$TOTAL_S")")
    FAILED=1
    return
  fi
  echo "=== $name (limit ${limit} s): $*"
  local t0=$SECONDS rc
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  local status="ok"
  if ((rc == 124 || rc == 137)); then status="TIMED OUT"; elif ((rc != 0)); then status="FAILED"; fi
  ((rc != 0)) && FAILED=1
  local last
  last=$(grep -E "passed|failed|skipped|error|wall time" "$OUT/$name.log" | tail -1)
  SUMMARY+=("$(printf '%-16s %-9s rc=%-3s %4ss  %s' "$name" "$status" "$rc" \
                $((SECONDS - t0)) "$last")")
}

# 1. environment and install (the machine may have no network: pip then fails fast and the
#    repo is used from PYTHONPATH with the torch / triton already installed)
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'available', torch.cuda.is_available(),
torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
  "$PY" -c "import triton; print('triton', triton.__version__)" || echo "triton: NOT installed"
} 2>&1 | tee "$OUT/env.log"
INSTALL='"$PY" -m pip install -q --disable-pip-version-check --retries 0 --timeout 10 -e ".[test]" \
  || "$PY" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . \
  || echo "pip install failed: using PYTHONPATH=$PYTHONPATH"
"$PY" -c "import fx_bk, opacus, torch; assert \"$DEVICE\" == \"cpu\" or torch.cuda.is_available(), \"no CUDA device\"
print(\"fx_bk from\", fx_bk.__file__)"'
run install 120 env PY="$PY" DEVICE="$DEVICE" bash -c "$INSTALL"

# 2. the CUDA tests: the Triton ghost-norm kernel compiled for the GPU, the rounding guard on the
#    GPU (also under CUDA-graph capture), TF32 refused, and the oracle checks (MLP, transformer,
#    GroupNorm CNN; eager and compiled; float32 and bf16 autocast); 4 workers where xdist is
#    installed
WORKERS=()
"$PY" -c "import xdist" 2>/dev/null && WORKERS=(-n 4)
run test_cuda 170 "${PYTEST[@]}" "${WORKERS[@]}" tests/test_cuda.py --junitxml="$OUT/test_cuda.xml"
# 3. where the encoder's compiled step spends its time: the guard's host sync and the Triton
#    kernel swapped out at run time, then one profiled step (docs/benchmarks.md)
run profile 100 "$PY" -m benchmarks.gpu_profile --model encoder --device "$DEVICE" \
  --json "$OUT/profile-encoder-$DEVICE.json"
# 4. the full sizes (the README's CPU table's shapes) of three models, fx_bk vs non-private,
#    with the first-call and bf16 columns
run bench_full 170 "$PY" -m benchmarks.step --device "$DEVICE" --autocast bf16 --rounds 3 \
  --models encoder gpt2 cnn --variants "non-private compiled" "fx_bk compiled" \
  --no-memory --no-plot --json "$OUT/step-full-$DEVICE.json"
# 5. every model and variant (Opacus too) at quick sizes; then peak memory
#    (torch.cuda.max_memory_allocated, a fresh process per variant) of one model
run bench_step 150 "$PY" -m benchmarks.step --quick --device "$DEVICE" --autocast bf16 \
  --rounds 3 --no-memory --no-plot --json "$OUT/step-quick-$DEVICE.json"
run bench_memory 60 "$PY" -m benchmarks.step --quick --device "$DEVICE" --models encoder \
  --variants "fx_bk compiled" --rounds 2 --no-plot --json "$OUT/step-quick-memory-$DEVICE.json"
# 6. the kernel tests (the blocked formula, the custom op, Triton's interpreter, embedding grad)
run test_kernels 60 "${PYTEST[@]}" tests/test_kernels.py --junitxml="$OUT/test_kernels.xml"

echo
echo "=== summary (${SECONDS} s of TOTAL_S=${TOTAL_S}; logs in $FINAL_OUT/gpu_check.tgz)"
printf '%s\n' "${SUMMARY[@]}" | tee "$OUT/summary.txt"
[[ -f $OUT/profile.log ]] && sed -n '/^| variant | median ms/,/^$/p' "$OUT/profile.log"
for f in "$OUT"/bench_step.log "$OUT"/bench_full.log "$OUT"/bench_memory.log; do  # the benchmark tables
  [[ -f $f ]] && sed -n '/^| model | arithmetic floor/,/^$/p' "$f"
done
exit "$FAILED"
