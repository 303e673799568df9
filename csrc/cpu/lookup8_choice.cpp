// lookup8_gathers(): gathers or scalar loads for the AVX2 GEMV's 6-8-bit table lookups, timed once on this core.
//
// Neither wins everywhere: AVX2 gathers are microcoded and slow on AMD (Zen 4 VM: 10 cycles per 8 entries against
// 5.3-5.7 for scalar loads into lanes) and on Intel cores running the gather-data-sampling microcode, but fast on
// Intel cores without it (Intel VM: 4.1 against 5.9, where the scalar form is bound by its vpinsrd shuffles). No
// CPUID bit says which microcode runs, so both are timed on an L1-resident table, the way the GEMV uses them.
#include <chrono>
#include <cstdlib>
#include <cstring>

#include "weightshare/cpu_decode.h"

namespace weightshare {
#ifdef WS_X86
namespace {

constexpr int kIndexBytes = 4096;  // one L1-resident 8-bit index stream (512 steps of 8), as a GEMV row chunk

template <bool GATHER>
WS_AVX2 __attribute__((noinline)) float lookup_pass(const uint8_t* idx, const float* table) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0;  // two chains, as rows_lookup has
  for (int i = 0; i < kIndexBytes; i += 16) {
    uint64_t v0, v1;
    std::memcpy(&v0, idx + i, 8);
    std::memcpy(&v1, idx + i + 8, 8);
    a0 = _mm256_add_ps(a0, GATHER ? lookup8_gather<8>(v0, table) : lookup8_scalar<8>(v0, table));
    a1 = _mm256_add_ps(a1, GATHER ? lookup8_gather<8>(v1, table) : lookup8_scalar<8>(v1, table));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_add_ps(a0, a1));
  return lanes[0];
}

// Best of several passes (seconds): the minimum discounts interruptions, and the two forms alternate so that a
// clock change affects both.
template <bool GATHER>
double best_pass(const uint8_t* idx, const float* table, double best, float& sink) {
  const auto t0 = std::chrono::steady_clock::now();
  sink += lookup_pass<GATHER>(idx, table);
  const double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return t < best ? t : best;
}

bool measure_gathers_faster() {
  // the CPU's own support, not simd_level(): WS_CPU_SIMD may cap the path of the call that happens to come first
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return false;
  alignas(64) float table[256];
  alignas(64) uint8_t idx[kIndexBytes];
  uint32_t s = 0x9E3779B9u;  // xorshift: indices spread over the whole table, as k-means codebooks are used
  for (int i = 0; i < kIndexBytes; ++i) {
    s ^= s << 13;
    s ^= s >> 17;
    s ^= s << 5;
    idx[i] = static_cast<uint8_t>(s >> 24);
  }
  for (int i = 0; i < 256; ++i) table[i] = static_cast<float>(i);
  float sink = 0.0f;
  double scalar = 1e30, gather = 1e30;
  for (int round = 0; round < 24; ++round) {  // ~2 us a pass: well under a millisecond in all
    scalar = best_pass<false>(idx, table, scalar, sink);
    gather = best_pass<true>(idx, table, gather, sink);
  }
  volatile float keep = sink;  // the passes' results are used, so the compiler keeps their loads
  (void)keep;
  // scalar loads are the form measured on most machines; gathers only where clearly faster
  return gather < 0.9 * scalar;
}

}  // namespace

bool lookup8_gathers() {
  const char* env = std::getenv("WS_CPU_LOOKUP8");
  if (env != nullptr) {
    if (std::strcmp(env, "gather") == 0) return true;
    if (std::strcmp(env, "scalar") == 0) return false;
  }
  static const bool measured = measure_gathers_faster();
  return measured;
}
#else
bool lookup8_gathers() { return false; }
#endif
}  // namespace weightshare
