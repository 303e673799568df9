// shared_conv2d for depthwise layers on CUDA in one launch: each block decodes the taps of the output channels it
// computes (one packed row of R S indices per channel) into shared memory, rounded to x's dtype as a dense layer of
// that dtype holds its weights, and convolves them with x in fp32 (depthwise_geometry.h). No decoded weight is
// written to memory.
//
// Why: decode + cuDNN ran depthwise 3x3 at 0.59-0.81x cuDNN on the H200 (2026-11-30; 256 channels at 28x28: 4.2 us
// against 2.5 at batch 1): the decode's launch and round trip cost more than the convolution itself, whose weight
// is 9 values a channel. Decoding them inside the conv costs nothing.
//
// Two layouts, each coalesced: NCHW, a block per (image, channel) plane, threads along the plane's outputs; and
// channels-last, a block per 32 channels x 8 pixel lanes, a warp's 32 channels of one pixel contiguous.
//
// Status: written and compiled for sm_90a (2026-12-01), its arithmetic checked on the host
// (tests/native/depthwise_conv_check.cpp). Not yet run on a GPU, so no call takes it unless asked
// (WS_CUDA_CONV=depthwise or =all; shared_conv_cuda.h).
#include <ATen/Context.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

#include "weightshare/cuda_decode.h"
#include "weightshare/cuda_linear.h"
#include "weightshare/cuda_utils.h"
#include "weightshare/depthwise_geometry.h"
#include "weightshare/dispatch.h"
#include "weightshare/packing.h"
#include "shared_conv_cuda.h"

namespace weightshare::cuda {
namespace {

struct DepthwiseArgs {
  const void* x;
  void* y;
  PackedRows w;      // O rows of R S indices, the codebook read in its own dtype (codebook_entry)
  const void* bias;  // [O] in its own dtype, or null
  FloatKind bias_kind;
  int64_t N;
  DepthwiseGeometry g;
};

// Tap t of output channel o: its codebook entry (NaN for an index >= K, as dequantize), rounded to x's dtype T.
template <typename T, int BITS>
__device__ __forceinline__ float tap_value(const DepthwiseArgs& a, int32_t o, int t) {
  const uint8_t* row = reinterpret_cast<const uint8_t*>(a.w.packed) + int64_t(o) * a.w.row_words * 4;
  return to_float(from_float<T>(codebook_entry(a.w, o / a.w.rows_per_group, unpack_one(row, t, BITS))));
}

// NCHW. grid.x: (image, output channel) planes, by stride; dynamic shared memory: R S floats.
template <typename T, int BITS>
__global__ void __launch_bounds__(256) depthwise_nchw_kernel(const DepthwiseArgs a) {
  extern __shared__ float w[];
  const DepthwiseGeometry& g = a.g;
  const int taps = g.R * g.S;
  const int32_t outputs = g.Ho * g.Wo;
  const int64_t planes = a.N * g.O;
  for (int64_t plane = blockIdx.x; plane < planes; plane += gridDim.x) {
    const int32_t o = static_cast<int32_t>(plane % g.O);
    const int64_t n = plane / g.O;
    __syncthreads();  // everyone is done with the previous plane's taps
    for (int t = threadIdx.x; t < taps; t += blockDim.x) w[t] = tap_value<T, BITS>(a, o, t);
    __syncthreads();
    const T* xp = static_cast<const T*>(a.x) + (n * g.C + depthwise_input_channel(g, o)) * int64_t(g.H) * g.W;
    T* yp = static_cast<T*>(a.y) + plane * outputs;
    const float b = a.bias != nullptr ? load_as_float(a.bias, a.bias_kind, o) : 0.0f;
    for (int32_t p = threadIdx.x; p < outputs; p += blockDim.x) {
      const int32_t oh = p / g.Wo, ow = p - oh * g.Wo;
      const float v =
          depthwise_output(g, w, oh, ow, [&](int32_t ih, int32_t iw) { return to_float(xp[ih * g.W + iw]); });
      yp[p] = from_float<T>(v + b);
    }
  }
}

constexpr int kLaneChannels = 32, kPixelLanes = 8;  // the channels-last block: 32 channels x 8 pixels

// Channels-last. grid: (pixel groups of kPixelLanes, by stride; blocks of kLaneChannels output channels); dynamic
// shared memory: kLaneChannels x (R S | 1) floats.
template <typename T, int BITS>
__global__ void __launch_bounds__(kLaneChannels * kPixelLanes) depthwise_nhwc_kernel(const DepthwiseArgs a) {
  extern __shared__ float w[];
  const DepthwiseGeometry& g = a.g;
  const int taps = g.R * g.S, pitch = taps | 1;  // an odd pitch: a warp's 32 channels read 32 different banks
  const int32_t o0 = static_cast<int32_t>(blockIdx.y) * kLaneChannels;
  for (int i = threadIdx.x; i < kLaneChannels * taps; i += blockDim.x) {
    const int32_t o = o0 + i / taps;
    if (o < g.O) w[(i / taps) * pitch + i % taps] = tap_value<T, BITS>(a, o, i % taps);
  }
  __syncthreads();  // no barrier below: threads past the last channel may leave
  const int lane = threadIdx.x % kLaneChannels, pj = threadIdx.x / kLaneChannels;
  const int32_t o = o0 + lane;
  if (o >= g.O) return;
  const int32_t c = depthwise_input_channel(g, o);
  const float* wo = w + lane * pitch;
  const float b = a.bias != nullptr ? load_as_float(a.bias, a.bias_kind, o) : 0.0f;
  const int64_t per_image = int64_t(g.Ho) * g.Wo, pixels = a.N * per_image;
  for (int64_t p = int64_t(blockIdx.x) * kPixelLanes + pj; p < pixels; p += int64_t(gridDim.x) * kPixelLanes) {
    const int64_t n = p / per_image;
    const int32_t rem = static_cast<int32_t>(p - n * per_image), oh = rem / g.Wo, ow = rem - oh * g.Wo;
    const T* xn = static_cast<const T*>(a.x) + n * g.H * g.W * int64_t(g.C);
    const float v = depthwise_output(g, wo, oh, ow, [&](int32_t ih, int32_t iw) {
      return to_float(xn[(int64_t(ih) * g.W + iw) * g.C + c]);
    });
    static_cast<T*>(a.y)[p * g.O + o] = from_float<T>(v + b);
  }
}

}  // namespace

at::Tensor depthwise_conv2d(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& codebook, int64_t bits,
                            at::IntArrayRef weight_shape, const std::optional<at::Tensor>& bias,
                            at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                            int64_t groups) {
  if (!conv_kernel_asked("depthwise") || x.dim() != 4 || x.numel() == 0 || weight_shape[1] != 1 ||
      groups != x.size(1)) {
    return {};
  }
  if (!float_dtype(x.scalar_type())) return {};
  // y's layout: x's, as cuDNN (and so the fake kernel) gives it. Without cuDNN (disabled, or bf16 before sm_80)
  // ATen's own depthwise kernel returns NCHW for channels-last x: those calls are left to it.
  const at::MemoryFormat format = x.suggest_memory_format();
  const bool last = format == at::MemoryFormat::ChannelsLast;
  if (last && (!at::globalContext().userEnabledCuDNN() ||
               (x.scalar_type() == at::kBFloat16 &&
                device_attribute<cudaDevAttrComputeCapabilityMajor>(x.get_device()) < 8))) {
    return {};
  }
  ConvShape cs{};
  if (!x.is_contiguous(format) || !conv_shape(x, weight_shape, bias, stride, padding, dilation, cs)) return {};
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t O = weight_shape[0], R = weight_shape[2], S = weight_shape[3], Ho = cs.Ho, Wo = cs.Wo;
  if (R * S > 256 || O % C != 0) return {};
  if (x.numel() > INT32_MAX || N * O * Ho * Wo > INT32_MAX || (last && ceil_div(O, kLaneChannels) > 65535)) return {};
  const DepthwiseGeometry g{static_cast<int32_t>(C), static_cast<int32_t>(H), static_cast<int32_t>(W),
                            static_cast<int32_t>(O / C), static_cast<int32_t>(O), static_cast<int32_t>(R),
                            static_cast<int32_t>(S), cs.stride_h, cs.stride_w, cs.pad_h, cs.pad_w, cs.dil_h,
                            cs.dil_w, static_cast<int32_t>(Ho), static_cast<int32_t>(Wo)};
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor rows = packed.contiguous(), cb = codebook.contiguous();
  const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor y = at::empty({N, O, Ho, Wo}, x.options().memory_format(format));
  DepthwiseArgs a{};
  a.x = x.data_ptr();
  a.y = y.data_ptr();
  a.w = PackedRows{reinterpret_cast<const uint32_t*>(rows.data_ptr<uint8_t>()), rows.size(1) / 4, 4, O, R * S,
                   O / cb.size(0), nullptr, static_cast<int>(cb.size(1)), cb.data_ptr(), out_kind(cb.scalar_type())};
  a.bias = bc.defined() ? bc.data_ptr() : nullptr;
  a.bias_kind = bc.defined() ? out_kind(bc.scalar_type()) : FloatKind::Float;
  a.N = N;
  a.g = g;
  const int taps = static_cast<int>(R * S);
  WS_DISPATCH_FLOAT(x.scalar_type(), "weightshare::shared_conv2d_depthwise", [&] {
    using T = native_t<scalar_t>;
    WS_DISPATCH_BITS(bits, BITS, [&] {
      if (last) {
        const int64_t groups_of_pixels = ceil_div(N * Ho * Wo, kPixelLanes);
        const dim3 grid(static_cast<unsigned>(std::min<int64_t>(groups_of_pixels, 8192)),
                        static_cast<unsigned>(ceil_div(O, kLaneChannels)));
        depthwise_nhwc_kernel<T, BITS><<<grid, kLaneChannels * kPixelLanes,
                                         kLaneChannels * (taps | 1) * sizeof(float), stream()>>>(a);
      } else {
        const int threads = static_cast<int>(std::min<int64_t>(256, ceil_div(Ho * Wo, 32) * 32));
        const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(N * O, 65535LL * 32));
        depthwise_nchw_kernel<T, BITS><<<blocks, threads, taps * sizeof(float), stream()>>>(a);
      }
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

}  // namespace weightshare::cuda
