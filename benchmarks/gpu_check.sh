#!/usr/bin/env bash
# The one GPU check, for a lent H200 (device tool): build for sm_90a with all cores, run the CUDA tests, a
# compute-sanitizer memcheck and racecheck over small kernel runs, the GPU benchmarks and an ncu probe of the GEMVs.
#   device run:  WS_GPU_DEADLINE=470 bash benchmarks/gpu_check.sh [all|test|bench] 2>&1 | tee $OUT/gpu_check.log
#                with timeout_s ~495 (2026-11-30: the whole check took 277 s, 108 of them the build; since then two
#                fused GEMMs, two conv kernels and ~1,000 CUDA tests more: expect ~420 s; the machine's start adds
#                ~35 s, and a second start needs 240 s of device time left)
# A session has 15 minutes of device time in all, so one call does everything, against a deadline: every step is
# cut to the time left before WS_GPU_DEADLINE (default 560 s after the start), skipped when under 20 s are left, and
# the order puts first what a cut-short run must not lose (build, CUDA tests, the shared_linear benchmark). The
# device tool returns at most 8 files: the benchmark JSON go straight to $OUT (written row by row), every log goes
# into $OUT/logs.tar.gz, refreshed after each step. Then commit what returns under benchmarks/results/gpu/<date>-<GPU>.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/benchmarks/results/gpu}
LOGS=$(mktemp -d)
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=$(nproc) WS_CUDA=1 PYTHONUNBUFFERED=1
export WS_RESULTS_DIR="$OUT"
PY=${PYTHON:-python3}
PHASE=${1:-all}
DEADLINE=${WS_GPU_DEADLINE:-560}
case "$PHASE" in all|test|bench) ;; *) echo "usage: gpu_check.sh [all|test|bench]"; exit 2;; esac
t0=$SECONDS

pack_logs() { tar -C "$LOGS" -czf "$OUT/logs.tar.gz.tmp" . && mv "$OUT/logs.tar.gz.tmp" "$OUT/logs.tar.gz"; }

# step NAME MAX_S CMD...: CMD under `timeout min(MAX_S, time left - 10 s)`; its output to $LOGS/NAME.log
step() {
  local name=$1 max=$2; shift 2
  local left=$((DEADLINE - (SECONDS - t0) - 10))
  local lim=$((max < left ? max : left))
  if [ "$lim" -lt 20 ]; then echo "$name: skipped, $left s left"; return 0; fi
  local s=$SECONDS
  timeout "$lim" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc ($((SECONDS - s)) s of $lim): $(grep -v '^\s*$' "$LOGS/$name.log" | tail -1 | cut -c1-200)"
  pack_logs
  return 0
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  "$PY" -c "import torch, sys; print('torch', torch.__version__, 'python', sys.version.split()[0])"
  nproc; } 2>&1
"$PY" -m pip install -v --no-build-isolation --no-deps -e . > "$LOGS/build.log" 2>&1 || { tail -60 "$LOGS/build.log"; pack_logs; exit 1; }
echo "build: $((SECONDS - t0)) s; ptxas C7515 (serialised wgmma) warnings: $(grep -c C7515 "$LOGS/build.log")"
"$PY" -c "import weightshare as ws; assert ws.cuda_built(), 'CUDA kernels missing'; print('cuda kernels ok')" || exit 1

# pytest-xdist there: a crash (segfault) loses one worker's test, not the run; pytest-timeout stops a hung kernel
PYTEST=("$PY" -m pytest -q -rfE -p no:cacheprovider)
"$PY" -c "import xdist, pytest_timeout" 2>/dev/null && PYTEST+=(-n 8 --timeout=120)
if [ "$PHASE" != bench ]; then
  # every test parametrised with device=cuda (or path=cuda), the cuda-only ones and the tensor-core GEMV
  # (WS_CUDA_GEMV=mma); not the SASS checks (test_cuda_sass.py: static, CI runs them without a GPU, ~40 s)
  step tests_cuda 200 "${PYTEST[@]}" tests -k "(cuda or mma) and not sass"
fi
if [ "$PHASE" != test ]; then
  # the issue's targets first: a run cut short by the deadline keeps the rows written so far
  step bench_shared_linear 170 "$PY" benchmarks/bench_shared_linear.py --cuda
fi
if [ "$PHASE" != bench ]; then
  # every bad-input case on both devices (error messages that printed shapes crashed the torch 2.11 there once)
  step tests_bad_input 60 "${PYTEST[@]}" tests/test_bad_input.py
  if command -v compute-sanitizer >/dev/null; then
    step memcheck 60 compute-sanitizer --tool memcheck --error-exitcode 9 "$PY" benchmarks/gpu_sanitize_workload.py full
    step racecheck 45 compute-sanitizer --tool racecheck --error-exitcode 9 "$PY" benchmarks/gpu_sanitize_workload.py small
  fi
fi
if [ "$PHASE" != test ]; then
  step bench_assign 60 "$PY" benchmarks/bench_assign.py --cuda
  step bench_shared_conv 70 "$PY" benchmarks/bench_shared_conv.py --cuda
  step bench_resnet 50 "$PY" benchmarks/bench_resnet.py --cuda
  if command -v ncu >/dev/null; then  # DRAM throughput, occupancy, registers of the GEMVs and the fused GEMM
    step ncu_gemv 60 ncu --clock-control none -k regex:"gemv|gemm_" -c 8 --section SpeedOfLight --section Occupancy \
      --section LaunchStats --section MemoryWorkloadAnalysis "$PY" benchmarks/gpu_sanitize_workload.py gemv
  fi
fi
pack_logs
echo "gpu_check total $((SECONDS - t0)) s"
