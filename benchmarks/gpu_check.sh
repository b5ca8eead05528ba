#!/usr/bin/env bash
# Verify a GPU machine with no network, within one lease:
#
#   bash benchmarks/gpu_check.sh all        OUT [--wheels DIR]  build, GPU tests, core benchmarks: <= 8 min
#   bash benchmarks/gpu_check.sh build-test OUT [--wheels DIR]  install + build sm_90 + the whole suite on the GPU
#   bash benchmarks/gpu_check.sh bench      OUT [-- ARGS...]    the full GPU sweep (python -m benchmarks ARGS)
#   bash benchmarks/gpu_check.sh tune       OUT                 one tuning sweep (benchmarks/tune_triton.py)
#
# Everything goes under OUT: one log per step (NAME.log), gpu_check.log (what ran, each step's
# budget, time and exit status), steps.tsv (the same as a table), machine.txt, the tests' junit
# XML, one benchmark result folder per task (bench-*/results.md, .csv, .png), and, for `all`, the
# lot packed as OUT/gpu_check.tar.gz (one file to bring back: through the device tool, give an OUT
# outside its $OUT and copy gpu_check.tar.gz and gpu_check.log into $OUT).
#
# `all` runs its steps against a budget ledger: each step has a budget (printed first; they add up
# to 470 s, under 8 minutes, and a warning says so if BUDGET_<step> overrides, e.g.
# BUDGET_tests_suite=150, take them past GPU_CHECK_SECONDS, default 470), is stopped at its own
# deadline (`timeout`), and time a step leaves unused passes to the next, so a slow step costs only
# itself and a partial result always comes back. The CUDA extension is built for sm_90 alone
# (TORCH_CUDA_ARCH_LIST=9.0) with MAX_JOBS=16 parallel compile jobs.
#
# The package is installed from this checkout against the machine's own python3, torch and
# triton (nothing is downloaded: pip runs with --no-index); peer packages to benchmark against
# (trl, liger-kernel, verl, ...; benchmarks/peer_wheels.sh fetches them, < 64 MiB) are installed
# from the wheels in --wheels DIR, and a contender that still cannot be imported is skipped by the
# benchmarks with a line saying so. Every step first checks that torch sees a CUDA GPU and stops
# with status 2 and a message when it does not, so a dry run on a CPU machine fails early and
# clearly. Outside `all`, each command runs under `timeout` (STEP_SECONDS, default 540).
set -uo pipefail
cd "$(dirname "$0")/.."

usage() {
  sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//' >&2
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
case $step in all|build-test|bench|tune) ;; *) usage ;; esac

PY=${PYTHON:-python3}
LIMIT=${STEP_SECONDS:-540}
export PYTHONUNBUFFERED=1
mkdir -p "$out"
out=$(cd "$out" && pwd)
started=$(date +%s)
log() { echo "[gpu_check $step +$(( $(date +%s) - started ))s] $*" | tee -a "$out/gpu_check.log"; }

# run NAME SECONDS CMD...: the command under `timeout SECONDS`, its output in OUT/NAME.log; its
# status returned (124: stopped at its limit) and recorded in OUT/steps.tsv.
run() {
  local name=$1 limit=$2
  shift 2
  [ "$limit" -ge 1 ] || limit=1
  log "$name: limit ${limit} s: $*"
  local t0 rc
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$out/$name.log" 2>&1
  rc=$?
  local took=$(( $(date +%s) - t0 ))
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && log "$name: STOPPED at its limit of $limit s (partial output in $name.log)"
  log "$name: exit $rc after ${took} s (log: $out/$name.log)"
  printf '%s\t%s\t%s\t%s\n' "$name" "$limit" "$took" "$rc" >>"$out/steps.tsv"
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
  echo "cpus: $(nproc 2>/dev/null || echo unknown)"
} >"$out/machine.txt" 2>&1
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  log "needs a CUDA GPU: torch.cuda.is_available() is False here (see $out/machine.txt); nothing was run"
  exit 2
fi
log "$(grep -E '^(torch|triton|gpu):' "$out/machine.txt" | tr '\n' ' ')"

install_wheels() {  # install_wheels LIMIT: the peers' wheels from --wheels DIR, if given
  [ -n "$wheels" ] || return 0
  shopt -s nullglob
  local found=("$wheels"/*.whl)
  if [ ${#found[@]} -eq 0 ]; then
    log "no wheels in $wheels"
    return 0
  fi
  # --no-deps: the machine's torch, triton and transformers stay as they are.
  run wheels "$1" "$PY" -m pip install --no-index --no-deps "${found[@]}" || log "some wheels did not install"
}

build() {  # build LIMIT: this checkout, editable, with the CUDA extension (a missing nvcc is an error)
  GRPO_KERNELS_CUDA=1 run build "$1" "$PY" -m pip install --no-index --no-build-isolation --no-deps -e .
}

check_backends() {  # check_backends LIMIT
  run backends "$1" "$PY" -c "import grpo_kernels as gk; b = gk.available_backends('cuda'); print(b); \
assert {'triton', 'cuda'} <= set(b), f'missing GPU backends: {b}'"
}

pytest_args() {  # pytest's options here: 8 workers and a per-test limit where xdist and pytest-timeout are
  local args=(-v -p no:cacheprovider -W ignore::DeprecationWarning -rfEs)
  if $PY -c "import xdist" 2>/dev/null; then args+=(-n 8); fi
  if $PY -c "import pytest_timeout" 2>/dev/null; then args+=(--timeout=120); fi
  echo "${args[@]}"
}

# --- `all`: one lease -------------------------------------------------------------------
# step name, budget in seconds, what it does (the core benchmark set: issue #27's GPU workloads).
ALL_STEPS=(
  "wheels 10 the peers' wheels (trl, liger-kernel, verl) from --wheels DIR"
  "build 60 pip install -e . with the CUDA extension for sm_90 only"
  "backends 10 torch, triton and cuda backends importable on the GPU"
  "tests_core 50 CUDA graphs, no syncs with validate=False, GPU-only tests, the backend contract"
  "tests_suite 70 parity, invariants and bad inputs of every backend on CUDA tensors"
  "bench_loss 95 loss from logits fwd+bwd, bf16, N=16384, V=151936"
  "bench_linear 105 fused-linear loss fwd+bwd, bf16, N=8192, H=4096, V=151936"
  "bench_logprobs 45 log-probs forward, bf16, N=8192, V=151936"
  "bench_small 25 group advantages, the objective alone, verl's policy loss at 1M elements, fp32"
)
budget_of() {  # budget_of STEP DEFAULT: BUDGET_<step> or the default
  local var="BUDGET_$1"
  echo "${!var:-$2}"
}

run_all() {
  local total=${GPU_CHECK_SECONDS:-470} sum=0 entry name secs what
  declare -A budget
  log "plan (budget ledger of ${total} s; a step's unused time passes to the next):"
  for entry in "${ALL_STEPS[@]}"; do
    read -r name secs what <<<"$entry"
    budget[$name]=$(budget_of "$name" "$secs")
    sum=$(( sum + budget[$name] ))
    log "  $(printf '%-15s %4s s  (by +%4s s)  %s' "$name" "${budget[$name]}" "$sum" "$what")"
  done
  [ "$sum" -le "$total" ] || log "WARNING: the budgets add up to $sum s, over GPU_CHECK_SECONDS=$total"
  # Each step's deadline is the sum of the budgets up to it, counted from the start.
  local deadline=$started lim
  next() { deadline=$(( deadline + budget[$1] )); lim=$(( deadline - $(date +%s) )); }
  export TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16
  local bench=("$PY" -m benchmarks --full --time-cap 1 --repeats 5)
  next wheels
  install_wheels "$lim"
  next build
  if ! build "$lim"; then  # an editable install needs a recent setuptools; the tests need only the built modules
    lim=$(( deadline - $(date +%s) ))
    run build_inplace "$lim" "$PY" setup.py build_ext --inplace ||
      { log "the build failed: no tests, no benchmarks (see build.log, build_inplace.log)"; return 1; }
  fi
  next backends
  check_backends "$lim"
  next tests_core
  # shellcheck disable=SC2046
  run tests_core "$lim" "$PY" -m pytest $(pytest_args) --junitxml="$out/tests_core.xml" \
    tests/test_cuda_graphs.py tests/test_gpu.py tests/test_sync_free.py tests/test_backend_contract.py
  next tests_suite
  # shellcheck disable=SC2046
  run tests_suite "$lim" "$PY" -m pytest $(pytest_args) --junitxml="$out/tests_suite.xml" \
    tests/test_parity.py tests/test_invariants.py tests/test_bad_inputs.py tests/test_truncation.py
  next bench_loss
  run bench_loss "$lim" "${bench[@]}" --out "$out/bench_loss" --tasks loss --tokens 16384 --vocab 151936 \
    --dtypes bfloat16
  next bench_linear
  run bench_linear "$lim" "${bench[@]}" --out "$out/bench_linear" --tasks linear --tokens 8192 --vocab 151936 \
    --hidden 4096 --dtypes bfloat16
  next bench_logprobs
  run bench_logprobs "$lim" "${bench[@]}" --out "$out/bench_logprobs" --tasks logprobs --tokens 8192 \
    --vocab 151936 --dtypes bfloat16
  next bench_small
  run bench_small "$lim" "${bench[@]}" --out "$out/bench_small" --tasks advantages,objective,verl_policy \
    --tokens 1048576 --dtypes float32
  return 0
}

summary() {  # the tests' last lines and the benchmark tables, into gpu_check.log
  local f
  for f in tests_core tests_suite; do
    [ -f "$out/$f.log" ] && { log "$f:"; grep -E "(passed|failed|error)" "$out/$f.log" | tail -2 | tee -a "$out/gpu_check.log"; }
  done
  for f in "$out"/bench_*/results.md; do
    [ -f "$f" ] && grep -E "^\| (contender|grpo_kernels|eager|torch.compile|TRL|Liger|verl)" "$f" \
      | cut -d'|' -f2,3,9,10 | tee -a "$out/gpu_check.log"
  done
  log "steps (name, limit s, took s, exit):"
  column -t "$out/steps.tsv" 2>/dev/null | tee -a "$out/gpu_check.log" || cat "$out/steps.tsv"
  log "total $(( $(date +%s) - started )) s"
}

case $step in
all)
  run_all
  rc=$?
  summary
  packed=$(mktemp "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
  tar czf "$packed" -C "$out" --exclude=gpu_check.tar.gz . && mv "$packed" "$out/gpu_check.tar.gz" \
    && log "packed: $out/gpu_check.tar.gz ($(du -h "$out/gpu_check.tar.gz" | cut -f1))"
  exit $rc
  ;;
build-test)
  install_wheels "$LIMIT"
  TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} build "$LIMIT" || exit 1
  check_backends "$LIMIT" || exit 1
  # The whole suite on the GPU (conftest puts tensors on CUDA and adds the GPU backends), in
  # parallel workers; failures are listed at the end of tests.log and in tests.xml.
  # shellcheck disable=SC2046
  run tests "$LIMIT" "$PY" -m pytest $(pytest_args) --junitxml="$out/tests.xml"
  rc=$?
  tail -5 "$out/tests.log" | tee -a "$out/gpu_check.log"
  exit $rc
  ;;
bench)
  run benchmarks "$LIMIT" "$PY" -m benchmarks --out "$out/results" "${extra[@]}"
  rc=$?
  tail -20 "$out/benchmarks.log" | tee -a "$out/gpu_check.log"
  exit $rc
  ;;
tune)
  run tune "$LIMIT" "$PY" -m benchmarks.tune_triton --out "$out/tune"
  rc=$?
  tail -20 "$out/tune.log" | tee -a "$out/gpu_check.log"
  exit $rc
  ;;
esac
