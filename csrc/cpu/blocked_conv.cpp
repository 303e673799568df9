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

// Where it is taken: at most kMaxPixels output pixels (over the batch) and at least kMinWeights weights, the
// layers whose weight outweighs their image. Intel VM, batch 1, against decode + oneDNN (AVX-512 / AVX2):
// 512 x 512 3x3 at 7x7 0.79x -> 0.89x dense F.conv2d / 0.83x -> 0.95x, 256 x 256 0.71x -> 0.90x / 0.71x -> 0.97x,
// 1x1 2048 -> 512 0.79x -> 1.04x / 0.81x -> 1.34x, 3x3 256 -> 512 stride 2 from 14x14 0.81x -> 0.99x / 0.76x ->
// 1.06x, 512 x 512 at 4x4 0.59x -> 0.90x. With more pixels it lost (196: 0.66x against 0.86x; 98-100: 0.76x
// against 0.83-0.87x with AVX-512), and with small weights (128 x 128 and 64 x 64 at 7x7) it only tied decode +
// oneDNN and lost to the fused Winograd kernel (0.064 against 0.054 ms at 64 x 64). Near the weight bound, two
// rounds: with AVX2 it won from 2**18 weights (1x1 512 -> 512 at 7x7 1.19x against 0.79x dense, 3x3 128 -> 256
// 0.90x against 0.80x) and lost below (1x1 256 -> 512: 0.53x against 0.80x); with AVX-512 it lost at 2**18-2**19
// (0.70-0.79x against 0.74-0.82x).
constexpr int64_t kMaxPixels = 64;
constexpr int64_t kMinWeightsAvx2 = int64_t(1) << 18, kMinWeightsAvx512 = int64_t(1) << 19;

}  // namespace

at::Tensor blocked_conv2d_f32(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& codebook,
                              const PackedWeight& pw, int64_t bits, at::IntArrayRef weight_shape,
                              const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const ConvKernels choice = conv_kernels();
  const int64_t V = blocked_lanes();
  if (choice == ConvKernels::Never || V == 0 || groups != 1 || x.scalar_type() != at::kFloat ||
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
  const int64_t min_weights = V == 16 ? kMinWeightsAvx512 : kMinWeightsAvx2;
  if (choice != ConvKernels::Blocked && (T > kMaxPixels || K * OC < min_weights)) return at::Tensor();
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
  thread_local std::vector<int64_t> pix_buf;
  float* xt = grown(xt_buf, static_cast<size_t>(K * kBlockedMaxLanes));
  float* yt = grown(yt_buf, static_cast<size_t>(OC * kBlockedMaxLanes));
  int64_t* pix = grown(pix_buf, static_cast<size_t>(3 * kBlockedMaxLanes));
  for (int64_t t0 = 0; t0 < T; t0 += kBlockedMaxLanes) {
    const int64_t n_pix = std::min(kBlockedMaxLanes, T - t0), Mp = (n_pix + V - 1) / V * V;
    // pixel j of the pass: its image's offset and the input row / column of its window's top-left tap
    int64_t *img = pix, *ih0 = pix + kBlockedMaxLanes, *iw0 = pix + 2 * kBlockedMaxLanes;
    for (int64_t j = 0; j < n_pix; ++j) {
      const int64_t t = t0 + j, n = t / P, p = t % P;
      img[j] = n * C * H * W;
      ih0[j] = (p / OW) * sh - ph;
      iw0[j] = (p % OW) * sw - pw_;
    }
    // im2col rows: cols[(c, kh, kw)][j] = x[n][c][ih0 + kh dh][iw0 + kw dw] (0 outside the image; 0 past n_pix
    // too, where the columns are computed and dropped: stale values there could be denormals, slow in the FMAs)
    at::parallel_for(0, K, 16, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t c = k / (KH * KW), kh = (k / KW) % KH, kw = k % KW;
        const float* plane = xp + c * H * W;
        float* row = xt + k * Mp;
        for (int64_t j = 0; j < n_pix; ++j) {
          const int64_t ih = ih0[j] + kh * dh, iw = iw0[j] + kw * dw;
          row[j] = (ih >= 0 && ih < H && iw >= 0 && iw < W) ? plane[img[j] + ih * W + iw] : 0.0f;
        }
        std::fill(row + n_pix, row + Mp, 0.0f);
      }
    });
    blocked_product(w, xt, Mp, yt);
    // y^T rows -> NCHW output rows, with the bias
    at::parallel_for(0, OC, 16, [&](int64_t o0, int64_t o1) {
      for (int64_t o = o0; o < o1; ++o) {
        const float b = bp ? bp[o] : 0.0f;
        const float* src = yt + o * Mp;
        for (int64_t j = 0; j < n_pix; ++j) {
          const int64_t t = t0 + j;
          yp[((t / P) * OC + o) * P + t % P] = src[j] + b;
        }
      }
    });
  }
  return batched ? y : y.squeeze(0);
}

}  // namespace weightshare::cpu
