#!/usr/bin/env bash
# The one GPU check, for a lent H200 (device tool): build for sm_90 with all cores, run the CUDA tests (and a
# compute-sanitizer memcheck and racecheck passes over small kernel runs), run the GPU benchmarks; logs and JSON go to $OUT.
#   device run:  bash benchmarks/gpu_check.sh [all|test|bench]     (default all; timeout_s ~ 590)
# The whole check may need more than one device call's 600 s: then run `test` and, straight after (the warm machine
# keeps the build; an idle one is released after ~30 s), `bench`. Each phase builds first (a no-op when built; the
# first build took 138 s). The timeouts keep each phase within one call: test 460 s + the build, bench 540 s; logs
# and JSON are written as they go, so a phase cut short still returns what it measured.
# Then commit the JSON it returns under benchmarks/results/ with the date and the GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/benchmarks/results/gpu}
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=$(nproc) WS_CUDA=1 PYTHONUNBUFFERED=1
export WS_RESULTS_DIR="$OUT"
PY=${PYTHON:-python3}
PHASE=${1:-all}
case "$PHASE" in all|test|bench) ;; *) echo "usage: gpu_check.sh [all|test|bench]"; exit 2;; esac
t0=$SECONDS
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; "$PY" -c "import torch; print(torch.__version__)"; } \
  > "$OUT/env.txt" 2>&1
"$PY" -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "build: $((SECONDS - t0)) s"
"$PY" -c "import weightshare as ws; assert ws.cuda_built(), 'CUDA kernels missing'; print('cuda kernels ok')"
if [ "$PHASE" != bench ]; then
# CUDA tests: every test parametrised with device=cuda (or path=cuda), plus the cuda-only ones; up to 40 failures
# reported, not the first only: the kernels written since the last GPU run have never run
timeout 220 "$PY" -m pytest tests -q --maxfail=40 -k "cuda and not mma" -p no:cacheprovider > "$OUT/tests_cuda.log" 2>&1
echo "cuda tests rc=$? ($(tail -1 "$OUT/tests_cuda.log"))"
# the opt-in tensor-core GEMV (WS_CUDA_GEMV=mma), untested on a GPU before: every case, no stop at the first failure
timeout 90 "$PY" -m pytest tests/test_shared_linear.py -q -k "mma" -p no:cacheprovider > "$OUT/tests_cuda_mma.log" 2>&1
echo "mma GEMV tests rc=$? ($(tail -1 "$OUT/tests_cuda_mma.log"))"
# every bad-input case on both devices (error messages that print shapes crashed this machine's torch 2.11 once)
timeout 45 "$PY" -m pytest tests/test_bad_input.py -q -p no:cacheprovider > "$OUT/tests_bad_input.log" 2>&1
echo "bad-input tests rc=$? ($(tail -1 "$OUT/tests_bad_input.log"))"
if command -v compute-sanitizer >/dev/null; then
  timeout 60 compute-sanitizer --tool memcheck --error-exitcode 9 "$PY" -c "
import torch, weightshare as ws
w = torch.randn(1000, 77, device='cuda'); cb = torch.randn(1, 16, device='cuda')
i = ws.ops.assign(w, cb); p = ws.ops.pack(i, 4); ws.ops.unpack(p, 4, 77); ws.ops.kmeans_step(w, i, 16)
ws.ops.loss_aware_assign(w, w, w.abs(), cb)
x = torch.randn(3, 77, device='cuda', dtype=torch.float16)
ws.ops.shared_linear(x, p, cb, 4, 1000, 77); ws.ops.shared_linear(x, p, cb, 4, 1000, 77, None, 'int8')
wt = torch.randn(40, 8192, device='cuda'); pt = ws.ops.pack(ws.ops.assign(wt, cb), 4)  # thin rows: split-K + finalize
xt = torch.randn(11, 8192, device='cuda'); ws.ops.shared_linear(xt[:1], pt, cb, 4, 40, 8192)
ws.ops.shared_linear(xt, pt, cb, 4, 40, 8192, None, 'int8')
import os; os.environ['WS_CUDA_GEMV'] = 'mma'  # the tensor-core GEMV: pair tables (4-bit) and per-row tables (3-bit)
ws.ops.shared_linear(x, p, cb, 4, 1000, 77); cr = torch.randn(1000, 8, device='cuda')
ws.ops.shared_linear(x[:, 1:].contiguous(), ws.ops.pack(ws.ops.assign(w[:, :76].contiguous(), cr), 3), cr, 3, 1000, 76)
torch.cuda.synchronize(); print('memcheck workload done')" > "$OUT/memcheck.log" 2>&1
  echo "memcheck rc=$? ($(grep -c 'ERROR SUMMARY: 0' "$OUT/memcheck.log") clean summaries)"
  timeout 45 compute-sanitizer --tool racecheck --error-exitcode 9 "$PY" -c "
import torch, weightshare as ws
w = torch.randn(512, 300, device='cuda'); cb = torch.randn(1, 16, device='cuda'); i = ws.ops.assign(w, cb)
p = ws.ops.pack(i, 4); ws.ops.kmeans_step(w, i, 16)
for m in (1, 64):
    x = torch.randn(m, 300, device='cuda', dtype=torch.float16, requires_grad=True)
    c = cb.half().clone().requires_grad_()
    ws.ops.shared_linear(x, p, c, 4, 512, 300).sum().backward()
torch.cuda.synchronize(); print('racecheck workload done')" > "$OUT/racecheck.log" 2>&1
  echo "racecheck rc=$? ($(grep -c 'ERROR SUMMARY: 0' "$OUT/racecheck.log") clean summaries)"
fi
fi
if [ "$PHASE" != test ]; then
timeout 120 "$PY" benchmarks/bench_assign.py --cuda 2>&1 | tail -4
timeout 280 "$PY" benchmarks/bench_shared_linear.py --cuda 2>&1 | tail -32
timeout 80 "$PY" benchmarks/bench_shared_conv.py --cuda 2>&1 | tail -9
timeout 60 "$PY" benchmarks/bench_resnet.py --cuda 2>&1 | tail -3
fi
echo "gpu_check total $((SECONDS - t0)) s"
