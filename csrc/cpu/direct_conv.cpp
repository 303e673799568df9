// Direct convolution of NCHW fp32 input as an indirect GEMM: dense (groups 1), unit stride, any kernel size,
// padding and dilation.
//
// Why not oneDNN here: on NCHW input oneDNN's fp32 convolution reorders the input into its blocked layout, runs,
// and reorders the output back, on every call; at batch 1 those reorders (and the fresh buffers they write) were a
// fifth to a third of F.conv2d's time on the ResNet 3x3 benchmark layer (1.32-1.94 ms NCHW vs 1.12-1.31 ms for the
// same conv on channels-last tensors, where nothing is reordered). This kernel reads NCHW directly and writes NCHW
// directly.
//
// The scheme: with the input planes zero-padded (copied once into Hp x Wp planes when the conv pads), output
// position (oy, ox) of a unit-stride conv reads input position q + off(c, ky, kx) where q = oy * Wp + ox and off =
// c * plane + ky * dh * Wp + kx * dw. So over "wide" output rows of Wp columns (the last Wp - OW of them are not
// outputs and are dropped at the store), every (c, ky, kx) is one contiguous input row segment, and the conv is a
// GEMM [OC x K] x [K x positions] with K = C * KH * KW whose B rows are found through an offset table. The
// micro-kernel keeps an MR x (NR vectors) block of outputs in registers (8 x 48 with AVX-512, 4 x 24 with AVX2):
// per k, NR vector loads of the input, MR broadcast weights (from a [K][MR] repacked panel), MR x NR FMAs. The
// real outputs of a vector are consecutive in the NCHW output (compaction keeps their order), so each vector is
// stored with one compress + masked store.
#include "direct_conv.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "weightshare/cpu_features.h"

namespace weightshare::cpu {
namespace {

// One call's geometry. `wide` positions per image: OH wide rows of Wp columns.
struct Plan {
  int64_t C, OC, OH, OW, Wp, plane, K, wide, out_plane, off_max;
  const int64_t* koff;  // [K]: c * plane + ky * dh * Wp + kx * dw
};

// The number of real outputs before wide position q (real outputs are stored consecutively).
inline int64_t outputs_before(const Plan& p, int64_t q) { return (q / p.Wp) * p.OW + std::min(q % p.Wp, p.OW); }

// Bit j set iff wide position q + j is a real output.
inline uint32_t real_lanes(const Plan& p, int64_t q, int lanes) {
  uint32_t m = 0;
  for (int j = 0; j < lanes; ++j) {
    const int64_t pos = q + j;
    if (pos < p.wide && pos % p.Wp < p.OW) m |= 1u << j;
  }
  return m;
}

// The per-vector facts of one tile (NR vectors starting at wide position q0).
template <int NR, int V>
struct Tile {
  uint32_t store[NR];  // real output lanes
  uint32_t load[NR];   // lanes to load: all, except near the end of the input where only real lanes are safe
  int64_t out[NR];     // output index (within a plane) of each vector's first real lane
  bool tail;           // some vector loads a subset of its lanes
  void init(const Plan& p, int64_t q0, int64_t input_end) {
    tail = false;
    // a tile is safe to load whole if its furthest read stays inside the input
    const bool whole = q0 + NR * V - 1 + p.off_max < input_end;
    for (int n = 0; n < NR; ++n) {
      const int64_t q = q0 + n * V;
      store[n] = real_lanes(p, q, V);
      load[n] = whole ? (V == 32 ? ~0u : (1u << V) - 1) : store[n];
      tail |= !whole;
      out[n] = outputs_before(p, q);
    }
  }
};

#ifdef WS_X86
constexpr int kMr512 = 8, kNr512 = 3, kV512 = 16;
constexpr int kMr256 = 4, kNr256 = 3, kV256 = 8;

// One MR x (NR x 16) block: a = the [K][MR] weight panel, x = the image's input at wide position q0, y = the output
// of the block's first channel (plane-strided), bias = MR values.
template <bool kMasked>
WS_AVX512 void block_avx512(const Plan& p, const float* a, const float* x, const float* bias, int rows,
                            const Tile<kNr512, kV512>& t, float* y) {
  __m512 acc[kMr512][kNr512];
#pragma GCC unroll 8
  for (int m = 0; m < kMr512; ++m) {
    const __m512 b = _mm512_set1_ps(bias[m]);
#pragma GCC unroll 3
    for (int n = 0; n < kNr512; ++n) acc[m][n] = b;
  }
  const __mmask16 l0 = static_cast<__mmask16>(t.load[0]), l1 = static_cast<__mmask16>(t.load[1]),
                  l2 = static_cast<__mmask16>(t.load[2]);
  for (int64_t k = 0; k < p.K; ++k) {
    const float* b = x + p.koff[k];
    const __m512 b0 = kMasked ? _mm512_maskz_loadu_ps(l0, b) : _mm512_loadu_ps(b);
    const __m512 b1 = kMasked ? _mm512_maskz_loadu_ps(l1, b + 16) : _mm512_loadu_ps(b + 16);
    const __m512 b2 = kMasked ? _mm512_maskz_loadu_ps(l2, b + 32) : _mm512_loadu_ps(b + 32);
    const float* ak = a + k * kMr512;
#pragma GCC unroll 8
    for (int m = 0; m < kMr512; ++m) {
      const __m512 w = _mm512_set1_ps(ak[m]);
      acc[m][0] = _mm512_fmadd_ps(w, b0, acc[m][0]);
      acc[m][1] = _mm512_fmadd_ps(w, b1, acc[m][1]);
      acc[m][2] = _mm512_fmadd_ps(w, b2, acc[m][2]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < kMr512; ++m) {
    if (m >= rows) break;
    float* ym = y + m * p.out_plane;
#pragma GCC unroll 3
    for (int n = 0; n < kNr512; ++n) {
      const __mmask16 s = static_cast<__mmask16>(t.store[n]);
      if (s == 0xffff) {
        _mm512_storeu_ps(ym + t.out[n], acc[m][n]);
      } else if (s != 0) {
        const __mmask16 first = static_cast<__mmask16>((1u << __builtin_popcount(s)) - 1u);
        _mm512_mask_storeu_ps(ym + t.out[n], first, _mm512_maskz_compress_ps(s, acc[m][n]));
      }
    }
  }
}

template <bool kMasked>
WS_AVX2 void block_avx2(const Plan& p, const float* a, const float* x, const float* bias, int rows,
                        const Tile<kNr256, kV256>& t, float* y) {
  alignas(32) static const int32_t bit[8] = {1, 2, 4, 8, 16, 32, 64, 128};
  const __m256i lane_bit = _mm256_load_si256(reinterpret_cast<const __m256i*>(bit));
  __m256i lm[kNr256];
  for (int n = 0; n < kNr256; ++n) {
    lm[n] = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(t.load[n])), lane_bit), lane_bit);
  }
  __m256 acc[kMr256][kNr256];
#pragma GCC unroll 4
  for (int m = 0; m < kMr256; ++m) {
    const __m256 b = _mm256_set1_ps(bias[m]);
#pragma GCC unroll 3
    for (int n = 0; n < kNr256; ++n) acc[m][n] = b;
  }
  for (int64_t k = 0; k < p.K; ++k) {
    const float* b = x + p.koff[k];
    const __m256 b0 = kMasked ? _mm256_maskload_ps(b, lm[0]) : _mm256_loadu_ps(b);
    const __m256 b1 = kMasked ? _mm256_maskload_ps(b + 8, lm[1]) : _mm256_loadu_ps(b + 8);
    const __m256 b2 = kMasked ? _mm256_maskload_ps(b + 16, lm[2]) : _mm256_loadu_ps(b + 16);
    const float* ak = a + k * kMr256;
#pragma GCC unroll 4
    for (int m = 0; m < kMr256; ++m) {
      const __m256 w = _mm256_broadcast_ss(ak + m);
      acc[m][0] = _mm256_fmadd_ps(w, b0, acc[m][0]);
      acc[m][1] = _mm256_fmadd_ps(w, b1, acc[m][1]);
      acc[m][2] = _mm256_fmadd_ps(w, b2, acc[m][2]);
    }
  }
  // fully unrolled like the k loop (a runtime-indexed accumulator would live in memory)
#pragma GCC unroll 4
  for (int m = 0; m < kMr256; ++m) {
    if (m >= rows) break;
    float* ym = y + m * p.out_plane;
#pragma GCC unroll 3
    for (int n = 0; n < kNr256; ++n) {
      const uint32_t s = t.store[n];
      if (s == 0xffu) {
        _mm256_storeu_ps(ym + t.out[n], acc[m][n]);
      } else if (s != 0) {  // no compress instruction in AVX2: the real lanes one by one
        alignas(32) float tmp[8];
        _mm256_store_ps(tmp, acc[m][n]);
        float* o = ym + t.out[n];
        for (int j = 0; j < 8; ++j)
          if (s >> j & 1u) *o++ = tmp[j];
      }
    }
  }
}

// The whole call for one SIMD level: MR x (NR x V) blocks over (image, tile, output-channel block). The loop
// keeps whichever operand is larger in place: with more weight than input (few pixels, many channels: late ResNet
// stages) consecutive blocks share a weight panel and walk the tiles, otherwise they share a tile (its input rows
// stay in cache) and walk the weight panels.
template <int MR, int NR, int V, typename Block, typename MaskedBlock>
void run(const Plan& p, int64_t N, const float* xb, int64_t image_floats, const float* panels, const float* bias,
         float* yb, Block block, MaskedBlock masked_block) {
  const int64_t tiles = (p.wide + NR * V - 1) / (NR * V);
  const int64_t ocb = (p.OC + MR - 1) / MR;
  // the tiles' lane facts, once per call: for the last image (whose tail reads must stay inside the input) and for
  // the others (which may read into the next image)
  std::vector<Tile<NR, V>> last(tiles), other(tiles);
  for (int64_t t = 0; t < tiles; ++t) {
    last[t].init(p, t * NR * V, image_floats);
    other[t].init(p, t * NR * V, 2 * image_floats);
  }
  const bool weight_major = p.OC * p.K > image_floats;
  at::parallel_for(0, N * tiles * ocb, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      int64_t img, t, b;
      if (weight_major) {
        t = i % tiles, b = (i / tiles) % ocb, img = i / (tiles * ocb);
      } else {
        b = i % ocb, t = (i / ocb) % tiles, img = i / (tiles * ocb);
      }
      const Tile<NR, V>& tile = img == N - 1 ? last[t] : other[t];
      const float* x = xb + img * image_floats + t * NR * V;
      const float* a = panels + b * p.K * MR;
      float* y = yb + (img * p.OC + b * MR) * p.out_plane;
      const int rows = static_cast<int>(std::min<int64_t>(MR, p.OC - b * MR));
      if (tile.tail) {
        masked_block(p, a, x, bias + b * MR, rows, tile, y);
      } else {
        block(p, a, x, bias + b * MR, rows, tile, y);
      }
    }
  });
}
#endif

// This thread's reused buffer (grown, never shrunk): the padded input and the weight panels are rewritten on every
// call, and fresh allocations of this size page-fault on every call (decode_scratch.h measured that cost).
float* reused_buffer(size_t floats) {
  thread_local std::vector<float> buf;
  if (buf.size() < floats) buf.resize(floats);
  return buf.data();
}

}  // namespace

at::Tensor direct_conv2d_f32(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                             at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                             int64_t groups) {
#ifdef WS_X86
  const Simd simd = simd_level();
  if (simd == Simd::Scalar || !x.is_cpu() || x.scalar_type() != at::kFloat || w.scalar_type() != at::kFloat ||
      groups != 1 || !(x.dim() == 4 || x.dim() == 3) || !x.is_contiguous() || !w.is_contiguous() || w.dim() != 4 ||
      stride.size() != 2 || padding.size() != 2 || dilation.size() != 2 || stride[0] != 1 || stride[1] != 1) {
    return at::Tensor();
  }
  const bool batched = x.dim() == 4;
  const at::Tensor x4 = batched ? x : x.unsqueeze(0);
  const int64_t N = x4.size(0), C = x4.size(1), H = x4.size(2), W = x4.size(3);
  const int64_t OC = w.size(0), KH = w.size(2), KW = w.size(3);
  const int64_t ph = padding[0], pw = padding[1], dh = dilation[0], dw = dilation[1];
  if (w.size(1) != C || ph < 0 || pw < 0 || dh < 1 || dw < 1) return at::Tensor();  // F.conv2d reports these
  const int64_t Hp = H + 2 * ph, Wp = W + 2 * pw;
  const int64_t OH = Hp - dh * (KH - 1), OW = Wp - dw * (KW - 1);
  if (OH <= 0 || OW <= 0 || N * C * Hp * Wp == 0 || OC == 0) return at::Tensor();
  // a bounded working set: beyond it (large batches) the padded copy stops fitting any cache and oneDNN's own
  // blocking is the better plan
  const bool pad = ph > 0 || pw > 0;
  if (pad && N * C * Hp * Wp > (int64_t(1) << 22)) return at::Tensor();

  const int MR = simd == Simd::Avx512 ? kMr512 : kMr256;
  const int64_t KK = KH * KW, K = C * KK, ocb = (OC + MR - 1) / MR;
  // Where it is faster. The micro-kernel computes whole tiles of wide positions, and measured against oneDNN on
  // this project's VM it runs at about 0.85x oneDNN's multiply-add rate per computed position (unaligned input
  // loads; oneDNN's blocked layout loads aligned); it wins by skipping the two reorders. So it is taken when at
  // least 93 % of the computed positions are real outputs (ResNet 3x3 at 56x56: 96 %, 1x1 at 28x28: 96 %; at
  // 14x14 the 3x3 computes 82 % useful positions and lost, 0.70x) and the weight panel of a block fits in L1
  // (K <= 1024 floats per row).
  // WS_CPU_CONV=direct takes this kernel wherever it applies, =dense never (tests and benchmarks compare them).
  const ConvKernels choice = conv_kernels();
  if (choice == ConvKernels::Never) return at::Tensor();
  if (choice == ConvKernels::Auto) {
    const int64_t tile = (simd == Simd::Avx512 ? kNr512 * kV512 : kNr256 * kV256);
    const int64_t computed = (OH * Wp + tile - 1) / tile * tile;
    if (OH * OW * 100 < computed * 93 || K > 1024) return at::Tensor();
  }
  const int64_t plane = Hp * Wp, image_floats = C * plane;
  const size_t panel_floats = static_cast<size_t>(ocb * K * MR), bias_floats = static_cast<size_t>(ocb * MR);
  float* buf = reused_buffer(panel_floats + bias_floats + (pad ? static_cast<size_t>(N * image_floats) : 0) +
                             static_cast<size_t>(K) * 2);  // + the offset table (int64 = 2 floats)
  float* panels = buf;
  float* bvals = panels + panel_floats;
  float* xpad = bvals + bias_floats;
  int64_t* koff = reinterpret_cast<int64_t*>(xpad + (pad ? N * image_floats : 0));

  // weights [OC][K] -> panels [ocb][K][MR] (rows past OC are zero), bias padded the same way
  const float* wp = w.data_ptr<float>();
  for (int64_t b = 0; b < ocb; ++b) {
    float* dst = panels + b * K * MR;
    for (int m = 0; m < MR; ++m) {
      const int64_t oc = b * MR + m;
      if (oc < OC) {
        const float* src = wp + oc * K;
        for (int64_t k = 0; k < K; ++k) dst[k * MR + m] = src[k];
      } else {
        for (int64_t k = 0; k < K; ++k) dst[k * MR + m] = 0.0f;
      }
    }
  }
  at::Tensor bf;
  if (bias.has_value() && bias->defined()) bf = bias->to(at::kFloat).contiguous();
  for (int64_t oc = 0; oc < ocb * MR; ++oc) bvals[oc] = bf.defined() && oc < OC ? bf.data_ptr<float>()[oc] : 0.0f;
  int64_t off_max = 0;
  for (int64_t c = 0; c < C; ++c)
    for (int64_t ky = 0; ky < KH; ++ky)
      for (int64_t kx = 0; kx < KW; ++kx) {
        koff[(c * KH + ky) * KW + kx] = c * plane + ky * dh * Wp + kx * dw;
        off_max = std::max(off_max, koff[(c * KH + ky) * KW + kx]);
      }

  // the input: zero-bordered copies of the planes when the conv pads, else read in place
  const float* xin = x4.data_ptr<float>();
  if (pad) {
    at::parallel_for(0, N * C, 16, [&](int64_t p0, int64_t p1) {
      for (int64_t pi = p0; pi < p1; ++pi) {
        float* dst = xpad + pi * plane;
        const float* src = xin + pi * H * W;
        std::memset(dst, 0, sizeof(float) * ph * Wp);
        for (int64_t r = 0; r < H; ++r) {
          float* row = dst + (ph + r) * Wp;
          std::memset(row, 0, sizeof(float) * pw);
          std::memcpy(row + pw, src + r * W, sizeof(float) * W);
          std::memset(row + pw + W, 0, sizeof(float) * pw);
        }
        std::memset(dst + (ph + H) * Wp, 0, sizeof(float) * ph * Wp);
      }
    });
    xin = xpad;
  }

  at::Tensor y = at::empty({N, OC, OH, OW}, x.options());
  const Plan p{C, OC, OH, OW, Wp, plane, K, OH * Wp, OH * OW, off_max, koff};
  if (simd == Simd::Avx512) {
    run<kMr512, kNr512, kV512>(p, N, xin, image_floats, panels, bvals, y.data_ptr<float>(), block_avx512<false>,
                               block_avx512<true>);
  } else {
    run<kMr256, kNr256, kV256>(p, N, xin, image_floats, panels, bvals, y.data_ptr<float>(), block_avx2<false>,
                               block_avx2<true>);
  }
  return batched ? y : y.squeeze(0);
#else
  return at::Tensor();
#endif
}

}  // namespace weightshare::cpu
