// Winograd F(2x2, 3x3) convolution of NCHW fp32 input (Lavin & Gray, "Fast Algorithms for Convolutional Neural
// Networks", 2016): dense 3x3 layers with unit stride and dilation, any padding, AVX-512.
//
// Why: the direct kernel (direct_conv.cpp) runs at oneDNN's multiply-add rate within ~5 %, and oneDNN with its input
// in a favourable place was 0.95-0.96x of ... itself: at each method's best input placement the ResNet 3x3 layer
// (64 -> 64, 56x56) took 1.105-1.115 ms dense and 1.165-1.18 ms direct. F(2x2, 3x3) computes each 2x2 output tile
// from a 4x4 input tile with 16 multiply-adds per (input channel, output channel) instead of 36, so the GEMM at its
// heart does 2.25x less work than any direct convolution.
//
// The three phases, each one parallel loop over the image:
//   1. input transform: V[xi][c][t] = (B^T d B)[xi] for every 4x4 input tile d (tiles t = 2x2 output tiles, row
//      major; 16 tiles per vector, the strided columns gathered by two permutes per row);
//   2. 16 GEMMs, M[xi] [OC x tiles] = U[xi] [OC x C] x V[xi] [C x tiles], on the direct conv's micro-kernel
//      (conv_gemm.h), with U = G g G^T of the decoded weight repacked as [C][8] panels;
//   3. output transform: y tile = A^T M A (+ bias), interleaved back into the NCHW rows.
// Numerics: the transforms only add, subtract and halve (G's 1/2 is exact in binary), so results differ from a
// direct convolution by the rounding of a different summation order: in the tests within 1e-5 relative of
// F.conv2d, as the direct kernel is.
#include "winograd_conv.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "conv_gemm.h"
#include "weightshare/cpu_features.h"

namespace weightshare::cpu {
#ifdef WS_X86
namespace {

using namespace conv_gemm;

struct Geo {
  int64_t C, OC, H, W, OH, OW, ph, pw, TH, TW, T, Tp;  // T = TH * TW tiles, Tp = T rounded up to 16
};

float* reused(std::vector<float>& buf, size_t n) {
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

WS_AVX512 void transform_weight_panels(const float* g, const Geo& e, int64_t b0, int64_t b1, float* U) {
  constexpr int MR = 8;
  const int64_t ocb = (e.OC + MR - 1) / MR;
  const __m256 half = _mm256_set1_ps(0.5f);
  for (int64_t b = b0; b < b1; ++b) {
    const int rows = static_cast<int>(std::min<int64_t>(MR, e.OC - b * MR));
    // lane m reads output channel b * 8 + m (lanes past OC read channel b * 8 and are zeroed)
    alignas(32) int32_t lane_off[MR];
    for (int m = 0; m < MR; ++m) lane_off[m] = static_cast<int32_t>((m < rows ? m : 0) * e.C * 9);
    const __m256i off = _mm256_load_si256(reinterpret_cast<const __m256i*>(lane_off));
    const __m256 live = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(rows),
                                                               _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
    for (int64_t c = 0; c < e.C; ++c) {
      const float* base = g + (b * MR * e.C + c) * 9;
      __m256 k[9];
      for (int j = 0; j < 9; ++j) k[j] = _mm256_and_ps(live, _mm256_i32gather_ps(base + j, off, 4));
      __m256 t[4][3];  // G g: 4 x 3
      for (int j = 0; j < 3; ++j) {
        t[0][j] = k[j];
        t[1][j] = _mm256_mul_ps(half, _mm256_add_ps(_mm256_add_ps(k[j], k[3 + j]), k[6 + j]));
        t[2][j] = _mm256_mul_ps(half, _mm256_add_ps(_mm256_sub_ps(k[j], k[3 + j]), k[6 + j]));
        t[3][j] = k[6 + j];
      }
      float* dst = U + (b * e.C + c) * MR;  // + xi * ocb * C * MR
      const int64_t xs = ocb * e.C * MR;
      for (int i = 0; i < 4; ++i) {  // (G g) G^T
        _mm256_storeu_ps(dst + (i * 4 + 0) * xs, t[i][0]);
        _mm256_storeu_ps(dst + (i * 4 + 1) * xs,
                         _mm256_mul_ps(half, _mm256_add_ps(_mm256_add_ps(t[i][0], t[i][1]), t[i][2])));
        _mm256_storeu_ps(dst + (i * 4 + 2) * xs,
                         _mm256_mul_ps(half, _mm256_add_ps(_mm256_sub_ps(t[i][0], t[i][1]), t[i][2])));
        _mm256_storeu_ps(dst + (i * 4 + 3) * xs, t[i][2]);
      }
    }
  }
}

// U[xi][ocb][c][8] = (G g G^T)[xi] of every (output, input) channel pair, rows past OC zero: the 8 output
// channels of a panel are the 8 lanes of a vector, so every panel row is one 32-byte store. (A scalar version with
// a scattered store per value took 2.4 ms for a 256 x 256 layer, more than the whole convolution.)
WS_AVX512 void transform_weights(const float* g, const Geo& e, float* U) {
  constexpr int MR = 8;
  const int64_t ocb = (e.OC + MR - 1) / MR;
  at::parallel_for(0, ocb, 1, [&](int64_t b0, int64_t b1) {
    transform_weight_panels(g, e, b0, b1, U);
  });
}

// Lanes j of a 16-float load at column `start` that lie in [0, n).
inline __mmask16 inside(int64_t start, int64_t n) {
  const int64_t lo = std::clamp<int64_t>(-start, 0, 16), hi = std::clamp<int64_t>(n - start, 0, 16);
  if (hi <= lo) return 0;
  return static_cast<__mmask16>(((1u << hi) - 1u) & ~((1u << lo) - 1u));
}

// Phase 1 for one (channel, tile row): the 16 transformed values of each tile of the row into V (stride xs between
// the 16 xi planes).
WS_AVX512 void input_row(const float* xc, const Geo& e, int64_t ty, float* v, int64_t xs) {
  alignas(64) static const int32_t ev[16] = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
  alignas(64) static const int32_t od[16] = {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};
  const __m512i even = _mm512_load_si512(ev), odd = _mm512_load_si512(od);
  for (int64_t tx0 = 0; tx0 < e.TW; tx0 += 16) {
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
    const __mmask16 keep = inside(tx0, e.TW);
    float* o = v + ty * e.TW + tx0;
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
WS_AVX512 void output_row(const float* mc, int64_t xs, float bias, const Geo& e, int64_t ty, float* yc) {
  alignas(64) static const int32_t lo_idx[16] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23};
  alignas(64) static const int32_t hi_idx[16] = {8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i lo = _mm512_load_si512(lo_idx), hi = _mm512_load_si512(hi_idx);
  const __m512 bv = _mm512_set1_ps(bias);
  for (int64_t tx0 = 0; tx0 < e.TW; tx0 += 16) {
    const __mmask16 keep = inside(tx0, e.TW);
    const float* src = mc + ty * e.TW + tx0;
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
      _mm512_mask_storeu_ps(out, inside(2 * tx0, e.OW), _mm512_permutex2var_ps(y0, lo, y1));
      _mm512_mask_storeu_ps(out + 16, inside(2 * tx0 + 16, e.OW), _mm512_permutex2var_ps(y0, hi, y1));
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
  if (choice == ConvKernels::Never || choice == ConvKernels::Direct || simd_level() != Simd::Avx512 ||
      !x.is_cpu() || x.scalar_type() != at::kFloat || w.scalar_type() != at::kFloat || groups != 1 ||
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
  e.TH = (e.OH + 1) / 2, e.TW = (e.OW + 1) / 2, e.T = e.TH * e.TW, e.Tp = (e.T + 15) / 16 * 16;
  // Where it pays: the transforms cost O(C + OC) per tile against the GEMM's O(C x OC), so very thin layers (the
  // 3-channel stem) stay with the direct kernel; the buffers (16 x (C + OC) x tiles floats) stay bounded.
  if (choice == ConvKernels::Auto && (e.C < 16 || e.OC < 16)) return at::Tensor();
  if (16 * (e.C + e.OC) * e.Tp > (int64_t(1) << 24)) return at::Tensor();

  constexpr int MR = kMr512;
  const int64_t ocb = (e.OC + MR - 1) / MR;
  thread_local std::vector<float> u_buf, v_buf, m_buf;
  float* U = reused(u_buf, static_cast<size_t>(16 * ocb * e.C * MR));
  float* V = reused(v_buf, static_cast<size_t>(16 * e.C * e.Tp));
  float* M = reused(m_buf, static_cast<size_t>(16 * e.OC * e.Tp));
  transform_weights(w.data_ptr<float>(), e, U);

  // the GEMM's geometry: positions are tiles (all real), row c of B at c * Tp, and its tiles of 48 positions
  std::vector<int64_t> koff(e.C);
  for (int64_t c = 0; c < e.C; ++c) koff[c] = c * e.Tp;
  const Plan p{e.C, e.OC, 1, e.Tp, e.Tp, e.Tp, e.C, e.Tp, e.Tp, (e.C - 1) * e.Tp, koff.data()};
  // tiles of 3 vectors (48 positions); the last 4 go as 2 + 2 and a lone 1-2 as such (a 1-vector tile issues a
  // broadcast per FMA)
  std::vector<std::pair<int64_t, int>> tiles;  // (first position, vectors)
  for (int64_t q = 0, left = e.Tp / kV512; left > 0;) {
    const int nr = left == 4 ? 2 : static_cast<int>(std::min<int64_t>(3, left));
    tiles.emplace_back(q, nr);
    q += nr * kV512, left -= nr;
  }
  // lane facts relative to a tile's start (the kernel gets pointers to it): the same for every tile of a width
  Tile<3, kV512> t3;
  Tile<2, kV512> t2;
  Tile<1, kV512> t1;
  t3.init(p, 0, e.C * e.Tp);
  t2.init(p, 0, e.C * e.Tp);
  t1.init(p, 0, e.C * e.Tp);
  const float zeros[MR] = {};

  at::Tensor b32;
  if (bias.has_value() && bias->defined()) b32 = bias->to(at::kFloat).contiguous();
  const float* bp = b32.defined() ? b32.data_ptr<float>() : nullptr;
  at::Tensor y = at::empty({N, e.OC, e.OH, e.OW}, x.options());
  const int64_t xs_v = e.C * e.Tp, xs_m = e.OC * e.Tp;
  for (int64_t n = 0; n < N; ++n) {
    const float* xn = x4.data_ptr<float>() + n * e.C * e.H * e.W;
    float* yn = y.data_ptr<float>() + n * e.OC * e.OH * e.OW;
    at::parallel_for(0, e.C * e.TH, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t c = i / e.TH, ty = i % e.TH;
        input_row(xn + c * e.H * e.W, e, ty, V + c * e.Tp, xs_v);
        if (ty == e.TH - 1 && e.Tp > e.T) {  // zero the padding positions (read by the GEMM, never used)
          for (int xi = 0; xi < 16; ++xi) std::memset(V + xi * xs_v + c * e.Tp + e.T, 0, 4 * (e.Tp - e.T));
        }
      }
    });
    // 16 GEMMs; the blocks of one (xi, tile) share its input rows in cache, so the output-channel block is innermost
    const int64_t nt = static_cast<int64_t>(tiles.size());
    at::parallel_for(0, 16 * nt * ocb, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t b = i % ocb, t = (i / ocb) % nt, xi = i / (ocb * nt);
        const int64_t q0 = tiles[t].first;
        const float* a = U + (xi * ocb + b) * e.C * MR;
        const float* v = V + xi * xs_v + q0;
        float* m = M + xi * xs_m + b * MR * e.Tp + q0;
        const int rows = static_cast<int>(std::min<int64_t>(MR, e.OC - b * MR));
        switch (tiles[t].second) {
          case 3: block_avx512<3, false>(p, a, v, zeros, rows, t3, m); break;
          case 2: block_avx512<2, false>(p, a, v, zeros, rows, t2, m); break;
          default: block_avx512<1, false>(p, a, v, zeros, rows, t1, m); break;
        }
      }
    });
    at::parallel_for(0, e.OC * e.TH, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t oc = i / e.TH, ty = i % e.TH;
        output_row(M + oc * e.Tp, xs_m, bp ? bp[oc] : 0.0f, e, ty, yn + oc * e.OH * e.OW);
      }
    });
  }
  return batched ? y : y.squeeze(0);
#else
  return at::Tensor();
#endif
}

}  // namespace weightshare::cpu
