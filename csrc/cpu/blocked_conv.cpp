// shared_conv2d on the CPU for images of few output pixels (late ResNet stages: 512 x 512 channels at 7x7): the
// blocked shared-weight GEMM of the batched Linear path, y^T [OC][pixels] = W [OC][C*KH*KW] x cols [C*KH*KW][pixels],
// with the im2col rows built straight in the layout that GEMM takes and its y^T rows written as NCHW output rows.
//
// Why. Where the weight outweighs the image (512 x 512 x 3 x 3 fp32 is 9.4 MB against 49 pixels x 4608 values of
// im2col), decode + oneDNN spends a quarter of its time writing the decoded weight to memory and reading it back
// (Intel VM: 0.80x dense F.conv2d); here each weight is decoded once into an L1 panel and used for every pixel from
// registers, as the Linear path does for batch rows, and the dense weight never exists.
#include "blocked_conv.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <vector>

#include "decode_scratch.h"
#include "shared_linear.h"
#include "weightshare/cpu_features.h"

namespace weightshare::cpu {
namespace {

// Where it is taken: images of at most kMaxPixels output pixels (over the batch), 1x1 layers of at most one pass
// (kBlockedMaxLanes: their im2col rows are the image's own), and at least kMinWeights weights. Intel VM, batch 1,
// two rounds each, against what ran before (decode + oneDNN, or the direct kernel where it took 1x1 layers;
// AVX-512 / AVX2): 3x3 512 x 512 at 7x7 0.80x -> 0.95x dense F.conv2d / 0.83x -> 0.98x, 128 x 128 at 7x7 0.69x ->
// 0.78x / 0.79x -> 0.97x, 192 x 192 0.71x -> 0.90x / 0.73x -> 0.99x; 1x1 2048 -> 512 at 7x7 0.75x -> 1.10x / 0.84x
// -> 1.43x, 1024 -> 256 at 14x14 0.86x -> 1.12x / 0.88x -> 1.10x, 256 -> 256 at 14x14 0.63x -> 1.14x / 0.84x ->
// 1.38x. Where it lost or tied: 3x3 at 14x14 (196 pixels: 0.86x against 0.88x; AVX2 0.81x against 0.88x), two
// 7x7 images (0.82x against 0.88x), 1x1 at 28x28 (784 pixels: the direct kernel's 1.18-1.35x), 256 -> 512 1x1 at
// 7x7 (131K weights: a tie); below 2**16 weights the fused Winograd kernel's small images stay its (64 x 64 at
// 7x7 measured 0.054 ms against 0.064 for this path before its im2col copied runs).
constexpr int64_t kMaxPixels = 64;
constexpr int64_t kMinWeights = int64_t(1) << 16;

}  // namespace

at::Tensor blocked_conv2d_f32(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& codebook,
                              const PackedWeight& pw, int64_t bits, at::IntArrayRef weight_shape,
                              const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const ConvKernels choice = conv_kernels();
  const int64_t V = blocked_lanes();
  // WS_CPU_CONV=winograd / direct force those kernels wherever they apply (cpu_features.h): this path, tried
  // before them, steps aside
  const bool other_forced = choice == ConvKernels::Winograd || choice == ConvKernels::Direct;
  if (choice == ConvKernels::Never || other_forced || V == 0 || groups != 1 || x.scalar_type() != at::kFloat ||
      !x.is_contiguous() || stride.size() != 2 || padding.size() != 2 || dilation.size() != 2) {
    return at::Tensor();
  }
  const bool batched = x.dim() == 4;
  const int64_t N = batched ? x.size(0) : 1, C = x.size(-3), H = x.size(-2), W = x.size(-1);
  const int64_t OC = weight_shape[0], KH = weight_shape[2], KW = weight_shape[3];
  const int64_t sh = stride[0], sw = stride[1], ph = padding[0], pw_ = padding[1], dh = dilation[0],
                dw = dilation[1];
  if (sh < 1 || sw < 1 || ph < 0 || pw_ < 0 || dh < 1 || dw < 1) return at::Tensor();  // F.conv2d reports these
  const int64_t OH = (H + 2 * ph - dh * (KH - 1) - 1) / sh + 1, OW = (W + 2 * pw_ - dw * (KW - 1) - 1) / sw + 1;
  if (H + 2 * ph < dh * (KH - 1) + 1 || W + 2 * pw_ < dw * (KW - 1) + 1 || N * C == 0) return at::Tensor();
  const int64_t P = OH * OW, T = N * P, K = C * KH * KW;
  const int64_t max_pixels = KH * KW == 1 ? kBlockedMaxLanes : kMaxPixels;
  if (choice != ConvKernels::Blocked && (T > max_pixels || K * OC < kMinWeights)) return at::Tensor();
  // the work buffers are reused per thread (bounded as the Linear path's: 64 MiB)
  if ((K + OC) * kBlockedMaxLanes > (int64_t(1) << 24)) return at::Tensor();

  const at::Tensor cb = codebook.to(at::kFloat).contiguous();
  const PackedLinear w = make_packed_linear(packed, cb, pw, bits);
  at::Tensor y = at::empty({N, OC, OH, OW}, x.options());
  const float* xp = x.const_data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float* bp = nullptr;
  at::Tensor b32;
  if (bias.has_value()) {
    b32 = bias->to(at::kFloat).contiguous();
    bp = b32.const_data_ptr<float>();
  }
  thread_local std::vector<float> xt_buf, yt_buf;
  float* xt = grown(xt_buf, static_cast<size_t>(K * kBlockedMaxLanes));
  float* yt = grown(yt_buf, static_cast<size_t>(OC * kBlockedMaxLanes));
  // A pass's pixels as runs along an output row: a run's taps read one input row at columns a stride apart, so
  // each im2col row is a few copies with zero edges (per-pixel bounds checks were 14 % of a 14x14 layer's profile)
  struct Run {
    int64_t j, len, n, oh, ow;
  };
  std::vector<Run> runs;
  for (int64_t t0 = 0; t0 < T; t0 += kBlockedMaxLanes) {
    const int64_t n_pix = std::min(kBlockedMaxLanes, T - t0), Mp = (n_pix + V - 1) / V * V;
    runs.clear();
    for (int64_t j = 0; j < n_pix;) {
      const int64_t t = t0 + j, p = t % P, ow = p % OW, len = std::min(OW - ow, n_pix - j);
      runs.push_back({j, len, t / P, p / OW, ow});
      j += len;
    }
    // im2col rows: cols[(c, kh, kw)][j] = x[n][c][oh sh - ph + kh dh][ow sw - pw + kw dw] (0 outside the image; 0
    // past n_pix too, where the columns are computed and dropped: stale values there could be denormals, slow in
    // the FMAs)
    at::parallel_for(0, K, 16, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t c = k / (KH * KW), kh = (k / KW) % KH, kw = k % KW;
        float* row = xt + k * Mp;
        for (const Run& r : runs) {
          float* dst = row + r.j;
          const int64_t ih = r.oh * sh - ph + kh * dh, iw0 = r.ow * sw - pw_ + kw * dw;
          if (ih < 0 || ih >= H) {
            std::fill(dst, dst + r.len, 0.0f);
            continue;
          }
          // taps e in [lo, hi) land inside the row: iw0 + e sw in [0, W)
          const int64_t lo = std::min(r.len, iw0 >= 0 ? 0 : (-iw0 + sw - 1) / sw);
          const int64_t hi = std::max(lo, std::min(r.len, iw0 >= W ? 0 : (W - 1 - iw0) / sw + 1));
          const float* src = xp + (r.n * C + c) * H * W + ih * W + iw0;
          std::fill(dst, dst + lo, 0.0f);
          if (sw == 1) {
            std::copy(src + lo, src + hi, dst + lo);
          } else {
            for (int64_t e = lo; e < hi; ++e) dst[e] = src[e * sw];
          }
          std::fill(dst + hi, dst + r.len, 0.0f);
        }
        std::fill(row + n_pix, row + Mp, 0.0f);
      }
    });
    blocked_product(w, xt, Mp, yt);
    // y^T rows -> NCHW output rows, run by run, with the bias
    at::parallel_for(0, OC, 16, [&](int64_t o0, int64_t o1) {
      for (int64_t o = o0; o < o1; ++o) {
        const float b = bp ? bp[o] : 0.0f;
        for (const Run& r : runs) {
          const float* src = yt + o * Mp + r.j;
          float* dst = yp + (r.n * OC + o) * P + r.oh * OW + r.ow;
          for (int64_t e = 0; e < r.len; ++e) dst[e] = src[e] + b;
        }
      }
    });
  }
  return batched ? y : y.squeeze(0);
}

}  // namespace weightshare::cpu
