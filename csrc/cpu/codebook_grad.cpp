// CPU dL/dcodebook of shared_linear: grad_codebook[g, j] = sum of dL/dW[r, i] = sum_m grad_out[m, r] x[m, i] over
// the weights (r, i) of group g whose index is j (an index >= K has no entry to credit).
//
// Why not dL/dW = grad_out^T @ x by ATen, then the per-entry sums (the form before): the GEMM wrote the whole dL/dW
// (out x in floats, 0.9 MiB for a 300x784 layer, 64 MiB for 4096x4096) only for the sums to read it back, and at
// the MNIST layer's shape MKL spent as long zero-filling that output (sgemm_mscale, 20 % of the call) as in its
// kernel. Here each chunk of 16 rows computes its dL/dW rows tile by tile into a per-thread buffer that stays in
// cache (16 x in floats; the x tile a 4-row block reads stays in L1 for the chunk's four blocks) and sums them into
// the chunk's entries at once. The sums: with indices of up to 4 bits on AVX-512, per 16 weights one compare and
// one masked add per entry into 16-lane fp32 sums kept in registers for the row (each lane gathers at most in / 16
// terms), reduced into double per row; otherwise a scalar loop that credits one weight at a time in double.
// Chunks are fixed (not per thread) and their partials added in chunk order, so the result is the same for any
// thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <vector>

#include "decode_scratch.h"
#include "fma_tile.h"
#include "shared_linear.h"
#include "weightshare/cpu_decode.h"
#include "weightshare/dispatch.h"
#include "weightshare/packing.h"

namespace weightshare::cpu {
namespace {

constexpr int64_t kChunk = 16;  // rows per partial (fixed: the result does not depend on the thread count)

// Row r's per-entry sums of its dL/dW row src[0, in) into dst[0, K), one weight at a time.
template <int BITS>
void row_sums_scalar(const uint8_t* row, const float* src, int64_t in, int64_t K, double* dst) {
  for (int64_t i = 0; i < in; ++i) {
    const uint32_t j = unpack_one(row, i, BITS);
    if (j < static_cast<uint32_t>(K)) dst[j] += src[i];
  }
}

#ifdef WS_X86
// The same for indices of up to 4 bits, AVX-512: the indices of 16 weights as lanes, one compare and one masked add
// per entry. The scalar loop's load-add-store on an entry's sum waits on the previous store whenever neighbouring
// weights share an entry.
template <int BITS>
WS_AVX512 void row_sums_onehot_avx512(const uint8_t* row, const float* src, int64_t in, int64_t K, double* dst) {
  constexpr int kEntries = 1 << BITS;  // what an index can name: the sums stay in registers
  const Avx512Unpack16<BITS> unpack;
  __m512 acc[kEntries];
#pragma GCC unroll 16
  for (int j = 0; j < kEntries; ++j) acc[j] = _mm512_setzero_ps();
  const int64_t whole = in / 16, tail = in % 16;
  for (int64_t b = 0; b < whole + (tail > 0); ++b) {
    // the last partial block: its lanes past the row read as index 0 with value 0
    const __mmask16 live = b < whole ? __mmask16(0xffff) : static_cast<__mmask16>((1u << tail) - 1u);
    const __m512i idx = b < whole ? unpack.indices(row, b) : unpack.partial_indices(row, b, static_cast<int>(tail));
    const __m512 v = _mm512_maskz_loadu_ps(live, src + 16 * b);
#pragma GCC unroll 16
    for (int j = 0; j < kEntries; ++j)
      acc[j] = _mm512_mask_add_ps(acc[j], _mm512_cmpeq_epi32_mask(idx, _mm512_set1_epi32(j)), acc[j], v);
  }
  for (int j = 0; j < kEntries && j < K; ++j) dst[j] += _mm512_reduce_add_ps(acc[j]);  // j >= K: no entry
}

#endif

// Rows [r0, r1) in fixed chunks of kChunk rows; chunk c covers rows [a, b) and groups [g0, g1], and its partial
// sums ([g1 - g0 + 1][K] doubles) are added into gc in chunk order.
struct Chunks {
  int64_t r0, r1, rpg, K;
  int64_t count() const { return (r1 - r0 + kChunk - 1) / kChunk; }
  std::array<int64_t, 4> span(int64_t c) const {
    const int64_t a = r0 + c * kChunk, b = std::min(r1, a + kChunk);
    return {a, b, a / rpg, (b - 1) / rpg};
  }
  void add(const std::vector<std::vector<double>>& parts, double* gc) const {
    for (int64_t c = 0; c < count(); ++c) {
      const auto [a, b, g0, g1] = span(c);
      for (int64_t g = g0; g <= g1; ++g)
        for (int64_t j = 0; j < K; ++j) gc[g * K + j] += parts[c][(g - g0) * K + j];
    }
  }
};

}  // namespace

bool codebook_grad_fused(const PackedLinear& w, const float* g, const float* x, int64_t M, double* gc) {
#ifdef WS_X86
  const Simd simd = simd_level();
  if (simd == Simd::Scalar) return false;
  const int64_t in = w.in_features, out = w.out_features, K = w.K;
  const int64_t TW = tile_cols(simd);
  const int64_t inp = (in + TW - 1) / TW * TW, whole = in / TW * TW;
  // the per-thread buffer (kChunk rows of dL/dW) is reused, not freed: past 64 MiB (rows of over a million
  // features) the panel path, which needs none, takes the call
  if (kChunk * inp > (int64_t(1) << 24)) return false;
  // the columns past the last whole tile, zero-padded to one (its padded columns' dL/dW are computed, never summed):
  // no masked loads, and no padded copy of all of x
  std::vector<float> xtail(static_cast<size_t>(whole < in ? M * TW : 0), 0.0f);
  for (int64_t m = 0; m < M && whole < in; ++m) std::copy(x + m * in + whole, x + (m + 1) * in, xtail.data() + m * TW);
  const Chunks ch{0, out, w.rows_per_group, K};
  std::vector<std::vector<double>> parts(ch.count());
  WS_DISPATCH_BITS(w.bits, BITS, [&] {
    at::parallel_for(0, ch.count(), 1, [&](int64_t c0, int64_t c1) {
      thread_local std::vector<float> buf_store;
      float* buf = grown(buf_store, static_cast<size_t>(kChunk * inp));
      for (int64_t c = c0; c < c1; ++c) {
        const auto [a, b, g0, g1] = ch.span(c);
        // the chunk's dL/dW rows: column tiles outer, so each x tile serves the chunk's row blocks from L1
        for (int64_t i0 = 0; i0 < inp; i0 += TW)
          for (int64_t r = a; r < b; r += kTileRows) {
            // dL/dW [r + q][i0 + ...] = sum_m g[m][r + q] x[m][i0 + ...]: A = g transposed (stride 1 per row q)
            const int64_t R = std::min<int64_t>(kTileRows, b - r);
            const bool tail = i0 == whole;
            fma_tile<true>(simd, R)(g + r, 1, out, tail ? xtail.data() : x + i0, tail ? TW : in, M,
                                    buf + (r - a) * inp + i0, inp, TW);
          }
        std::vector<double>& part = parts[c];
        part.assign(static_cast<size_t>((g1 - g0 + 1) * K), 0.0);
        for (int64_t r = a; r < b; ++r) {
          const uint8_t* row = w.packed + r * w.row_bytes;
          double* dst = part.data() + (r / w.rows_per_group - g0) * K;
          if constexpr (BITS <= 4) {
            if (simd == Simd::Avx512) {
              row_sums_onehot_avx512<BITS>(row, buf + (r - a) * inp, in, K, dst);
              continue;
            }
          }
          row_sums_scalar<BITS>(row, buf + (r - a) * inp, in, K, dst);
        }
      }
    });
  });
  ch.add(parts, gc);
  return true;
#else
  (void)w, (void)g, (void)x, (void)M, (void)gc;
  return false;
#endif
}

void add_codebook_grad(const PackedLinear& w, const float* gw, int64_t r0, int64_t r1, double* gc) {
  const Chunks ch{r0, r1, w.rows_per_group, w.K};
  std::vector<std::vector<double>> parts(ch.count());
  WS_DISPATCH_BITS(w.bits, BITS, [&] {
    at::parallel_for(0, ch.count(), 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const auto [a, b, g0, g1] = ch.span(c);
        std::vector<double>& part = parts[c];
        part.assign(static_cast<size_t>((g1 - g0 + 1) * w.K), 0.0);
        for (int64_t r = a; r < b; ++r)
          row_sums_scalar<BITS>(w.packed + r * w.row_bytes, gw + (r - r0) * w.in_features, w.in_features, w.K,
                                part.data() + (r / w.rows_per_group - g0) * w.K);
      }
    });
  });
  ch.add(parts, gc);
}

}  // namespace weightshare::cpu
