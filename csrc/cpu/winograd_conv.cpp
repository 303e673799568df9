// Winograd F(2x2, 3x3) convolution of NCHW fp32 input (Lavin & Gray, "Fast Algorithms for Convolutional Neural
// Networks", 2016): dense 3x3 layers with unit stride and dilation, any padding, AVX-512 or AVX2.
//
// Why: the direct kernel (direct_conv.cpp) runs within ~5 % of oneDNN's multiply-add rate, and at each method's best
// input placement the ResNet 3x3 layer (64 -> 64, 56x56) took 1.105-1.115 ms in oneDNN and 1.165-1.18 ms direct
// (0.95x). F(2x2, 3x3) computes each 2x2 output tile from a 4x4 input tile with 16 multiply-adds per (input
// channel, output channel) instead of 36, so the GEMM at its heart does 2.25x less work than any direct convolution.
//
// Three phases, run per chunk of tiles on one thread (the driver below says why):
//   1. input transform: V[xi][c][t] = (B^T d B)[xi] for every 4x4 input tile d (tiles t = 2x2 output tiles, row
//      major; 16 (AVX2: 8) tiles per vector, the strided columns gathered by permutes);
//   2. 16 GEMMs, M[xi] [OC x tiles] = U[xi] [OC x C] x V[xi] [C x tiles], on the direct conv's micro-kernel
//      (conv_gemm.h), with U = G g G^T of the decoded weight repacked as [C][MR] panels;
//   3. output transform: y tile = A^T M A (+ bias), interleaved back into the NCHW rows.
// Numerics: the transforms only add, subtract and halve (G's 1/2 is exact in binary), so results differ from a
// direct convolution by the rounding of a different summation order: in the tests as close to a float64
// convolution as oneDNN's.
#include "winograd_conv.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "conv_gemm.h"
#include "decode_scratch.h"
#include "simd_transpose.h"
#include "weightshare/cpu_features.h"

namespace weightshare::cpu {
#ifdef WS_X86
namespace {

using namespace conv_gemm;

struct Geo {
  int64_t C, OC, H, W, OH, OW, ph, pw, TH, TW, T;  // T = TH * TW tiles (2x2 output tiles)
};

// U[xi][panel][c][MR] = (G g G^T)[xi] of every (output, input) channel pair, rows past OC zero, for panels of MR = 8
// (AVX-512 kernel) or 4 (AVX2) output channels. Eight output channels are the lanes of one vector, so a panel row
// is one contiguous store (a scalar version with a scattered store per value took 2.4 ms for a 256 x 256 layer,
// more than the whole convolution). This function: output channel groups [g0, g1) of 8 into U's panels
// [p0, p0 + np) (U[xi][p - p0][c][MR]); p0 is a multiple of 8 / MR.
WS_AVX2 void transform_weight_groups(const float* g, const Geo& e, int MR, int64_t g0, int64_t g1, int64_t p0,
                                     int64_t np, float* U) {
  const int64_t panels = (e.OC + MR - 1) / MR, xs = np * e.C * MR;  // xs: floats per xi
  const int64_t p_end = std::min(panels, p0 + np);
  const __m256 half = _mm256_set1_ps(0.5f);
  const int64_t row_len = e.C * 9;
  // 8 input channels' taps of the 8 output channels, transposed: kt[tap of (c - c0)][m] (output channel m as lane)
  alignas(32) float kt[72 * 8];
  for (int64_t gi = g0; gi < g1; ++gi) {  // output channels gi * 8 .. gi * 8 + 7
    const int rows = static_cast<int>(std::min<int64_t>(8, e.OC - gi * 8));
    const float* row0 = g + gi * 8 * row_len;
    for (int64_t c0 = 0; c0 < e.C; c0 += 8) {
      const int64_t span = std::min<int64_t>(8, e.C - c0) * 9;  // floats of each row in this block
      // 8 x 8 transposes of the rows' contiguous taps (they were 9 gathers per input channel, 41 % of a 14x14
      // layer's time); rows past OC read as zero
      int64_t j = 0;
      for (; j + 8 <= span; j += 8) {
        __m256 r[8];
        for (int m = 0; m < 8; ++m)
          r[m] = m < rows ? _mm256_loadu_ps(row0 + m * row_len + c0 * 9 + j) : _mm256_setzero_ps();
        transpose8x8(r);
        for (int q = 0; q < 8; ++q) _mm256_store_ps(kt + (j + q) * 8, r[q]);
      }
      for (; j < span; ++j)
        for (int m = 0; m < 8; ++m) kt[j * 8 + m] = m < rows ? row0[m * row_len + c0 * 9 + j] : 0.0f;
      for (int64_t c = c0; c < c0 + span / 9; ++c) {
        __m256 k[9];
        for (int t = 0; t < 9; ++t) k[t] = _mm256_load_ps(kt + ((c - c0) * 9 + t) * 8);
        __m256 t[4][3];  // G g: 4 x 3
        for (int i = 0; i < 3; ++i) {
          t[0][i] = k[i];
          t[1][i] = _mm256_mul_ps(half, _mm256_add_ps(_mm256_add_ps(k[i], k[3 + i]), k[6 + i]));
          t[2][i] = _mm256_mul_ps(half, _mm256_add_ps(_mm256_sub_ps(k[i], k[3 + i]), k[6 + i]));
          t[3][i] = k[6 + i];
        }
        __m256 u[16];
        for (int i = 0; i < 4; ++i) {  // (G g) G^T
          u[i * 4 + 0] = t[i][0];
          u[i * 4 + 1] = _mm256_mul_ps(half, _mm256_add_ps(_mm256_add_ps(t[i][0], t[i][1]), t[i][2]));
          u[i * 4 + 2] = _mm256_mul_ps(half, _mm256_add_ps(_mm256_sub_ps(t[i][0], t[i][1]), t[i][2]));
          u[i * 4 + 3] = t[i][2];
        }
        if (MR == 8) {
          float* dst = U + ((gi - p0) * e.C + c) * 8;
          for (int xi = 0; xi < 16; ++xi) _mm256_storeu_ps(dst + xi * xs, u[xi]);
        } else {  // two panels of 4: lanes 0-3 and 4-7
          float* lo = U + ((2 * gi - p0) * e.C + c) * 4;
          float* hi = U + ((2 * gi + 1 - p0) * e.C + c) * 4;
          const bool has_hi = 2 * gi + 1 < p_end;
          for (int xi = 0; xi < 16; ++xi) {
            _mm_storeu_ps(lo + xi * xs, _mm256_castps256_ps128(u[xi]));
            if (has_hi) _mm_storeu_ps(hi + xi * xs, _mm256_extractf128_ps(u[xi], 1));
          }
        }
      }
    }
  }
}

void transform_weights(const float* g, const Geo& e, int MR, float* U) {
  at::parallel_for(0, (e.OC + 7) / 8, 1,
                   [&](int64_t g0, int64_t g1) { transform_weight_groups(g, e, MR, g0, g1, 0, (e.OC + MR - 1) / MR, U); });
}

// Lanes j of a `lanes`-float load at column `start` that lie in [0, n).
inline uint32_t inside(int64_t start, int64_t n, int lanes = 16) {
  const int64_t lo = std::clamp<int64_t>(-start, 0, lanes), hi = std::clamp<int64_t>(n - start, 0, lanes);
  if (hi <= lo) return 0;
  return ((1u << hi) - 1u) & ~((1u << lo) - 1u);
}

// Phase 1 for tiles [ta, tb) of tile row ty of one channel: the 16 transformed values of each into v at the tile's
// position minus q0 (stride xs between the 16 xi planes).
WS_AVX512 void input_row(const float* xc, const Geo& e, int64_t ty, int64_t ta, int64_t tb, int64_t q0, float* v,
                         int64_t xs) {
  alignas(64) static const int32_t ev[16] = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
  alignas(64) static const int32_t od[16] = {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};
  const __m512i even = _mm512_load_si512(ev), odd = _mm512_load_si512(od);
  for (int64_t tx0 = ta; tx0 < tb; tx0 += 16) {
    const int64_t b = 2 * tx0 - e.pw;  // input column of the first tile's first column
    const __mmask16 m0 = inside(b, e.W), m1 = inside(b + 16, e.W), m2 = inside(b + 2, e.W),
                    m3 = inside(b + 18, e.W);
    __m512 r[4][4];  // row-transformed input rows (d B), per tile
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
      const int64_t iy = 2 * ty + i - e.ph;
      if (iy < 0 || iy >= e.H) {
        for (int k = 0; k < 4; ++k) r[i][k] = _mm512_setzero_ps();
        continue;
      }
      const float* row = xc + iy * e.W + b;
      const __m512 l0 = _mm512_maskz_loadu_ps(m0, row), l1 = _mm512_maskz_loadu_ps(m1, row + 16);
      const __m512 l2 = _mm512_maskz_loadu_ps(m2, row + 2), l3 = _mm512_maskz_loadu_ps(m3, row + 18);
      const __m512 d0 = _mm512_permutex2var_ps(l0, even, l1), d1 = _mm512_permutex2var_ps(l0, odd, l1);
      const __m512 d2 = _mm512_permutex2var_ps(l2, even, l3), d3 = _mm512_permutex2var_ps(l2, odd, l3);
      r[i][0] = _mm512_sub_ps(d0, d2);
      r[i][1] = _mm512_add_ps(d1, d2);
      r[i][2] = _mm512_sub_ps(d2, d1);
      r[i][3] = _mm512_sub_ps(d1, d3);
    }
    const __mmask16 keep = inside(tx0, tb);
    float* o = v + ty * e.TW + tx0 - q0;
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) {  // B^T along the columns of the tile
      _mm512_mask_storeu_ps(o + (0 * 4 + k) * xs, keep, _mm512_sub_ps(r[0][k], r[2][k]));
      _mm512_mask_storeu_ps(o + (1 * 4 + k) * xs, keep, _mm512_add_ps(r[1][k], r[2][k]));
      _mm512_mask_storeu_ps(o + (2 * 4 + k) * xs, keep, _mm512_sub_ps(r[2][k], r[1][k]));
      _mm512_mask_storeu_ps(o + (3 * 4 + k) * xs, keep, _mm512_sub_ps(r[1][k], r[3][k]));
    }
  }
}

// Phase 3 for one (output channel, tile row): y = A^T M A + bias, the two output columns of each tile interleaved.
WS_AVX512 void output_row(const float* mc, int64_t xs, float bias, const Geo& e, int64_t ty, int64_t ta, int64_t tb,
                          int64_t q0, float* yc) {
  alignas(64) static const int32_t lo_idx[16] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23};
  alignas(64) static const int32_t hi_idx[16] = {8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i lo = _mm512_load_si512(lo_idx), hi = _mm512_load_si512(hi_idx);
  const __m512 bv = _mm512_set1_ps(bias);
  const int64_t cols = std::min(e.OW, 2 * tb);  // the output columns of tiles < tb
  for (int64_t tx0 = ta; tx0 < tb; tx0 += 16) {
    const __mmask16 keep = inside(tx0, tb);
    const float* src = mc + ty * e.TW + tx0 - q0;
    __m512 s[2][4];  // A^T M
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) {
      const __m512 a0 = _mm512_maskz_loadu_ps(keep, src + (0 * 4 + k) * xs);
      const __m512 a1 = _mm512_maskz_loadu_ps(keep, src + (1 * 4 + k) * xs);
      const __m512 a2 = _mm512_maskz_loadu_ps(keep, src + (2 * 4 + k) * xs);
      const __m512 a3 = _mm512_maskz_loadu_ps(keep, src + (3 * 4 + k) * xs);
      s[0][k] = _mm512_add_ps(_mm512_add_ps(a0, a1), a2);
      s[1][k] = _mm512_sub_ps(_mm512_sub_ps(a1, a2), a3);
    }
#pragma GCC unroll 2
    for (int i = 0; i < 2; ++i) {
      const int64_t oy = 2 * ty + i;
      if (oy >= e.OH) break;
      const __m512 y0 = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(s[i][0], s[i][1]), s[i][2]), bv);
      const __m512 y1 = _mm512_add_ps(_mm512_sub_ps(_mm512_sub_ps(s[i][1], s[i][2]), s[i][3]), bv);
      float* out = yc + oy * e.OW + 2 * tx0;
      _mm512_mask_storeu_ps(out, inside(2 * tx0, cols), _mm512_permutex2var_ps(y0, lo, y1));
      _mm512_mask_storeu_ps(out + 16, inside(2 * tx0 + 16, cols), _mm512_permutex2var_ps(y0, hi, y1));
    }
  }
}

// The AVX2 forms of the two transforms: 8 tiles per vector; the strided columns gathered by a shuffle and a
// 64-bit lane permute, the output columns interleaved by unpack + 128-bit lane permutes.
WS_AVX2 inline __m256i lanes8(uint32_t bits) {
  const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(bits)), bit), bit);
}

// Stores the lanes of `keep` (a prefix or all): a plain store when all 8 are kept. (vmaskmovps stores are
// microcoded on AMD Zen; with them the input transform took a quarter of the call.)
WS_AVX2 inline void store8(float* dst, uint32_t keep, __m256 v) {
  if (keep == 0xffu) {
    _mm256_storeu_ps(dst, v);
    return;
  }
  alignas(32) float tmp[8];
  _mm256_store_ps(tmp, v);
  for (int j = 0; j < 8; ++j)
    if (keep >> j & 1u) dst[j] = tmp[j];
}

WS_AVX2 inline __m256 even8(__m256 a, __m256 b) {  // a[0], a[2], a[4], a[6], b[0], b[2], b[4], b[6]
  const __m256 s = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0));
  return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(s), _MM_SHUFFLE(3, 1, 2, 0)));
}

WS_AVX2 inline __m256 odd8(__m256 a, __m256 b) {  // a[1], a[3], ..., b[7]
  const __m256 s = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1));
  return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(s), _MM_SHUFFLE(3, 1, 2, 0)));
}

WS_AVX2 void input_row_avx2(const float* xc, const Geo& e, int64_t ty, int64_t ta, int64_t tb, int64_t q0, float* v,
                             int64_t xs) {
  for (int64_t tx0 = ta; tx0 < tb; tx0 += 8) {
    const int64_t b = 2 * tx0 - e.pw;
    const __m256i m0 = lanes8(inside(b, e.W, 8)), m1 = lanes8(inside(b + 8, e.W, 8));
    const __m256i m2 = lanes8(inside(b + 2, e.W, 8)), m3 = lanes8(inside(b + 10, e.W, 8));
    __m256 r[4][4];
    for (int i = 0; i < 4; ++i) {
      const int64_t iy = 2 * ty + i - e.ph;
      if (iy < 0 || iy >= e.H) {
        for (int k = 0; k < 4; ++k) r[i][k] = _mm256_setzero_ps();
        continue;
      }
      const float* row = xc + iy * e.W + b;
      const __m256 l0 = _mm256_maskload_ps(row, m0), l1 = _mm256_maskload_ps(row + 8, m1);
      const __m256 l2 = _mm256_maskload_ps(row + 2, m2), l3 = _mm256_maskload_ps(row + 10, m3);
      const __m256 d0 = even8(l0, l1), d1 = odd8(l0, l1), d2 = even8(l2, l3), d3 = odd8(l2, l3);
      r[i][0] = _mm256_sub_ps(d0, d2);
      r[i][1] = _mm256_add_ps(d1, d2);
      r[i][2] = _mm256_sub_ps(d2, d1);
      r[i][3] = _mm256_sub_ps(d1, d3);
    }
    const uint32_t keep = inside(tx0, tb, 8);
    float* o = v + ty * e.TW + tx0 - q0;
    for (int k = 0; k < 4; ++k) {
      store8(o + (0 * 4 + k) * xs, keep, _mm256_sub_ps(r[0][k], r[2][k]));
      store8(o + (1 * 4 + k) * xs, keep, _mm256_add_ps(r[1][k], r[2][k]));
      store8(o + (2 * 4 + k) * xs, keep, _mm256_sub_ps(r[2][k], r[1][k]));
      store8(o + (3 * 4 + k) * xs, keep, _mm256_sub_ps(r[1][k], r[3][k]));
    }
  }
}

WS_AVX2 void output_row_avx2(const float* mc, int64_t xs, float bias, const Geo& e, int64_t ty, int64_t ta,
                              int64_t tb, int64_t q0, float* yc) {
  const __m256 bv = _mm256_set1_ps(bias);
  const int64_t cols = std::min(e.OW, 2 * tb);
  for (int64_t tx0 = ta; tx0 < tb; tx0 += 8) {
    const __m256i keep = lanes8(inside(tx0, tb, 8));
    const float* src = mc + ty * e.TW + tx0 - q0;
    __m256 s[2][4];
    for (int k = 0; k < 4; ++k) {
      const __m256 a0 = _mm256_maskload_ps(src + (0 * 4 + k) * xs, keep);
      const __m256 a1 = _mm256_maskload_ps(src + (1 * 4 + k) * xs, keep);
      const __m256 a2 = _mm256_maskload_ps(src + (2 * 4 + k) * xs, keep);
      const __m256 a3 = _mm256_maskload_ps(src + (3 * 4 + k) * xs, keep);
      s[0][k] = _mm256_add_ps(_mm256_add_ps(a0, a1), a2);
      s[1][k] = _mm256_sub_ps(_mm256_sub_ps(a1, a2), a3);
    }
    for (int i = 0; i < 2; ++i) {
      const int64_t oy = 2 * ty + i;
      if (oy >= e.OH) break;
      const __m256 y0 = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(s[i][0], s[i][1]), s[i][2]), bv);
      const __m256 y1 = _mm256_add_ps(_mm256_sub_ps(_mm256_sub_ps(s[i][1], s[i][2]), s[i][3]), bv);
      const __m256 lo = _mm256_unpacklo_ps(y0, y1), hi = _mm256_unpackhi_ps(y0, y1);
      float* out = yc + oy * e.OW + 2 * tx0;
      store8(out, inside(2 * tx0, cols, 8), _mm256_permute2f128_ps(lo, hi, 0x20));
      store8(out + 8, inside(2 * tx0 + 8, cols, 8), _mm256_permute2f128_ps(lo, hi, 0x31));
    }
  }
}

// Phase 1 for tiles [q0, q1) of every channel c in [c0, c1) of one image: V[xi][c][t - q0], positions past the chunk
// zeroed up to whole vectors (the GEMM reads whole vectors).
void input_chunk(const float* xn, const Geo& e, int64_t q0, int64_t q1, int64_t cs, bool v512, float* V, int64_t xs_v,
                 int64_t c0 = 0, int64_t c1 = -1) {
  const int64_t P = q1 - q0, Vw = v512 ? kV512 : kV256, Pp = (P + Vw - 1) / Vw * Vw;
  const int64_t ty0 = q0 / e.TW, ty1 = (q1 - 1) / e.TW;  // the tile rows the chunk touches
  for (int64_t c = c0; c < (c1 < 0 ? e.C : c1); ++c) {
    for (int64_t ty = ty0; ty <= ty1; ++ty) {
      const int64_t ta = std::max<int64_t>(0, q0 - ty * e.TW), tb = std::min(e.TW, q1 - ty * e.TW);
      if (v512) {
        input_row(xn + c * e.H * e.W, e, ty, ta, tb, q0, V + c * cs, xs_v);
      } else {
        input_row_avx2(xn + c * e.H * e.W, e, ty, ta, tb, q0, V + c * cs, xs_v);
      }
    }
    if (Pp > P) {
      for (int xi = 0; xi < 16; ++xi) std::memset(V + xi * xs_v + c * cs + P, 0, 4 * (Pp - P));
    }
  }
}

}  // namespace
#endif

at::Tensor winograd3x3_conv2d_f32(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                                  at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                  int64_t groups) {
#ifdef WS_X86
  const ConvKernels choice = conv_kernels();
  const Simd simd = simd_level();
  if (choice == ConvKernels::Never || choice == ConvKernels::Direct || simd == Simd::Scalar || !x.is_cpu() ||
      x.scalar_type() != at::kFloat || w.scalar_type() != at::kFloat || groups != 1 ||
      !(x.dim() == 4 || x.dim() == 3) || !x.is_contiguous() || !w.is_contiguous() || w.dim() != 4 ||
      w.size(2) != 3 || w.size(3) != 3 || stride.size() != 2 || padding.size() != 2 || dilation.size() != 2 ||
      stride[0] != 1 || stride[1] != 1 || dilation[0] != 1 || dilation[1] != 1) {
    return at::Tensor();
  }
  const bool batched = x.dim() == 4;
  const at::Tensor x4 = batched ? x : x.unsqueeze(0);
  Geo e{};
  const int64_t N = x4.size(0);
  e.C = x4.size(1), e.H = x4.size(2), e.W = x4.size(3), e.OC = w.size(0), e.ph = padding[0], e.pw = padding[1];
  if (w.size(1) != e.C || e.ph < 0 || e.pw < 0) return at::Tensor();  // F.conv2d reports these
  e.OH = e.H + 2 * e.ph - 2, e.OW = e.W + 2 * e.pw - 2;
  if (e.OH <= 0 || e.OW <= 0 || N * e.C == 0 || e.OC == 0) return at::Tensor();
  e.TH = (e.OH + 1) / 2, e.TW = (e.OW + 1) / 2, e.T = e.TH * e.TW;
  // Where it pays: the transforms cost O(C + OC) per tile against the GEMM's O(C x OC), so very thin layers (the
  // 3-channel stem) stay with the direct kernel. The transformed weights (16 x OC x C floats) live in a reused
  // per-thread buffer, not freed: capped at 16 MiB (a 512 x 512 layer's panels are 16 MiB).
  // Small images pay the per-call weight transform (16 x OC x C values) against little GEMM. One image of at most
  // 64 tiles (14x14 outputs and below) runs fused (below): with AVX-512 1.05x oneDNN for 256 channels at 14x14,
  // 1.08x at 7x7, 1.5x for 64 channels at 14x14, but 0.71x for 512 channels at 7x7 (an item's transformed weights,
  // 2 MiB, left L2); with AVX2 (half the register tile) 0.82x at 14x14. On the Intel VM (session 16, against
  // decode + oneDNN, two rounds) the fused form lost from 128 x 256 channels up: 0.78-0.84x at 256 x 256 and
  // 256 x 128 (14x14), 0.78-0.80x at 256 x 256 (7x7), 0.97-1.03x at 128 x 128 (14x14) but 0.76-0.85x (7x7),
  // 1.07-1.11x at 64 x 64. So AVX2, 128 x 128 channels and more (the smaller loss: up to 5-8 % there on the EPYC VM,
  // 15-25 % here otherwise) and images of 65-99 tiles (not fused) decline. Large images, AVX2 as AVX-512: against
  // oneDNN capped to AVX2, 1.21-1.26x at 56x56 and 28x28 in three processes once the phases were chunked (the
  // whole-image form had swung between 0.7x and 1.34x).
  const bool small_fused = N == 1 && e.T <= 64 && e.C * e.OC < 128 * 128 && simd == Simd::Avx512;
  if (choice == ConvKernels::Auto && (e.C < 16 || e.OC < 16 || (e.T < 100 && !small_fused))) {
    return at::Tensor();
  }
  if (16 * e.OC * e.C > (int64_t(1) << 22)) return at::Tensor();

  const bool v512 = simd == Simd::Avx512;
  const int MR = v512 ? kMr512 : kMr256;
  const int64_t V = v512 ? kV512 : kV256;
  const int64_t panels = (e.OC + MR - 1) / MR;

  // The image's tiles go in chunks of up to 48, each chunk through all three phases on one thread: its transformed
  // input (16 x C x 48 floats) and products stay in that core's L2. (Whole-image phases kept 6.4 MiB of
  // intermediates in the shared L3; with other tenants on it the 56x56 layer took 0.70 or 1.5 ms by the minute;
  // chunked, 1.37-1.66x oneDNN in both states.) Few chunks (small images) would leave threads idle, so the output
  // channels are then split into groups too: a work item is (image, chunk, channel group), and each item
  // transforms its chunk's input itself (the transforms are the small part), unless fused (below). One image of at
  // most 64 tiles (14x14 outputs and below) goes as one chunk.
  const int64_t nchunks0 = N == 1 && e.T <= 64 ? 1 : (e.T + 47) / 48;
  const int64_t cs = ((e.T + nchunks0 - 1) / nchunks0 + V - 1) / V * V;  // chunk size: balanced, whole vectors
  const int64_t chunks = (e.T + cs - 1) / cs;
  const int64_t want = 4 * at::get_num_threads();
  const int64_t groups_oc0 = std::clamp<int64_t>((want + N * chunks - 1) / (N * chunks), 1, panels);
  const int64_t ppg = 8 / MR;  // panels per transform group of 8 channels: group boundaries stay on them
  int64_t gpanels = ((panels + groups_oc0 - 1) / groups_oc0 + ppg - 1) / ppg * ppg;  // panels per group
  // The transformed weights (16 x OC x C floats, 4 MiB for 256 x 256) are written once and read by every work
  // item. With one work item per channel group (one image of a few tiles), each item transforms its own channels
  // into a per-thread buffer that stays in L2: the shared 4 MiB buffer's stores and reloads through L3 were 41 % of
  // a 14x14 layer's time (the transform's arithmetic is small). Otherwise one shared transform, before the items.
  const bool fused = N * chunks == 1;
  if (fused) {  // an item's transformed weights stay within 512 KiB (half an L2): 512 x 512 at 7x7 had 2 MiB per item
    const int64_t fit = std::max<int64_t>(ppg, (int64_t(512) << 10) / (16 * 4 * e.C * MR) / ppg * ppg);
    gpanels = std::min(gpanels, fit);
  }
  const int64_t groups_oc = (panels + gpanels - 1) / gpanels;
  const float* wp = w.data_ptr<float>();
  thread_local std::vector<float> u_buf;
  float* U = fused ? nullptr : grown(u_buf, static_cast<size_t>(16 * panels * e.C * MR));
  if (!fused) transform_weights(wp, e, MR, U);
  std::vector<int64_t> koff(e.C);
  for (int64_t c = 0; c < e.C; ++c) koff[c] = c * cs;
  const Plan p{e.C, e.OC, 1, cs, cs, cs, e.C, cs, cs, (e.C - 1) * cs, koff.data()};
  // lane facts relative to a block's start (the kernel gets pointers to it): the same for every block of a width
  Tile<3, kV512> a3;
  Tile<2, kV512> a2;
  Tile<1, kV512> a1;
  Tile<3, kV256> b3;
  Tile<2, kV256> b2;
  Tile<1, kV256> b1;
  a3.init(p, 0, e.C * cs), a2.init(p, 0, e.C * cs), a1.init(p, 0, e.C * cs);
  b3.init(p, 0, e.C * cs), b2.init(p, 0, e.C * cs), b1.init(p, 0, e.C * cs);
  const float zeros[kMr512] = {};

  at::Tensor b32;
  if (bias.has_value() && bias->defined()) b32 = bias->to(at::kFloat).contiguous();
  const float* bp = b32.defined() ? b32.data_ptr<float>() : nullptr;
  at::Tensor y = at::empty({N, e.OC, e.OH, e.OW}, x.options());
  const float* xb = x4.data_ptr<float>();
  float* yb = y.data_ptr<float>();
  const int64_t xs_v = e.C * cs, xs_m = gpanels * MR * cs;  // M holds one group's channels
  // fused (one image chunk): its input transform once, shared by the channel groups' items (each item did it
  // again before: 15 % of a 14x14 layer's time)
  thread_local std::vector<float> vs_buf;
  float* Vs = fused ? grown(vs_buf, static_cast<size_t>(16 * xs_v)) : nullptr;
  if (fused) {
    at::parallel_for(0, e.C, 16, [&](int64_t c0, int64_t c1) { input_chunk(xb, e, 0, e.T, cs, v512, Vs, xs_v, c0, c1); });
  }
  at::parallel_for(0, N * chunks * groups_oc, 1, [&](int64_t i0, int64_t i1) {
    thread_local std::vector<float> v_buf, m_buf, ug_buf;
    float* Vc = grown(v_buf, static_cast<size_t>(16 * xs_v));
    float* Mc = grown(m_buf, static_cast<size_t>(16 * xs_m));
    float* Ug = fused ? grown(ug_buf, static_cast<size_t>(16 * gpanels * e.C * MR)) : nullptr;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t og = i % groups_oc, ci = (i / groups_oc) % chunks, n = i / (groups_oc * chunks);
      const int64_t q0 = ci * cs, q1 = std::min(e.T, q0 + cs);
      const int64_t P = q1 - q0, Pp = (P + V - 1) / V * V;  // positions, rounded up to whole vectors
      const int64_t pb0 = og * gpanels, pb1 = std::min(panels, pb0 + gpanels);
      if (pb0 >= pb1) continue;
      const int64_t oc0 = pb0 * MR, oc1 = std::min(e.OC, pb1 * MR);
      // this item's weights: its own transform (fused) or its panels of the shared one
      const float* Ui = U;
      int64_t up0 = 0, unp = panels;
      if (fused) {
        transform_weight_groups(wp, e, MR, pb0 / ppg, (pb1 + ppg - 1) / ppg, pb0, gpanels, Ug);
        Ui = Ug, up0 = pb0, unp = gpanels;
      }
      const float* xn = xb + n * e.C * e.H * e.W;
      float* yn = yb + n * e.OC * e.OH * e.OW;
      const int64_t ty0 = q0 / e.TW, ty1 = (q1 - 1) / e.TW;  // the tile rows the chunk touches
      // phase 1 (unless done once for all items, fused)
      const float* Vi = Vs;
      if (!fused) {
        input_chunk(xn, e, q0, q1, cs, v512, Vc, xs_v);
        Vi = Vc;
      }
      // phase 2: 16 GEMMs of the group's channels over the chunk's positions, blocks of up to 3 vectors
      for (int xi = 0; xi < 16; ++xi) {
        for (int64_t q = 0; q < Pp;) {
          const int64_t left = (Pp - q) / V, nr = left == 4 ? 2 : std::min<int64_t>(3, left);
          const float* v = Vi + xi * xs_v + q;
          for (int64_t pb = pb0; pb < pb1; ++pb) {
            const float* a = Ui + (xi * unp + pb - up0) * e.C * MR;
            float* m = Mc + xi * xs_m + (pb - pb0) * MR * cs + q;
            const int rows = static_cast<int>(std::min<int64_t>(MR, e.OC - pb * MR));
            switch (nr * (v512 ? 1 : -1)) {
              case 3: block_avx512<3, false>(p, a, v, zeros, rows, a3, m); break;
              case 2: block_avx512<2, false>(p, a, v, zeros, rows, a2, m); break;
              case 1: block_avx512<1, false>(p, a, v, zeros, rows, a1, m); break;
              case -3: block_avx2<3, false>(p, a, v, zeros, rows, b3, m); break;
              case -2: block_avx2<2, false>(p, a, v, zeros, rows, b2, m); break;
              default: block_avx2<1, false>(p, a, v, zeros, rows, b1, m); break;
            }
          }
          q += nr * V;
        }
      }
      // phase 3: the chunk's output tiles of the group's output channels
      for (int64_t oc = oc0; oc < oc1; ++oc) {
        const float bias_oc = bp ? bp[oc] : 0.0f;
        const float* mc = Mc + (oc - oc0) * cs;
        for (int64_t ty = ty0; ty <= ty1; ++ty) {
          const int64_t ta = std::max<int64_t>(0, q0 - ty * e.TW), tb = std::min(e.TW, q1 - ty * e.TW);
          if (v512) {
            output_row(mc, xs_m, bias_oc, e, ty, ta, tb, q0, yn + oc * e.OH * e.OW);
          } else {
            output_row_avx2(mc, xs_m, bias_oc, e, ty, ta, tb, q0, yn + oc * e.OH * e.OW);
          }
        }
      }
    }
  });
  return batched ? y : y.squeeze(0);
#else
  return at::Tensor();
#endif
}

}  // namespace weightshare::cpu
