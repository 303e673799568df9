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

#include "conv_gemm.h"
#include "decode_scratch.h"
#include "weightshare/cpu_features.h"

namespace weightshare::cpu {
namespace {

using namespace conv_gemm;

#ifdef WS_X86
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
  if (choice != ConvKernels::Direct) {
    const int64_t tile = (simd == Simd::Avx512 ? kNr512 * kV512 : kNr256 * kV256);
    const int64_t computed = (OH * Wp + tile - 1) / tile * tile;
    if (OH * OW * 100 < computed * 93 || K > 1024) return at::Tensor();
    // with AVX2, against oneDNN capped to AVX2 (WS_CPU_SIMD=avx2 ONEDNN_MAX_CPU_ISA=AVX2), the 4 x 24 kernel won
    // for 1x1 layers (1.00x vs decode + oneDNN's 0.88x) and lost for the 3x3 (0.86x vs 0.92x)
    if (simd == Simd::Avx2 && KH * KW > 1) return at::Tensor();
  }
  const int64_t plane = Hp * Wp, image_floats = C * plane;
  const size_t panel_floats = static_cast<size_t>(ocb * K * MR), bias_floats = static_cast<size_t>(ocb * MR);
  // the weight panels, bias and padded input in this thread's reused buffer (decode_scratch.h says why)
  thread_local std::vector<float> work;
  float* buf = grown(work, panel_floats + bias_floats + (pad ? static_cast<size_t>(N * image_floats) : 0));
  float* panels = buf;
  float* bvals = panels + panel_floats;
  float* xpad = bvals + bias_floats;
  // the offset table in its own int64 storage (carved out of the float buffer it was misaligned: UBSan)
  std::vector<int64_t> koff_buf(static_cast<size_t>(K));
  int64_t* koff = koff_buf.data();

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
    run<kMr512, kNr512, kV512>(p, N, xin, image_floats, panels, bvals, y.data_ptr<float>(),
                               block_avx512<kNr512, false>, block_avx512<kNr512, true>);
  } else {
    run<kMr256, kNr256, kV256>(p, N, xin, image_floats, panels, bvals, y.data_ptr<float>(),
                               block_avx2<kNr256, false>, block_avx2<kNr256, true>);
  }
  return batched ? y : y.squeeze(0);
#else
  return at::Tensor();
#endif
}

}  // namespace weightshare::cpu
