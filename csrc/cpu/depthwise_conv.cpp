// Direct depthwise convolution, fp32: NCHW with any stride / padding / dilation / channel multiplier, and
// channels-last (NHWC) with multiplier 1.
//
// Why not oneDNN: a depthwise layer does 9 multiply-adds per output pixel, so at batch 1 the call is dominated by
// fixed costs, and oneDNN's include reordering the weight into its blocked layout on every call (our weight is
// freshly decoded each call, so nothing can be cached). Measured on the benchmark layer (256 channels, 28x28, 3x3),
// the dense F.conv2d took 0.147 ms and the dequantize + F.conv2d path 0.211 ms. Here each (sample, output channel)
// plane is one task. With unit column stride (the common case) and AVX-512 / AVX2, an output row is computed in
// register-wide chunks: every kernel tap adds one masked load of the input row times the broadcast weight (the
// mask drops the columns that fall into the padding, and masked lanes never fault), and the chunk is stored once.
// Otherwise a portable loop adds each tap's contiguous run of valid columns into the output row.
#include "depthwise_conv.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "decode_scratch.h"
#include "weightshare/cpu_features.h"

namespace weightshare::cpu {
namespace {

// Output columns [lo, hi) whose input column ox*s - p + kx*d lies in [0, W).
inline void valid_columns(int64_t W, int64_t OW, int64_t s, int64_t p, int64_t off, int64_t* lo, int64_t* hi) {
  // need 0 <= ox*s + (off - p) < W
  const int64_t shift = off - p;
  int64_t a = shift >= 0 ? 0 : (-shift + s - 1) / s;
  int64_t b = (W - shift + s - 1) / s;  // first ox with ox*s + shift >= W
  if (W - shift <= 0) b = 0;
  *lo = std::min(a, OW);
  *hi = std::max(*lo, std::min(b, OW));
}

void plane(const float* in, const float* w, float bias, float* out, int64_t H, int64_t W, int64_t OH, int64_t OW,
           int64_t KH, int64_t KW, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw) {
  for (int64_t oy = 0; oy < OH; ++oy) {
    float* o = out + oy * OW;
    for (int64_t ox = 0; ox < OW; ++ox) o[ox] = bias;
    for (int64_t ky = 0; ky < KH; ++ky) {
      const int64_t iy = oy * sh - ph + ky * dh;
      if (iy < 0 || iy >= H) continue;
      const float* row = in + iy * W;
      for (int64_t kx = 0; kx < KW; ++kx) {
        const float wv = w[ky * KW + kx];
        int64_t lo, hi;
        valid_columns(W, OW, sw, pw, kx * dw, &lo, &hi);
        const int64_t shift = kx * dw - pw;
        if (sw == 1) {
          const float* r = row + shift;
          for (int64_t ox = lo; ox < hi; ++ox) o[ox] += wv * r[ox];
        } else {
          for (int64_t ox = lo; ox < hi; ++ox) o[ox] += wv * row[ox * sw + shift];
        }
      }
    }
  }
}

// The geometry shared by every plane of a call; cols[kx] = the valid output columns [lo, hi) of tap column kx.
struct Geometry {
  int64_t H, W, OH, OW, KH, KW, sh, sw, ph, pw, dh, dw;
  std::vector<std::pair<int64_t, int64_t>> cols;
  // lanes[chunk * KW + kx]: bit j set iff output column chunk*V + j is valid for tap column kx (V lanes per
  // vector), computed once per call so the inner loop is a table read, a masked load and an FMA
  std::vector<uint32_t> lanes;
  void build_lanes(int64_t V) {
    const int64_t chunks = (OW + V - 1) / V;
    lanes.assign(chunks * KW, 0u);
    for (int64_t ch = 0; ch < chunks; ++ch)
      for (int64_t kx = 0; kx < KW; ++kx) {
        const int64_t a = std::max(cols[kx].first, ch * V), b = std::min({cols[kx].second, ch * V + V, OW});
        if (a < b) lanes[ch * KW + kx] = static_cast<uint32_t>(((uint64_t(1) << (b - a)) - 1) << (a - ch * V));
      }
  }
};

// The 3x3, stride-1, undilated plane with padding 0 or 1 (the usual depthwise layer). The general loops above
// spend their time on per-tap branches, geometry reloads and, at the two border chunks of every row, masked loads
// (AVX2's vmaskmovps is microcoded on AMD Zen). Here the plane is first copied into a buffer whose border is zero
// (`pad`: Hp x Wp, zeroed by the caller once per thread and call; only the interior is written), so every tap is a
// plain load; the nine weights stay in registers and R output rows share each input row's three shifted loads.
// 256 channels of 28 x 28, two threads: AVX2 0.113 -> 0.053 ms, and on the AVX-512 machine (Zen 4) the same AVX2
// code beats the AVX-512 loop (0.092 ms) and an AVX-512 form of this kernel (0.066 ms: 16-wide chunks at 28
// columns waste more lanes, and every shifted 64-byte load splits a cache line), so both ISAs run it.
struct Pad3x3 {
  int64_t Hp, Wp;  // rows H + 2 ph; columns: the output's V-wide chunks plus the two taps beyond (>= W + 2 pw)
  static Pad3x3 of(const Geometry& g, int64_t V) { return {g.H + 2 * g.ph, (g.OW + V - 1) / V * V + 2}; }
};

inline bool zero_bordered_3x3(const Geometry& g) {
  return g.KH == 3 && g.KW == 3 && g.sh == 1 && g.sw == 1 && g.dh == 1 && g.dw == 1 && g.ph <= 1 && g.pw <= 1;
}

// The plane's rows into the zero-bordered buffer's interior.
inline void copy_interior(const float* in, const Geometry& g, const Pad3x3& P, float* pad) {
  for (int64_t iy = 0; iy < g.H; ++iy) std::copy(in + iy * g.W, in + (iy + 1) * g.W, pad + (iy + g.ph) * P.Wp + g.pw);
}

#ifdef WS_X86
// The AVX-512 and AVX2 planes walk the same loops with different vector widths and mask forms. They are two
// functions because GCC compiles a function for one target: a shared template body could not be inlined into both
// (intrinsics need the caller's target), and compiling it for the union would put AVX-512 code in the AVX2 path.
// For output rows oy0 .. oy0 + R - 1 and kernel row ky: each row's input row (at column c0) and whether it lies
// inside the input (a row outside reads nothing and adds zero).
template <int R>
inline void tap_rows(const float* in, const Geometry& g, int64_t oy0, int64_t ky, int64_t c0, const float** row,
                     bool* inside) {
  for (int r = 0; r < R; ++r) {
    const int64_t iy = (oy0 + r) * g.sh - g.ph + ky * g.dh;
    inside[r] = iy >= 0 && iy < g.H;
    row[r] = in + (inside[r] ? iy : 0) * g.W + c0;
  }
}

// R output rows at a time, each with its own accumulator: with one row, every chunk was a single chain of
// KH x KW dependent FMAs and the loop waited out the FMA latency on each (profile: 57 % of the call in this loop,
// 0.122-0.129 ms against oneDNN's 0.114-0.118 ms). A row whose tap row falls outside the input loads with an empty
// mask (reads nothing, adds zero), so the loop has no branches.
template <int R>
WS_AVX512 inline void rows_avx512(const float* in, const float* w, float bias, float* out, const Geometry& g,
                                  int64_t oy0) {
  for (int64_t c0 = 0; c0 < g.OW; c0 += 16) {
    const int64_t c1 = std::min(g.OW, c0 + 16);
    const uint32_t* lanes = g.lanes.data() + (c0 / 16) * g.KW;
    __m512 acc[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) acc[r] = _mm512_set1_ps(bias);
    for (int64_t ky = 0; ky < g.KH; ++ky) {
      const float* row[R];
      bool inside[R];
      tap_rows<R>(in, g, oy0, ky, c0, row, inside);
      for (int64_t kx = 0; kx < g.KW; ++kx) {
        // lanes c0..c0+15 read row[ox + kx*dw - pw]; only the valid ones are loaded
        const __m512 wv = _mm512_set1_ps(w[ky * g.KW + kx]);
        const int64_t off = kx * g.dw - g.pw;
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) {
          const __mmask16 m = inside[r] ? static_cast<__mmask16>(lanes[kx]) : __mmask16(0);
          acc[r] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(m, row[r] + off), acc[r]);
        }
      }
    }
    const __mmask16 keep = static_cast<__mmask16>((1u << (c1 - c0)) - 1u);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(out + (oy0 + r) * g.OW + c0, keep, acc[r]);
  }
}

WS_AVX512 void plane_avx512(const float* in, const float* w, float bias, float* out, const Geometry& g) {
  int64_t oy = 0;
  for (; oy + 4 <= g.OH; oy += 4) rows_avx512<4>(in, w, bias, out, g, oy);
  for (; oy < g.OH; ++oy) rows_avx512<1>(in, w, bias, out, g, oy);
}

template <int R>
WS_AVX2 inline void rows_avx2(const float* in, const float* w, float bias, float* out, const Geometry& g,
                              int64_t oy0) {
  alignas(32) static const int32_t bit[8] = {1, 2, 4, 8, 16, 32, 64, 128};
  const __m256i lane_bit = _mm256_load_si256(reinterpret_cast<const __m256i*>(bit));
  for (int64_t c0 = 0; c0 < g.OW; c0 += 8) {
    const int64_t c1 = std::min(g.OW, c0 + 8);
    const uint32_t* lanes = g.lanes.data() + (c0 / 8) * g.KW;
    __m256 acc[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) acc[r] = _mm256_set1_ps(bias);
    for (int64_t ky = 0; ky < g.KH; ++ky) {
      const float* row[R];
      bool inside[R];
      tap_rows<R>(in, g, oy0, ky, c0, row, inside);
      for (int64_t kx = 0; kx < g.KW; ++kx) {
        const __m256 wv = _mm256_set1_ps(w[ky * g.KW + kx]);
        const int64_t off = kx * g.dw - g.pw;
        if (lanes[kx] == 0xffu) {  // all 8 columns inside: plain loads (vmaskmovps is microcoded on AMD Zen)
#pragma GCC unroll 4
          for (int r = 0; r < R; ++r)
            if (inside[r]) acc[r] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(row[r] + off), acc[r]);
          continue;
        }
        // lane j is loaded iff bit j of the table entry is set (maskload reads lanes whose sign bit is set)
        const __m256i m = _mm256_cmpeq_epi32(
            _mm256_and_si256(_mm256_set1_epi32(static_cast<int>(lanes[kx])), lane_bit), lane_bit);
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) {
          const __m256i mr = inside[r] ? m : _mm256_setzero_si256();
          acc[r] = _mm256_fmadd_ps(wv, _mm256_maskload_ps(row[r] + off, mr), acc[r]);
        }
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      float* o = out + (oy0 + r) * g.OW + c0;
      if (c1 - c0 == 8) {
        _mm256_storeu_ps(o, acc[r]);
      } else {
        alignas(32) float tmp[8];
        _mm256_store_ps(tmp, acc[r]);
        std::copy(tmp, tmp + (c1 - c0), o);
      }
    }
  }
}

// The first n (1..7) lanes of v stored at dst.
WS_AVX2 inline void store_first(float* dst, __m256 v, int64_t n) {
  __m128 h = _mm256_castps256_ps128(v);
  if (n >= 4) {
    _mm_storeu_ps(dst, h);
    h = _mm256_extractf128_ps(v, 1);
    dst += 4;
    n -= 4;
  }
  if (n >= 2) {
    _mm_storel_pi(reinterpret_cast<__m64*>(dst), h);
    h = _mm_movehl_ps(h, h);
    dst += 2;
    n -= 2;
  }
  if (n == 1) _mm_store_ss(dst, h);
}

template <int R>
WS_AVX2 inline void rows3x3_avx2(const float* pad, int64_t Wp, const __m256 (&w)[9], __m256 b, float* out,
                                 int64_t OW, int64_t oy0) {
  for (int64_t c0 = 0; c0 < OW; c0 += 8) {
    __m256 acc[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) acc[r] = b;
    // input row oy0 + i feeds output rows oy0 + i - ky for ky = 0..2
#pragma GCC unroll 6
    for (int i = 0; i < R + 2; ++i) {
      const float* row = pad + (oy0 + i) * Wp + c0;
      const __m256 v[3] = {_mm256_loadu_ps(row), _mm256_loadu_ps(row + 1), _mm256_loadu_ps(row + 2)};
#pragma GCC unroll 3
      for (int ky = 0; ky < 3; ++ky) {
        const int r = i - ky;
        if (r < 0 || r >= R) continue;
#pragma GCC unroll 3
        for (int kx = 0; kx < 3; ++kx) acc[r] = _mm256_fmadd_ps(w[3 * ky + kx], v[kx], acc[r]);
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      float* o = out + (oy0 + r) * OW + c0;
      if (OW - c0 >= 8) {
        _mm256_storeu_ps(o, acc[r]);
      } else {
        store_first(o, acc[r], OW - c0);
      }
    }
  }
}

WS_AVX2 void plane3x3_avx2(const float* in, const float* wk, float bias, float* out, const Geometry& g, float* pad) {
  const Pad3x3 P = Pad3x3::of(g, 8);
  copy_interior(in, g, P, pad);
  __m256 w[9];
  for (int t = 0; t < 9; ++t) w[t] = _mm256_set1_ps(wk[t]);
  const __m256 b = _mm256_set1_ps(bias);
  int64_t oy = 0;
  for (; oy + 4 <= g.OH; oy += 4) rows3x3_avx2<4>(pad, P.Wp, w, b, out, g.OW, oy);
  for (; oy < g.OH; ++oy) rows3x3_avx2<1>(pad, P.Wp, w, b, out, g.OW, oy);
}

WS_AVX2 void plane_avx2(const float* in, const float* w, float bias, float* out, const Geometry& g) {
  int64_t oy = 0;
  for (; oy + 4 <= g.OH; oy += 4) rows_avx2<4>(in, w, bias, out, g, oy);
  for (; oy < g.OH; ++oy) rows_avx2<1>(in, w, bias, out, g, oy);
}
#endif

// ---------------------------------------------------------------------------------------------------- NHWC
// Channels-last input (multiplier 1): the channels of a pixel are contiguous, so the kernel vectorises over them.
// One task per output row; per output pixel the taps that land inside the input are found once, then every
// channel chunk adds tap weight x input pixel for those taps (weights transposed to [tap][channel] so both loads
// are unit-stride) and is stored once.
struct NhwcGeometry {
  int64_t C, H, W, OH, OW, KH, KW, sh, sw, ph, pw, dh, dw;
};

// The taps of output pixel (oy, ox) that fall inside the input: tap index and input pixel offset (in pixels).
inline int valid_taps(const NhwcGeometry& g, int64_t oy, int64_t ox, int* tap, int64_t* pix) {
  int n = 0;
  for (int64_t ky = 0; ky < g.KH; ++ky) {
    const int64_t iy = oy * g.sh - g.ph + ky * g.dh;
    if (iy < 0 || iy >= g.H) continue;
    for (int64_t kx = 0; kx < g.KW; ++kx) {
      const int64_t ix = ox * g.sw - g.pw + kx * g.dw;
      if (ix < 0 || ix >= g.W) continue;
      tap[n] = static_cast<int>(ky * g.KW + kx);
      pix[n++] = iy * g.W + ix;
    }
  }
  return n;
}

void nhwc_row(const float* in, const float* wt, const float* bias, float* out, const NhwcGeometry& g, int64_t oy,
              int* tap, int64_t* pix) {
  for (int64_t ox = 0; ox < g.OW; ++ox) {
    const int nt = valid_taps(g, oy, ox, tap, pix);
    float* o = out + ox * g.C;
    for (int64_t c = 0; c < g.C; ++c) o[c] = bias ? bias[c] : 0.0f;
    for (int t = 0; t < nt; ++t) {
      const float* wv = wt + tap[t] * g.C;
      const float* xv = in + pix[t] * g.C;
      for (int64_t c = 0; c < g.C; ++c) o[c] += wv[c] * xv[c];
    }
  }
}

#ifdef WS_X86
WS_AVX512 void nhwc_row_avx512(const float* in, const float* wt, const float* bias, float* out,
                               const NhwcGeometry& g, int64_t oy, int64_t ox0, int64_t ox1, int* tap, int64_t* pix) {
  for (int64_t ox = ox0; ox < ox1; ++ox) {
    const int nt = valid_taps(g, oy, ox, tap, pix);
    float* o = out + ox * g.C;
    int64_t c0 = 0;
    // four independent accumulators: a single one would wait out the FMA latency on every tap
    for (; c0 + 64 <= g.C; c0 += 64) {
      __m512 acc[4];
      for (int v = 0; v < 4; ++v) acc[v] = bias ? _mm512_loadu_ps(bias + c0 + 16 * v) : _mm512_setzero_ps();
      for (int t = 0; t < nt; ++t) {
        const float* wv = wt + tap[t] * g.C + c0;
        const float* xv = in + pix[t] * g.C + c0;
        for (int v = 0; v < 4; ++v) {
          acc[v] = _mm512_fmadd_ps(_mm512_loadu_ps(wv + 16 * v), _mm512_loadu_ps(xv + 16 * v), acc[v]);
        }
      }
      for (int v = 0; v < 4; ++v) _mm512_storeu_ps(o + c0 + 16 * v, acc[v]);
    }
    for (; c0 < g.C; c0 += 16) {
      const __mmask16 m = g.C - c0 >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << (g.C - c0)) - 1u);
      __m512 acc = bias ? _mm512_maskz_loadu_ps(m, bias + c0) : _mm512_setzero_ps();
      for (int t = 0; t < nt; ++t) {
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, wt + tap[t] * g.C + c0),
                              _mm512_maskz_loadu_ps(m, in + pix[t] * g.C + c0), acc);
      }
      _mm512_mask_storeu_ps(o + c0, m, acc);
    }
  }
}

WS_AVX2 void nhwc_row_avx2(const float* in, const float* wt, const float* bias, float* out, const NhwcGeometry& g,
                           int64_t oy, int64_t ox0, int64_t ox1, int* tap, int64_t* pix) {
  const int64_t cv = g.C / 8 * 8;
  for (int64_t ox = ox0; ox < ox1; ++ox) {
    const int nt = valid_taps(g, oy, ox, tap, pix);
    float* o = out + ox * g.C;
    int64_t c0 = 0;
    for (; c0 + 32 <= cv; c0 += 32) {  // four independent accumulators (FMA latency)
      __m256 acc[4];
      for (int v = 0; v < 4; ++v) acc[v] = bias ? _mm256_loadu_ps(bias + c0 + 8 * v) : _mm256_setzero_ps();
      for (int t = 0; t < nt; ++t) {
        const float* wv = wt + tap[t] * g.C + c0;
        const float* xv = in + pix[t] * g.C + c0;
        for (int v = 0; v < 4; ++v) {
          acc[v] = _mm256_fmadd_ps(_mm256_loadu_ps(wv + 8 * v), _mm256_loadu_ps(xv + 8 * v), acc[v]);
        }
      }
      for (int v = 0; v < 4; ++v) _mm256_storeu_ps(o + c0 + 8 * v, acc[v]);
    }
    for (; c0 < cv; c0 += 8) {
      __m256 acc = bias ? _mm256_loadu_ps(bias + c0) : _mm256_setzero_ps();
      for (int t = 0; t < nt; ++t) {
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(wt + tap[t] * g.C + c0), _mm256_loadu_ps(in + pix[t] * g.C + c0), acc);
      }
      _mm256_storeu_ps(o + c0, acc);
    }
    for (int64_t c = cv; c < g.C; ++c) {  // the last C % 8 channels
      float acc = bias ? bias[c] : 0.0f;
      for (int t = 0; t < nt; ++t) acc = std::fma(wt[tap[t] * g.C + c], in[pix[t] * g.C + c], acc);
      o[c] = acc;
    }
  }
}

// The interior of a 3x3 row (every tap inside the input): channels outer, pixels inner, so the nine tap weights of
// a channel chunk stay in registers and each pixel costs nine input loads per chunk instead of eighteen (weight and
// input); four pixels at a time keep four FMA chains in flight. The per-pixel loop above loaded both operands for
// every tap and was load-bound (profile: its loads and FMAs on memory operands took the time).
inline void interior_taps(const NhwcGeometry& g, int64_t oy, int64_t* toff) {
  for (int64_t ky = 0; ky < 3; ++ky)
    for (int64_t kx = 0; kx < 3; ++kx) toff[ky * 3 + kx] = (oy * g.sh - g.ph + ky * g.dh) * g.W + kx * g.dw - g.pw;
}

WS_AVX512 void nhwc_interior3x3_avx512(const float* in, const float* wt, const float* bias, float* out,
                                       const NhwcGeometry& g, int64_t oy, int64_t ox0, int64_t ox1) {
  int64_t toff[9];
  interior_taps(g, oy, toff);
  const int64_t step = g.sw * g.C;  // floats between the inputs of neighbouring output pixels
  for (int64_t c0 = 0; c0 < g.C; c0 += 16) {
    const __mmask16 m = g.C - c0 >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << (g.C - c0)) - 1u);
    __m512 w[9];
#pragma GCC unroll 9
    for (int t = 0; t < 9; ++t) w[t] = _mm512_maskz_loadu_ps(m, wt + t * g.C + c0);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(m, bias + c0) : _mm512_setzero_ps();
    int64_t ox = ox0;
    if (g.sw == 1 && g.dw == 1) {  // shared input columns, as in the AVX2 form below
      for (; ox + 4 <= ox1; ox += 4) {
        __m512 a[4] = {b, b, b, b};
#pragma GCC unroll 3
        for (int ky = 0; ky < 3; ++ky) {
          const float* p = in + (ox + toff[3 * ky]) * g.C + c0;
#pragma GCC unroll 6
          for (int j = 0; j < 6; ++j) {
            const __m512 v = _mm512_maskz_loadu_ps(m, p + j * g.C);
#pragma GCC unroll 4
            for (int q = 0; q < 4; ++q)
              if (j - q >= 0 && j - q < 3) a[q] = _mm512_fmadd_ps(w[3 * ky + j - q], v, a[q]);
          }
        }
        float* o = out + ox * g.C + c0;
#pragma GCC unroll 4
        for (int q = 0; q < 4; ++q) _mm512_mask_storeu_ps(o + q * g.C, m, a[q]);
      }
    }
    for (; ox + 4 <= ox1; ox += 4) {
      __m512 a0 = b, a1 = b, a2 = b, a3 = b;
#pragma GCC unroll 9
      for (int t = 0; t < 9; ++t) {
        const float* p = in + (ox * g.sw + toff[t]) * g.C + c0;
        a0 = _mm512_fmadd_ps(w[t], _mm512_maskz_loadu_ps(m, p), a0);
        a1 = _mm512_fmadd_ps(w[t], _mm512_maskz_loadu_ps(m, p + step), a1);
        a2 = _mm512_fmadd_ps(w[t], _mm512_maskz_loadu_ps(m, p + 2 * step), a2);
        a3 = _mm512_fmadd_ps(w[t], _mm512_maskz_loadu_ps(m, p + 3 * step), a3);
      }
      float* o = out + ox * g.C + c0;
      _mm512_mask_storeu_ps(o, m, a0);
      _mm512_mask_storeu_ps(o + g.C, m, a1);
      _mm512_mask_storeu_ps(o + 2 * g.C, m, a2);
      _mm512_mask_storeu_ps(o + 3 * g.C, m, a3);
    }
    for (; ox < ox1; ++ox) {
      __m512 a = b;
#pragma GCC unroll 9
      for (int t = 0; t < 9; ++t)
        a = _mm512_fmadd_ps(w[t], _mm512_maskz_loadu_ps(m, in + (ox * g.sw + toff[t]) * g.C + c0), a);
      _mm512_mask_storeu_ps(out + ox * g.C + c0, m, a);
    }
  }
}

WS_AVX2 void nhwc_interior3x3_avx2(const float* in, const float* wt, const float* bias, float* out,
                                   const NhwcGeometry& g, int64_t oy, int64_t ox0, int64_t ox1) {
  int64_t toff[9];
  interior_taps(g, oy, toff);
  const int64_t step = g.sw * g.C;
  const int64_t cv = g.C / 8 * 8;
  for (int64_t c0 = 0; c0 < cv; c0 += 8) {  // the last C % 8 channels: the per-pixel loop's scalar tail
    __m256 w[9];
#pragma GCC unroll 9
    for (int t = 0; t < 9; ++t) w[t] = _mm256_loadu_ps(wt + t * g.C + c0);
    const __m256 b = bias ? _mm256_loadu_ps(bias + c0) : _mm256_setzero_ps();
    int64_t ox = ox0;
    if (g.sw == 1 && g.dw == 1) {
      // neighbouring pixels share input columns: 4 pixels read 6 columns per tap row, each loaded once and used by
      // every pixel it reaches (18 loads for 36 FMAs instead of 36)
      for (; ox + 4 <= ox1; ox += 4) {
        __m256 a[4] = {b, b, b, b};
#pragma GCC unroll 3
        for (int ky = 0; ky < 3; ++ky) {
          const float* p = in + (ox + toff[3 * ky]) * g.C + c0;
#pragma GCC unroll 6
          for (int j = 0; j < 6; ++j) {
            const __m256 v = _mm256_loadu_ps(p + j * g.C);
#pragma GCC unroll 4
            for (int q = 0; q < 4; ++q)
              if (j - q >= 0 && j - q < 3) a[q] = _mm256_fmadd_ps(w[3 * ky + j - q], v, a[q]);
          }
        }
        float* o = out + ox * g.C + c0;
#pragma GCC unroll 4
        for (int q = 0; q < 4; ++q) _mm256_storeu_ps(o + q * g.C, a[q]);
      }
    }
    for (; ox + 4 <= ox1; ox += 4) {
      __m256 a0 = b, a1 = b, a2 = b, a3 = b;
#pragma GCC unroll 9
      for (int t = 0; t < 9; ++t) {
        const float* p = in + (ox * g.sw + toff[t]) * g.C + c0;
        a0 = _mm256_fmadd_ps(w[t], _mm256_loadu_ps(p), a0);
        a1 = _mm256_fmadd_ps(w[t], _mm256_loadu_ps(p + step), a1);
        a2 = _mm256_fmadd_ps(w[t], _mm256_loadu_ps(p + 2 * step), a2);
        a3 = _mm256_fmadd_ps(w[t], _mm256_loadu_ps(p + 3 * step), a3);
      }
      float* o = out + ox * g.C + c0;
      _mm256_storeu_ps(o, a0);
      _mm256_storeu_ps(o + g.C, a1);
      _mm256_storeu_ps(o + 2 * g.C, a2);
      _mm256_storeu_ps(o + 3 * g.C, a3);
    }
    for (; ox < ox1; ++ox) {
      __m256 a = b;
#pragma GCC unroll 9
      for (int t = 0; t < 9; ++t) a = _mm256_fmadd_ps(w[t], _mm256_loadu_ps(in + (ox * g.sw + toff[t]) * g.C + c0), a);
      _mm256_storeu_ps(out + ox * g.C + c0, a);
    }
  }
  for (int64_t ox = ox0; ox < ox1 && cv < g.C; ++ox) {
    for (int64_t c = cv; c < g.C; ++c) {
      float a = bias ? bias[c] : 0.0f;
      for (int t = 0; t < 9; ++t) a = std::fma(wt[t * g.C + c], in[(ox * g.sw + toff[t]) * g.C + c], a);
      out[ox * g.C + c] = a;
    }
  }
}
#endif

at::Tensor depthwise_nhwc(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, const NhwcGeometry& g,
                          int64_t N) {
  // weights [C, 1, KH, KW] (fp32) -> [KH * KW, C] (a plain loop: TensorIterator's strided copy took ~3 % of the call)
  const int64_t KK = g.KH * g.KW;
  std::vector<float> wt(static_cast<size_t>(KK * g.C));
  const float* wsrc = w.data_ptr<float>();
  for (int64_t c = 0; c < g.C; ++c)
    for (int64_t t = 0; t < KK; ++t) wt[t * g.C + c] = wsrc[c * KK + t];
  at::Tensor y = at::empty({N, g.C, g.OH, g.OW}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  const float* xp = x.data_ptr<float>();
  const float* wp = wt.data();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const Simd simd = simd_level();
  // the output columns [x_lo, x_hi) whose three tap columns all fall inside the input
  const int64_t x_lo = (g.pw + g.sw - 1) / g.sw;
  const int64_t reach = g.W - 1 + g.pw - 2 * g.dw;  // need ox * sw <= reach
  const int64_t x_hi = reach < 0 ? 0 : std::min(g.OW, reach / g.sw + 1);
  const int64_t row_work = std::max<int64_t>(1, g.OW * g.C * g.KH * g.KW);
  at::parallel_for(0, N * g.OH, std::max<int64_t>(1, 16384 / row_work), [&](int64_t r0, int64_t r1) {
    std::vector<int> tap(g.KH * g.KW);
    std::vector<int64_t> pix(g.KH * g.KW);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / g.OH, oy = r % g.OH;
      const float* in = xp + n * g.H * g.W * g.C;
      float* out = yp + r * g.OW * g.C;
#ifdef WS_X86
      if (simd != Simd::Scalar) {
        // 3x3 rows whose taps all fall inside the input vertically: the interior columns by the register-weight
        // kernel, the border columns per pixel
        const bool inner_row = g.KH == 3 && g.KW == 3 && oy * g.sh - g.ph >= 0 && oy * g.sh - g.ph + 2 * g.dh < g.H;
        const int64_t lo = inner_row ? std::min(x_lo, g.OW) : g.OW, hi = inner_row ? std::max(lo, x_hi) : g.OW;
        if (simd == Simd::Avx512) {
          nhwc_row_avx512(in, wp, bp, out, g, oy, 0, lo, tap.data(), pix.data());
          if (hi > lo) nhwc_interior3x3_avx512(in, wp, bp, out, g, oy, lo, hi);
          nhwc_row_avx512(in, wp, bp, out, g, oy, hi, g.OW, tap.data(), pix.data());
        } else {
          nhwc_row_avx2(in, wp, bp, out, g, oy, 0, lo, tap.data(), pix.data());
          if (hi > lo) nhwc_interior3x3_avx2(in, wp, bp, out, g, oy, lo, hi);
          nhwc_row_avx2(in, wp, bp, out, g, oy, hi, g.OW, tap.data(), pix.data());
        }
        continue;
      }
#endif
      nhwc_row(in, wp, bp, out, g, oy, tap.data(), pix.data());
    }
  });
  return y;
}

}  // namespace

at::Tensor depthwise_conv2d_f32(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                int64_t groups) {
  // NCHW (contiguous) input, or channels-last 4-D input with one output channel per input channel
  const bool nchw = x.is_contiguous();
  const bool nhwc =
      !nchw && x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast) && w.size(0) == x.size(1);
  if (conv_kernels() == ConvKernels::Never || !x.is_cpu() || x.scalar_type() != at::kFloat || !(nchw || nhwc) ||
      w.size(1) != 1 ||
      stride.size() != 2 || padding.size() != 2 || dilation.size() != 2 || groups != x.size(-3)) {
    return at::Tensor();
  }
  const bool batched = x.dim() == 4;
  const at::Tensor x4 = batched ? x : x.unsqueeze(0);
  const int64_t N = x4.size(0), C = x4.size(1), H = x4.size(2), W = x4.size(3);
  const int64_t OC = w.size(0), KH = w.size(2), KW = w.size(3), mult = OC / C;
  const int64_t sh = stride[0], sw = stride[1], ph = padding[0], pw = padding[1], dh = dilation[0], dw = dilation[1];
  if (sh < 1 || sw < 1 || dh < 1 || dw < 1 || ph < 0 || pw < 0) return at::Tensor();  // F.conv2d reports these
  const int64_t OH = (H + 2 * ph - dh * (KH - 1) - 1) / sh + 1;
  const int64_t OW = (W + 2 * pw - dw * (KW - 1) - 1) / sw + 1;
  if (OH <= 0 || OW <= 0) return at::Tensor();
  const at::Tensor wc = w.to(at::kFloat).contiguous();
  at::Tensor b;
  if (bias.has_value() && bias->defined()) b = bias->to(at::kFloat).contiguous();
  if (nhwc) return depthwise_nhwc(x4, wc, b, NhwcGeometry{C, H, W, OH, OW, KH, KW, sh, sw, ph, pw, dh, dw}, N);
  at::Tensor y = at::empty({N, OC, OH, OW}, x.options());
  const float* xp = x4.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  Geometry g{H, W, OH, OW, KH, KW, sh, sw, ph, pw, dh, dw, {}, {}};
  for (int64_t kx = 0; kx < KW; ++kx) {
    int64_t lo, hi;
    valid_columns(W, OW, sw, pw, kx * dw, &lo, &hi);
    g.cols.emplace_back(lo, hi);
  }
  const Simd simd = sw == 1 ? simd_level() : Simd::Scalar;  // the vector paths load unit-stride rows
  if (simd != Simd::Scalar) g.build_lanes(simd == Simd::Avx512 ? 16 : 8);
  const bool bordered = simd != Simd::Scalar && zero_bordered_3x3(g);
  // one task per (sample, output channel) plane; grain so a task is at least ~16K multiply-adds
  const int64_t work = std::max<int64_t>(1, OH * OW * KH * KW);
  at::parallel_for(0, N * OC, std::max<int64_t>(1, 16384 / work), [&](int64_t p0, int64_t p1) {
    float* pad = nullptr;
    if (bordered) {
      thread_local std::vector<float> pad_buf;
      const Pad3x3 P = Pad3x3::of(g, 8);
      pad = grown(pad_buf, static_cast<size_t>(P.Hp * P.Wp));
      std::fill(pad, pad + P.Hp * P.Wp, 0.0f);  // the border; each plane then writes only the interior
    }
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n = p / OC, oc = p % OC, c = oc / mult;
      const float* in = xp + (n * C + c) * H * W;
      const float* wk = wp + oc * KH * KW;
      const float bv = bp ? bp[oc] : 0.0f;
      float* out = yp + p * OH * OW;
#ifdef WS_X86
      if (bordered) {
        plane3x3_avx2(in, wk, bv, out, g, pad);
        continue;
      }
      if (simd == Simd::Avx512) {
        plane_avx512(in, wk, bv, out, g);
        continue;
      }
      if (simd == Simd::Avx2) {
        plane_avx2(in, wk, bv, out, g);
        continue;
      }
#endif
      plane(in, wk, bv, out, H, W, OH, OW, KH, KW, sh, sw, ph, pw, dh, dw);
    }
  });
  return batched ? y : y.squeeze(0);
}

}  // namespace weightshare::cpu
