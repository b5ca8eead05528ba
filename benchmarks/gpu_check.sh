#!/usr/bin/env bash
# Verify a GPU machine in three steps, each well under 10 minutes, with no network:
#
#   bash benchmarks/gpu_check.sh build-test OUT [--wheels DIR]   install + build sm_90 + GPU tests
#   bash benchmarks/gpu_check.sh bench      OUT [-- ARGS...]     the GPU benchmark set (python -m benchmarks ARGS)
#   bash benchmarks/gpu_check.sh tune       OUT                  one tuning sweep (benchmarks/tune_triton.py)
#
# Logs and results go under OUT. The package is installed from this checkout against the
# machine's own python3, torch and triton (nothing is downloaded: pip runs with --no-index);
# peer packages to benchmark against (trl, liger-kernel, verl, ...) are installed from the
# wheels in --wheels DIR, and a contender that still cannot be imported is skipped by the
# benchmarks with a line saying so. Every step first checks that torch sees a CUDA GPU and
# stops with status 2 and a message when it does not, so a dry run on a CPU machine fails
# early and clearly. Each command in a step runs under `timeout` (STEP_SECONDS, default 540).
set -uo pipefail
cd "$(dirname "$0")/.."

usage() {
  sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 64
}

[ $# -ge 2 ] || usage
step=$1 out=$2
shift 2
wheels="" extra=()
while [ $# -gt 0 ]; do
  case $1 in
    --wheels) [ $# -ge 2 ] || usage; wheels=$2; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    *) usage ;;
  esac
done
case $step in build-test|bench|tune) ;; *) usage ;; esac

PY=${PYTHON:-python3}
LIMIT=${STEP_SECONDS:-540}
mkdir -p "$out"
out=$(cd "$out" && pwd)
log() { echo "[gpu_check $step] $*" | tee -a "$out/gpu_check.log"; }
run() {  # run NAME CMD...: the command's output in OUT/NAME.log, its status returned
  local name=$1
  shift
  log "$name: $*"
  timeout "$LIMIT" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  [ $rc -eq 124 ] && log "$name: stopped after $LIMIT s (STEP_SECONDS)"
  log "$name: exit $rc (log: $out/$name.log)"
  return $rc
}

# --- the machine: versions, and a GPU or a clear stop ---------------------------------
{
  echo "date: $(date -u +%FT%TZ)"
  echo "python: $($PY --version 2>&1)"
  $PY - <<'EOF' 2>&1
import torch
print("torch:", torch.__version__, "cuda:", torch.version.cuda)
try:
    import triton
    print("triton:", triton.__version__)
except ImportError as exc:
    print("triton: not importable:", exc)
print("gpu:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
EOF
  command -v nvcc >/dev/null && nvcc --version | tail -1 || echo "nvcc: not found"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
    || echo "nvidia-smi: not found"
} >"$out/machine.txt" 2>&1
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  log "needs a CUDA GPU: torch.cuda.is_available() is False here (see $out/machine.txt); nothing was run"
  exit 2
fi
log "$(grep -E '^(torch|triton|gpu):' "$out/machine.txt" | tr '\n' ' ')"

case $step in
build-test)
  if [ -n "$wheels" ]; then
    shopt -s nullglob
    found=("$wheels"/*.whl)
    if [ ${#found[@]} -eq 0 ]; then
      log "no wheels in $wheels"
    else
      # --no-deps: the machine's torch, triton and transformers stay as they are.
      run wheels "$PY" -m pip install --no-index --no-deps "${found[@]}" || log "some wheels did not install"
    fi
  fi
  # sm_80 and sm_90 (setup.py's CUDA_ARCHS); GRPO_KERNELS_CUDA=1 makes a missing nvcc an error.
  GRPO_KERNELS_CUDA=1 run build "$PY" -m pip install --no-index --no-build-isolation --no-deps -e . || exit 1
  run backends "$PY" -c "import grpo_kernels as gk; b = gk.available_backends('cuda'); print(b); \
assert {'triton', 'cuda'} <= set(b), f'missing GPU backends: {b}'" || exit 1
  # The whole suite on the GPU (conftest puts tensors on CUDA and adds the GPU backends), in
  # parallel workers; failures are listed at the end of tests.log and in tests.xml.
  run tests "$PY" -m pytest -q -n 8 -p no:cacheprovider --junitxml="$out/tests.xml" -W ignore::DeprecationWarning
  rc=$?
  tail -5 "$out/tests.log" | tee -a "$out/gpu_check.log"
  exit $rc
  ;;
bench)
  run benchmarks "$PY" -m benchmarks --out "$out/results" "${extra[@]}"
  rc=$?
  tail -20 "$out/benchmarks.log" | tee -a "$out/gpu_check.log"
  exit $rc
  ;;
tune)
  run tune "$PY" -m benchmarks.tune_triton --out "$out/tune"
  rc=$?
  tail -20 "$out/tune.log" | tee -a "$out/gpu_check.log"
  exit $rc
  ;;
esac
