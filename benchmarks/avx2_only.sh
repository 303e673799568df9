#!/usr/bin/env bash
# Runs a command as on an AVX2-only CPU (no AVX-512), emulated on an AVX-512 one by capping every library that picks
# its kernels at run time: ours (WS_CPU_SIMD), oneDNN (F.conv2d, F.linear), MKL (GEMMs) and FBGEMM (torch's int8
# dynamic Linear; without its cap it keeps AVX-512 VNNI, 2x faster than its AVX2 kernel at batch 64).
#   bash benchmarks/avx2_only.sh python benchmarks/bench_shared_linear.py     # writes *_avx2.json
set -euo pipefail
export WS_CPU_SIMD=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 FBGEMM_ENABLE_INSTRUCTIONS=AVX2
exec "$@"
