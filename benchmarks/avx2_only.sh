#!/usr/bin/env bash
# Runs a command as on an AVX2-only CPU (no AVX-512), emulated on an AVX-512 one by capping every library that picks
# its kernels at run time: ours (WS_CPU_SIMD), oneDNN (F.conv2d, F.linear), MKL (GEMMs) and FBGEMM (torch's int8
# dynamic Linear; without its cap it keeps AVX-512 VNNI, 2x faster than its AVX2 kernel at batch 64).
#   bash benchmarks/avx2_only.sh python benchmarks/bench_shared_linear.py     # writes *_avx2.json
#   WS_CPU_SIMD=avx2vnni bash benchmarks/avx2_only.sh python ...              # with AVX-VNNI: *_avx2vnni.json
set -euo pipefail
# WS_CPU_SIMD=avx2vnni (set by the caller) keeps our kernels' AVX-VNNI where the CPU has it: an AVX2 CPU with
# AVX-VNNI (Intel's client and Atom-core server CPUs); otherwise plain AVX2
[ "${WS_CPU_SIMD:-}" = avx2vnni ] || WS_CPU_SIMD=avx2
export WS_CPU_SIMD ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 FBGEMM_ENABLE_INSTRUCTIONS=AVX2
exec "$@"
