#pragma once
// Which SIMD path the CPU kernels take: the best the CPU supports, capped by the environment variable
// WS_CPU_SIMD = scalar | avx2 | avx2vnni | avx512 (read on every call, so tests and benchmarks can compare the paths).
// avx2vnni is the AVX2 path plus AVX-VNNI (avx_vnni()), which some int8 kernels use where the CPU has it.
#include <cstdlib>
#include <cstring>

namespace weightshare {

enum class Simd { Scalar = 0, Avx2 = 2, Avx512 = 3 };

inline Simd simd_level() {
#if defined(__x86_64__) || defined(_M_X64)
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                           __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi2");
  // the AVX-512 paths use byte permutes (VBMI) and int8 dot products (VNNI): Ice Lake, Sapphire Rapids, Zen 4+
  static const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                             __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx512vnni");
  Simd best = avx512 ? Simd::Avx512 : avx2 ? Simd::Avx2 : Simd::Scalar;
  const char* env = std::getenv("WS_CPU_SIMD");
  if (env != nullptr) {
    if (std::strcmp(env, "scalar") == 0 || std::strcmp(env, "0") == 0) return Simd::Scalar;
    if ((std::strcmp(env, "avx2") == 0 || std::strcmp(env, "avx2vnni") == 0) && best >= Simd::Avx2) return Simd::Avx2;
  }
  return best;
#else
  return Simd::Scalar;
#endif
}

// Whether the AVX2 path may use AVX-VNNI (vpdpbusd on 256-bit registers, VEX-encoded: Intel Alder Lake and later
// client cores, Sierra Forest, Zen 5): where the CPU has it, unless WS_CPU_SIMD=avx2 asks for plain AVX2 (an
// AVX2-only CPU without it, as benchmarks/avx2_only.sh emulates). Only read where simd_level() is Avx2.
inline bool avx_vnni() {
#if defined(__x86_64__) || defined(_M_X64)
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("avxvnni");
  if (!has) return false;
  const char* env = std::getenv("WS_CPU_SIMD");
  return env == nullptr || std::strcmp(env, "avx2") != 0;
#else
  return false;
#endif
}

// Which of shared_conv2d's own CPU kernels run (winograd_conv.cpp, direct_conv.cpp, depthwise_conv.cpp), from
// WS_CPU_CONV: unset = each where it is faster; winograd = the Winograd kernel wherever it applies (else as
// unset); direct = the direct kernel wherever it applies, never Winograd; blocked = the blocked GEMM of
// blocked_conv.cpp wherever it applies (else as unset); dense = none of them (decode + oneDNN).
// Tests and benchmarks use it to compare the paths.
enum class ConvKernels { Auto, Winograd, Direct, Blocked, Never };

inline ConvKernels conv_kernels() {
  const char* env = std::getenv("WS_CPU_CONV");
  if (env == nullptr) return ConvKernels::Auto;
  if (std::strcmp(env, "winograd") == 0) return ConvKernels::Winograd;
  if (std::strcmp(env, "direct") == 0) return ConvKernels::Direct;
  if (std::strcmp(env, "blocked") == 0) return ConvKernels::Blocked;
  if (std::strcmp(env, "dense") == 0) return ConvKernels::Never;
  return ConvKernels::Auto;
}

inline const char* simd_name(Simd s) {
  return s == Simd::Avx512 ? "avx512" : s == Simd::Avx2 ? "avx2" : "scalar";
}

}  // namespace weightshare

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define WS_X86 1
#define WS_AVX2 __attribute__((target("avx2,fma,f16c,bmi2")))
#define WS_AVX2_VNNI __attribute__((target("avx2,fma,f16c,bmi2,avxvnni")))
#define WS_AVX512 \
  __attribute__((target("avx2,fma,f16c,bmi2,avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx512vnni")))
#endif
