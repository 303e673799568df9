#!/usr/bin/env bash
# Rehearse the lent GPU machine's build before spending its minutes: build this commit for sm_90a against the torch
# the device runs (2.11.0+cu130 when last read; BUILD-NOTES.md) and run the test suite on this CPU with it. The
# project itself uses torch 2.14.1; a header or Python API that 2.11 lacks would otherwise first show on the GPU,
# where a failed build costs the session's device time (the 2026-11-30 run found error messages that crashed
# under 2.11 that way).
#
# Usage:  bash scripts/device_torch_build.sh [pytest args]      (default: -x tests, the whole suite)
# Env:    WS_DEVICE_TORCH (default 2.11.0), WS_DEVICE_VENV (default /tmp/ws-torch-<version>: reused),
#         MAX_JOBS (default: all cores). The torch wheel comes from the local package index (no network).
# Takes: ~5 min to build on 2 cores (2026-12-01: every .cu compiled, no ptxas C7515), then the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${WS_DEVICE_TORCH:-2.11.0}
VENV=${WS_DEVICE_VENV:-/tmp/ws-torch-$VERSION}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet "torch==$VERSION" 2>&1 | grep -v "is ignored" || true
  "$VENV/bin/pip" install --quiet -r requirements-dev.txt 2>&1 | grep -v "is ignored" || true
fi
"$VENV/bin/python" -c "import torch; print('torch', torch.__version__)"
# a clean copy of this commit: the editable install in the venv must not touch this checkout's build
SRC=$(mktemp -d)
trap 'rm -rf "$SRC"' EXIT
git clone --quiet . "$SRC"
cd "$SRC"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} WS_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
"$VENV/bin/python" -m pip install --no-build-isolation --no-deps -v -e . > build.log 2>&1 || { tail -60 build.log; exit 1; }
echo "build ok; ptxas C7515 (serialised wgmma) warnings: $(grep -c C7515 build.log || true)"
"$VENV/bin/python" -c "import weightshare as ws; assert ws.cuda_built(), 'CUDA kernels missing'; print('cuda kernels built')"
[ $# -gt 0 ] || set -- -x tests
"$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
