#!/usr/bin/env bash
# weightshare's one entry point for people and CI.
#   bash run.sh demo [args]   set up (idempotent), then run the MNIST demo: python -m weightshare demo [args]
#   bash run.sh test [args]   set up (idempotent), then run the test suite: python -m pytest tests [args]
#   bash run.sh setup         only the set-up: torch 2.14.1 + build/test dependencies, then the native build
# Environment: WS_CUDA=auto|1|0 (CUDA kernels; auto = when torch is a CUDA build and nvcc is on the PATH),
#              TORCH_CUDA_ARCH_LIST (default 9.0a), MAX_JOBS (parallel compile jobs), PYTHON (interpreter).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}

setup() {
  local t0=$SECONDS
  # torch: the CUDA 13.0 build (it runs on the CPU too, and lets nvcc build our CUDA kernels against it)
  if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '2.14.1' else 1)" 2>/dev/null; then
    echo "== installing torch==2.14.1"
    "$PYTHON" -m pip install --quiet "torch==2.14.1"
  fi
  echo "== installing build and test dependencies"
  "$PYTHON" -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
  echo "== building the native library (WS_CUDA=${WS_CUDA:-auto})"
  local tb=$SECONDS
  # -v shows CMake/Ninja lines: which sources compiled (.cpp and .cu) and how long the native build took, and ptxas
  # C7515 (a serialised wgmma pipeline, which ptxas reports only as "info")
  "$PYTHON" -m pip install --disable-pip-version-check --no-build-isolation --no-deps -v -e . 2>&1 \
    | grep -E "weightshare:|Building (CXX|CUDA)|Linking|error|Error|warning: |C7515" || true
  "$PYTHON" -c "import weightshare as ws; assert ws.NATIVE, ws.NATIVE_ERROR; print('== native library loaded; CUDA kernels built:', ws.cuda_built())"
  echo "== set-up took $((SECONDS - t0)) s (build step $((SECONDS - tb)) s)"
}

cmd=${1:-}
shift || true
case "$cmd" in
  setup) setup ;;
  demo) setup; exec "$PYTHON" -m weightshare demo "$@" ;;
  test) setup; exec "$PYTHON" -m pytest tests -q "$@" ;;
  *) echo "usage: bash run.sh demo|test|setup [args]" >&2; exit 2 ;;
esac
