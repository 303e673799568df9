// CPU shared_linear, float path, and the op entry point.
//  * up to kGemvRows rows of x (batch-1 inference): a GEMV that decodes 16 indices at a time into a register
//    (byte permute + variable shift, then a permute lookup of the codebook held in registers) and feeds FMAs for
//    every x row, four independent accumulators per row; parallel over output rows. Up to kGemvChunkedRows rows it
//    runs once per kGemvRows of them.
//  * more rows: the blocked kernel of shared_linear_blocked.cpp (weights decoded into L1 panels next to an FMA
//    micro-kernel); without AVX2, decode a panel of W rows (~8 MiB: 512 rows at 4096 columns) once and multiply it
//    with all rows of x by the dense GEMM (at::mm).
#include "shared_linear.h"

#include "decode_scratch.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "weightshare/cpu_decode.h"
#include "weightshare/dispatch.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace weightshare::cpu {
namespace {

constexpr int64_t kGemvRows = 4;
// Up to this many rows of x the GEMV runs once per kGemvRows of them, reading the packed weights again each time:
// that still beats the blocked kernel, which decodes every weight into a panel whatever the batch. Intel VM, 2
// threads, blocked vs GEMV per 4 rows (ms): 4096x4096 4 bits 5 rows 3.09 vs 2.01, 8 rows 3.16 vs 2.65, 12 rows 3.18
// vs 3.29; 11008x4096 5 rows 8.72 vs 4.22, 8 rows 8.54 vs 5.44, 12 rows 8.10 vs 7.94; 8 bits, AVX2, per-row
// codebooks and small layers (300x784, 500x800, 1024x1024) alike at 5-8 rows (1.11-2.15x), mixed at 10 (0.74-1.43x).
constexpr int64_t kGemvChunkedRows = 8;

// Scalar/portable GEMV: decode the row into a buffer, then plain dot products (the compiler vectorises them).
template <int BITS>
void gemv_rows_portable(const PackedLinear& w, const float* x, int64_t M, int64_t r0, int64_t r1, float* y) {
  GroupTable gt;
  std::vector<float> row(w.in_features);
  for (int64_t r = r0; r < r1; ++r) {
    decode_scalar<BITS>(w.packed + r * w.row_bytes, 0, w.in_features, gt.get(w, r).v, row.data());
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * w.in_features;
      float acc = 0.0f;
      for (int64_t i = 0; i < w.in_features; ++i) acc += row[i] * xm[i];
      y[m * w.out_features + r] = acc;
    }
  }
}

#ifdef WS_X86
// A row's last, partial 16-block (columns 16 blk .. in - 1) multiply-added into acc[m][1]: one masked decode and
// masked FMAs instead of a scalar loop (100x300 at batch 1: 1.1 of the kernel's 2.6 us went to 12 single weights
// a row).
template <int BITS, int M>
WS_AVX512 inline void partial_block_fma(const Avx512Unpack16<BITS>& unpack, const Avx512Lookup<BITS>& lookup,
                                        const uint8_t* row, const float* x, int64_t in, int64_t blk,
                                        __m512 (&acc)[M][4]) {
  const int count = static_cast<int>(in - 16 * blk);
  const __mmask16 k = static_cast<__mmask16>((1u << count) - 1u);
  const __m512 wv = lookup(unpack.partial_indices(row, blk, count));
  for (int m = 0; m < M; ++m)
    acc[m][1] = _mm512_mask3_fmadd_ps(wv, _mm512_maskz_loadu_ps(k, x + m * in + 16 * blk), acc[m][1], k);
}

// The end of a row shared by the AVX-512 GEMVs: its whole 16-blocks from `blk` on by the generic decoder, its
// partial last block, then each x row's four chains summed into y's column r.
template <int BITS, int M>
WS_AVX512 inline void finish_row(const Avx512Unpack16<BITS>& unpack, const Avx512Lookup<BITS>& lookup,
                                 const uint8_t* row, const float* x, int64_t in, int64_t blk, __m512 (&acc)[M][4],
                                 float* y, int64_t ldy, int64_t r) {
  const int64_t blocks = in / 16;
  for (; blk < blocks; ++blk) {
    const __m512 wv = lookup(unpack.indices(row, blk));
    for (int m = 0; m < M; ++m) acc[m][0] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + m * in + 16 * blk), acc[m][0]);
  }
  if (blocks * 16 < in) partial_block_fma<BITS, M>(unpack, lookup, row, x, in, blocks, acc);
  for (int m = 0; m < M; ++m) {
    y[m * ldy + r] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]),
                                                        _mm512_add_ps(acc[m][2], acc[m][3])));
  }
}

template <int BITS, int M>
WS_AVX512 void gemv_rows_avx512(const PackedLinear& w, const float* x, int64_t r0, int64_t r1, float* y) {
  const Avx512Unpack16<BITS> unpack;
  GroupTable gt;
  const int64_t in = w.in_features;
  const int64_t blocks = in / 16;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = w.packed + r * w.row_bytes;
    const DecodeTable& dt = gt.get(w, r);
    const Avx512Lookup<BITS> lookup(dt);
    __m512 acc[M][4];
    for (int m = 0; m < M; ++m)
      for (int u = 0; u < 4; ++u) acc[m][u] = _mm512_setzero_ps();
    int64_t blk = 0;
    for (; blk + 4 <= blocks; blk += 4) {
      for (int u = 0; u < 4; ++u) {
        const __m512 wv = lookup(unpack.indices(row, blk + u));
        for (int m = 0; m < M; ++m)
          acc[m][u] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + m * in + 16 * (blk + u)), acc[m][u]);
      }
    }
    finish_row<BITS, M>(unpack, lookup, row, x, in, blk, acc, y, w.out_features, r);
  }
}
#endif

#ifdef WS_X86
// Bits 1, 2, 4: a fast GEMV on whole 64-byte blocks of the row (16 dwords, 16 * 32/BITS indices). Shifting every
// dword right by BITS*s puts index 8j+s (for 4 bits) in the low bits of lane j, and vpermps reads only the low 4
// bits of each lane: with the codebook replicated over all 16 table slots (slot t holds entry t mod 2**BITS) no
// mask is needed. Per 16 weights that is one shift, one permute and one FMA. x is stored once per call in the
// matching order (xp: element 8j+s of a block at position 16s+j, for 4 bits). The row's tail (less than a block)
// goes through the generic path.
template <int BITS>
constexpr bool fast_bits() { return BITS == 1 || BITS == 2 || BITS == 4; }

template <int BITS>
constexpr int64_t fast_block() { return 16 * 32 / BITS; }

// x rows [M, in] -> [M, blocks * fast_block] in the order the fast GEMV consumes.
template <int BITS>
std::vector<float> permute_x_for_fast_gemv(const float* x, int64_t M, int64_t in) {
  constexpr int64_t B = fast_block<BITS>(), E = 32 / BITS;
  const int64_t blocks = in / B;
  std::vector<float> xp(M * blocks * B);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t blk = 0; blk < blocks; ++blk)
      for (int64_t j = 0; j < 16; ++j)
        for (int64_t s = 0; s < E; ++s) xp[(m * blocks + blk) * B + s * 16 + j] = x[m * in + blk * B + j * E + s];
  return xp;
}

template <int BITS, int M>
WS_AVX512 void gemv_rows_avx512_fast(const PackedLinear& w, const float* x, const float* xp, int64_t r0, int64_t r1,
                                     float* y) {
  constexpr int64_t B = fast_block<BITS>();
  constexpr int E = 32 / BITS;
  const Avx512Unpack16<BITS> unpack;
  GroupTable gt;
  const int64_t in = w.in_features;
  const int64_t blocks = in / B;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = w.packed + r * w.row_bytes;
    const DecodeTable& dt = gt.get(w, r);
    alignas(64) float rep[16];
    for (int t = 0; t < 16; ++t) rep[t] = dt.v[t & ((1 << BITS) - 1)];
    const __m512 table = _mm512_load_ps(rep);
    const Avx512Lookup<BITS> lookup(dt);
    __m512 acc[M][4];
    for (int m = 0; m < M; ++m)
      for (int u = 0; u < 4; ++u) acc[m][u] = _mm512_setzero_ps();
    for (int64_t blk = 0; blk < blocks; ++blk) {
      _mm_prefetch(reinterpret_cast<const char*>(row + 2 * w.row_bytes + blk * 64), _MM_HINT_T0);  // 2 rows ahead
      const __m512i v = _mm512_loadu_si512(row + blk * 64);
      // in fours with constant accumulator indices: with a loop of 32 (1 bit) GCC kept acc[m][s & 3] on the stack
      // (1 bit ran at 0.62 ms, 2 bits at 0.33)
      for (int s0 = 0; s0 < E; s0 += 4) {
#pragma GCC unroll 4
        for (int u = 0; u < 4; ++u) {
          const int s = s0 + u;
          const __m512 wv = _mm512_permutexvar_ps(_mm512_srli_epi32(v, BITS * s), table);
#pragma GCC unroll 4
          for (int m = 0; m < M; ++m)
            acc[m][u] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xp + (m * blocks + blk) * B + 16 * s), acc[m][u]);
        }
      }
    }
    // the row's tail (less than a 64-byte block) by the generic decoder
    finish_row<BITS, M>(unpack, lookup, row, x, in, blocks * B / 16, acc, y, w.out_features, r);
  }
}

template <int BITS>
WS_AVX512 void decode_rows_avx512(const PackedLinear& w, int64_t r0, int64_t r1, int64_t dst_row0, float* dst) {
  GroupTable gt;
  // 7-8 bits: whole 64-column blocks by the byte planes where they pay (decode_block says why), the rest 16 at a time
  const int64_t planes_cols = planes_pay<BITS>(w, r1 - r0, w.in_features / 64) ? w.in_features / 64 * 64 : 0;
  if constexpr (BITS >= 7) {
    if (planes_cols > 0)
      decode_rows_planes_avx512<BITS>(w, r0, r1 - r0, 0, planes_cols / 64, gt, dst + (r0 - dst_row0) * w.in_features,
                                      w.in_features);
  }
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = w.packed + r * w.row_bytes;
    const DecodeTable& dt = gt.get(w, r);
    float* out = dst + (r - dst_row0) * w.in_features;
    const int64_t done = planes_cols + decode_blocks_avx512<BITS>(row, dt, planes_cols, w.in_features - planes_cols,
                                                                  out + planes_cols);
    decode_scalar<BITS>(row, done, w.in_features - done, dt.v, out + done);
  }
}
#endif

#ifdef WS_X86
// Bits 3 and 5: 16 indices per step straight into 32-bit lanes by vpmultishiftqb (VBMI), which copies for every
// output byte the 8 bits at any bit offset of its qword: the step's bytes broadcast to every qword (3 bits: 6 bytes,
// one 8-byte load; 5 bits: 10 bytes, the first 8 to the low half and the 8 from byte 5 to the high half), and each
// lane's low byte taken from its index's offset. The lookup reads only a lane's low 4 (vpermps) or 5 (vpermt2ps)
// bits, with the 3-bit table repeated with period 8, so the bits above need no mask. Per 16 weights: a multishift,
// a permute and an FMA (the generic path: a byte permute, a variable shift, an AND, a permute and an FMA).
template <int BITS>
constexpr bool multishift_bits() { return BITS == 3 || BITS == 5; }

template <int BITS>
struct Multishift16 {
  static constexpr int64_t kStepBytes = 2 * BITS;  // 16 indices
  __m512i control;
  WS_AVX512 Multishift16() {
    alignas(64) uint8_t c[64];
    for (int l = 0; l < 16; ++l) {
      const int bit = BITS * (BITS == 5 ? l % 8 : l);  // 5 bits: lanes 8-15 read the second load, from byte 5
      for (int b = 0; b < 4; ++b) c[4 * l + b] = static_cast<uint8_t>(bit);
    }
    control = _mm512_load_si512(c);
  }
  // Indices [16 st, 16 st + 16) as the low bits of 32-bit lanes (junk above); reads bytes [2 BITS st, 2 BITS st + 8)
  // (3 bits) or [.., 2 BITS st + 13) (5 bits): the caller keeps them inside the row.
  WS_AVX512 inline __m512i operator()(const uint8_t* row, int64_t st) const {
    const uint8_t* p = row + st * kStepBytes;
    int64_t lo;
    std::memcpy(&lo, p, 8);
    __m512i v;
    if constexpr (BITS == 3) {
      v = _mm512_set1_epi64(lo);
    } else {
      int64_t hi;
      std::memcpy(&hi, p + 5, 8);
      v = _mm512_inserti64x4(_mm512_set1_epi64(lo), _mm256_set1_epi64x(hi), 1);
    }
    return _mm512_multishift_epi64_epi8(control, v);
  }
  // Whole steps of a row whose loads stay inside it.
  static int64_t steps(int64_t row_bytes, int64_t in) {
    const int64_t reach = BITS == 3 ? 8 : 13;
    return std::min(in / 16, row_bytes >= reach ? (row_bytes - reach) / kStepBytes + 1 : int64_t(0));
  }
};

template <int BITS, int M>
WS_AVX512 void gemv_rows_avx512_multishift(const PackedLinear& w, const float* x, int64_t r0, int64_t r1, float* y) {
  const Multishift16<BITS> ms;
  const Avx512Unpack16<BITS> unpack;  // the blocks the steps leave
  GroupTable gt;
  const int64_t in = w.in_features, steps = Multishift16<BITS>::steps(w.row_bytes, in);
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = w.packed + r * w.row_bytes;
    const DecodeTable& dt = gt.get(w, r);
    const Avx512Lookup<BITS> lookup(dt);
    __m512 t0, t1;
    if constexpr (BITS == 3) {
      alignas(64) float rep[16];
      for (int t = 0; t < 16; ++t) rep[t] = dt.v[t & 7];
      t0 = t1 = _mm512_load_ps(rep);
    } else {
      t0 = _mm512_load_ps(dt.v);
      t1 = _mm512_load_ps(dt.v + 16);
    }
    __m512 acc[M][4];
    for (int m = 0; m < M; ++m)
      for (int u = 0; u < 4; ++u) acc[m][u] = _mm512_setzero_ps();
    int64_t st = 0;
    for (; st + 4 <= steps; st += 4) {
#pragma GCC unroll 4
      for (int u = 0; u < 4; ++u) {
        const __m512i idx = ms(row, st + u);
        const __m512 wv = BITS == 3 ? _mm512_permutexvar_ps(idx, t0) : _mm512_permutex2var_ps(t0, idx, t1);
#pragma GCC unroll 4
        for (int m = 0; m < M; ++m)
          acc[m][u] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + m * in + 16 * (st + u)), acc[m][u]);
      }
    }
    finish_row<BITS, M>(unpack, lookup, row, x, in, st, acc, y, w.out_features, r);  // the steps left by the loop
  }
}
#endif

template <int BITS>
void gemv(const PackedLinear& w, const float* x, int64_t M, float* y) {
  const int64_t grain = std::max<int64_t>(1, 65536 / w.in_features);
  const Simd simd = simd_level();
#ifdef WS_X86
  if constexpr (fast_bits<BITS>()) {
    if (simd == Simd::Avx512 && w.in_features >= fast_block<BITS>()) {
      const std::vector<float> xp = permute_x_for_fast_gemv<BITS>(x, M, w.in_features);
      at::parallel_for(0, w.out_features, grain, [&](int64_t r0, int64_t r1) {
        switch (M) {
          case 1: return gemv_rows_avx512_fast<BITS, 1>(w, x, xp.data(), r0, r1, y);
          case 2: return gemv_rows_avx512_fast<BITS, 2>(w, x, xp.data(), r0, r1, y);
          case 3: return gemv_rows_avx512_fast<BITS, 3>(w, x, xp.data(), r0, r1, y);
          default: return gemv_rows_avx512_fast<BITS, 4>(w, x, xp.data(), r0, r1, y);
        }
      });
      return;
    }
  }
#endif
  at::parallel_for(0, w.out_features, grain, [&](int64_t r0, int64_t r1) {
#ifdef WS_X86
    if constexpr (multishift_bits<BITS>()) {
      if (simd == Simd::Avx512) {
        switch (M) {
          case 1: return gemv_rows_avx512_multishift<BITS, 1>(w, x, r0, r1, y);
          case 2: return gemv_rows_avx512_multishift<BITS, 2>(w, x, r0, r1, y);
          case 3: return gemv_rows_avx512_multishift<BITS, 3>(w, x, r0, r1, y);
          default: return gemv_rows_avx512_multishift<BITS, 4>(w, x, r0, r1, y);
        }
      }
    }
    if (simd == Simd::Avx512) {
      switch (M) {
        case 1: return gemv_rows_avx512<BITS, 1>(w, x, r0, r1, y);
        case 2: return gemv_rows_avx512<BITS, 2>(w, x, r0, r1, y);
        case 3: return gemv_rows_avx512<BITS, 3>(w, x, r0, r1, y);
        default: return gemv_rows_avx512<BITS, 4>(w, x, r0, r1, y);
      }
    }
#endif
    gemv_rows_portable<BITS>(w, x, M, r0, r1, y);
  });
}

}  // namespace

PackedLinear make_packed_linear(const at::Tensor& packed, const at::Tensor& codebook_f32, const PackedWeight& pw,
                                int64_t bits) {
  return PackedLinear{packed.data_ptr<uint8_t>(), codebook_f32.data_ptr<float>(), pw.rows,    pw.cols,
                      pw.row_bytes,               pw.groups,                      pw.K,       pw.rows / pw.groups,
                      static_cast<int>(bits)};
}

int64_t panel_rows(const PackedLinear& w) {
  const int64_t rows = std::max<int64_t>(16, ((int64_t(1) << 21) / w.in_features) / 16 * 16);
  return std::min(rows, w.out_features);
}

void decode_panel(const PackedLinear& w, int64_t r0, int64_t r1, float* dst) {
  const Simd simd = simd_level();
  WS_DISPATCH_BITS(w.bits, BITS, [&] {
    // at least 64K weights per task: a conv weight (e.g. 64x64x3x3) then decodes inline, without a parallel region
    // of its own (12 -> 7 us, measured); an 8 MiB linear panel still splits over every thread
    at::parallel_for(r0, r1, std::max<int64_t>(1, 65536 / w.in_features), [&](int64_t b, int64_t e) {
#ifdef WS_X86
      if (simd == Simd::Avx512) return decode_rows_avx512<BITS>(w, b, e, r0, dst);
#endif
      GroupTable gt;
      for (int64_t r = b; r < e; ++r) {
        const uint8_t* row = w.packed + r * w.row_bytes;
        const DecodeTable& dt = gt.get(w, r);
        float* out = dst + (r - r0) * w.in_features;
        int64_t done = 0;
#ifdef WS_X86
        if (simd == Simd::Avx2) done = decode_row_blocks_avx2<BITS>(row, w.row_bytes, dt, 0, w.in_features, out);
#endif
        decode_scalar<BITS>(row, done, w.in_features - done, dt.v, out + done);
      }
    });
  });
}

namespace {

// y[M, out] += bias, after the product (a separate pass: the GEMV's rows and the ATen GEMM's output).
void add_bias(const float* bias, int64_t M, int64_t out, float* y) {
  at::parallel_for(0, M, std::max<int64_t>(1, 32768 / out), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t r = 0; r < out; ++r) y[m * out + r] += bias[r];
  });
}

}  // namespace

void linear_float(const PackedLinear& w, const float* x, int64_t M, const float* bias, float* y) {
  if (M <= kGemvChunkedRows) {
    for (int64_t m0 = 0; m0 < M; m0 += kGemvRows) {
      const int64_t mc = std::min(kGemvRows, M - m0);
      const float* xc = x + m0 * w.in_features;
      float* yc = y + m0 * w.out_features;
      // AVX-512 CPUs take the AVX-512 GEMV below; AVX2 ones theirs (shared_linear_gemv_avx2.cpp)
      if (!(simd_level() == Simd::Avx2 && gemv_avx2(w, xc, mc, yc)) && !gemv_avx512_bytes(w, xc, mc, yc)) {  // 6-8 bits
        WS_DISPATCH_BITS(w.bits, BITS, [&] { gemv<BITS>(w, xc, mc, yc); });
      }
    }
    if (bias != nullptr) add_bias(bias, M, w.out_features, y);
    return;
  }
  // Batched: the blocked kernel (shared_linear_blocked.cpp), which adds the bias as it writes y; WS_CPU_LINEAR=aten
  // takes the decode + ATen GEMM path below instead (benchmarks compare the two), as does a CPU without AVX2.
  const char* env = std::getenv("WS_CPU_LINEAR");
  if (!(env && std::strcmp(env, "aten") == 0) && linear_float_blocked(w, x, M, bias, y)) return;
  // Decode + ATen: y[:, r0:r1] = x @ panel^T, panel decoded once per call and reused for all M rows.
  const int64_t P = panel_rows(w);
  // the panel lives in this thread's reused buffer (decode_scratch.h): a fresh 8 MiB tensor per call is mapped and
  // zero-filled by the kernel every time; measured at batch 64, 4096x4096, that cost 7 % (0.91x -> 0.98x of dense)
  const at::Tensor panel = at::from_blob(scratch_floats(P * w.in_features), {P, w.in_features}, at::kFloat);
  const at::Tensor xt = at::from_blob(const_cast<float*>(x), {M, w.in_features}, at::kFloat);
  at::Tensor yt = at::from_blob(y, {M, w.out_features}, at::kFloat);
  for (int64_t r0 = 0; r0 < w.out_features; r0 += P) {
    const int64_t r1 = std::min(w.out_features, r0 + P);
    decode_panel(w, r0, r1, panel.data_ptr<float>());
    yt.slice(1, r0, r1).copy_(at::mm(xt, panel.slice(0, 0, r1 - r0).t()));
  }
  if (bias != nullptr) add_bias(bias, M, w.out_features, y);
}

}  // namespace weightshare::cpu

namespace weightshare {
namespace {

// t as fp32 and contiguous; t itself when it already is. Tensor::to and contiguous() return t then too, but each
// goes through the dispatcher first: at batch 1 on a tiny layer (100x300) the op's fixed cost is most of the call.
at::Tensor as_contiguous_float(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat && t.is_contiguous() ? t : t.to(at::kFloat).contiguous();
}

at::Tensor shared_linear_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& codebook, int64_t bits,
                             int64_t out_features, int64_t in_features, const std::optional<at::Tensor>& bias,
                             c10::string_view activation) {
  Activation act;
  const PackedWeight pw =
      check_shared_linear(x, packed, codebook, bits, out_features, in_features, bias, activation, &act);
  const at::Tensor cb = as_contiguous_float(codebook);
  const cpu::PackedLinear w = cpu::make_packed_linear(packed, cb, pw, bits);
  const at::Tensor x2 = as_contiguous_float(x.dim() == 2 ? x : x.reshape({-1, in_features}));
  const int64_t M = x2.size(0);
  at::Tensor y = at::empty({M, out_features}, x.options().dtype(at::kFloat));
  float* yp = y.data_ptr<float>();
  const at::Tensor b = bias.has_value() ? as_contiguous_float(*bias) : at::Tensor();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  if (act == Activation::Float) {  // each path adds the bias where it writes y, or in one last pass
    cpu::linear_float(w, x2.data_ptr<float>(), M, bp, yp);
  } else {
    cpu::linear_int8(w, x2, bp, yp);
  }
  if (x.dim() == 2 && x.scalar_type() == at::kFloat) return y;
  auto out_sizes = x.sizes().vec();
  out_sizes.back() = out_features;
  return y.to(x.scalar_type()).reshape(out_sizes);
}

}  // namespace

TORCH_LIBRARY_IMPL(weightshare, CPU, m) { m.impl("shared_linear", &shared_linear_cpu); }

}  // namespace weightshare
