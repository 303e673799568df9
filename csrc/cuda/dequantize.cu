// CUDA dequantize: packed indices [R, packed_row_bytes(n, bits)] + codebook [G, K] -> dense weight in the codebook's
// dtype. Each thread decodes 8 consecutive indices of a row (the words that hold them loaded together, LaneSpan's
// arithmetic with the thread's group number for the lane) and writes their 8 entries, 16 bytes at a time where
// the rows allow, so a warp's stores are one contiguous run; rows along grid.y. An index >= K reads NaN, as
// reference.dequantize does. Used by shared_conv2d (decode, then cuDNN) and as a reference helper.
// The first form, a thread per element with a 64-bit division and a byte load each, cost a ResNet-18 3x3 512x512
// conv about 16 us on the H200 (2026-11-30: 43 us against cuDNN's 27 at batch 1); this form is compiled, not yet run.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

#include "weightshare/checks.h"
#include "weightshare/cuda_decode.h"
#include "weightshare/cuda_utils.h"
#include "weightshare/dispatch.h"
#include "weightshare/packing.h"

namespace weightshare {
namespace {

template <typename C> __device__ __forceinline__ C quiet_nan();
template <> __device__ __forceinline__ float quiet_nan<float>() { return __uint_as_float(0x7fc00000u); }
template <> __device__ __forceinline__ __half quiet_nan<__half>() { return __ushort_as_half(0x7e00); }
template <> __device__ __forceinline__ __nv_bfloat16 quiet_nan<__nv_bfloat16>() {
  return __ushort_as_bfloat16(0x7fc0);
}

template <typename C>
__device__ __forceinline__ uint4 pack16_entries(const C* v) {
  uint4 u;
  memcpy(&u, v, 16);
  return u;
}

// grid: (ceil(ceil(n / 8) / 256), min(rows, 65535)); rows beyond grid.y by stride.
template <typename C, int BITS>
__global__ void __launch_bounds__(256) dequantize_kernel(const uint8_t* __restrict__ packed,
                                                         const C* __restrict__ codebook, C* __restrict__ out,
                                                         int64_t rows, int64_t n, int64_t row_bytes,
                                                         int64_t rows_per_group, int K, bool vec16) {
  using L = LaneSpan<BITS>;
  const int64_t g8 = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;  // this thread's group of 8 indices
  const int64_t k0 = 8 * g8;
  if (k0 >= n) return;
  const int64_t row_words = row_bytes / 4;
  const int64_t q = L::first_word(g8);  // LaneSpan's formulas hold for any group number, not only lanes 0-31
  const int shift = L::shift(g8);
  const int valid = n - k0 < 8 ? static_cast<int>(n - k0) : 8;
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const uint32_t* row = reinterpret_cast<const uint32_t*>(packed + r * row_bytes);
    uint32_t w[L::kLoad], v[L::kWords];
#pragma unroll
    for (int i = 0; i < L::kLoad; ++i) w[i] = q + i < row_words ? __ldg(row + q + i) : 0u;
    L::align(w, shift, v);
    const C* cb = codebook + (r / rows_per_group) * K;
    C e[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const uint32_t idx = field_at<BITS, 0>(v, j);
      e[j] = idx < static_cast<uint32_t>(K) ? cb[idx] : quiet_nan<C>();
    }
    C* o = out + r * n + k0;
    if (vec16 && valid == 8) {
#pragma unroll
      for (int h = 0; h < 8 * int(sizeof(C)) / 16; ++h) {
        reinterpret_cast<uint4*>(o)[h] = pack16_entries(e + h * (16 / int(sizeof(C))));
      }
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        if (j < valid) o[j] = e[j];  // constant indices: e stays in registers
      }
    }
  }
}

at::Tensor dequantize_cuda(const at::Tensor& packed, const at::Tensor& codebook, int64_t bits, at::IntArrayRef shape) {
  const PackedWeight pw = check_dequantize(packed, codebook, bits, shape);
  const c10::cuda::CUDAGuard guard(packed.device());
  at::Tensor out = at::empty(shape, codebook.options());
  // 16-byte stores when every row of the output starts 16-byte aligned
  const bool vec16 = (pw.cols * out.element_size()) % 16 == 0 && reinterpret_cast<uintptr_t>(out.data_ptr()) % 16 == 0;
  const dim3 grid(static_cast<unsigned>((pw.cols + 8 * 256 - 1) / (8 * 256)),
                  static_cast<unsigned>(std::min<int64_t>(pw.rows, 65535)));
  WS_DISPATCH_FLOAT(codebook.scalar_type(), "weightshare::dequantize_cuda", [&] {
    using C = cuda::native_t<scalar_t>;
    WS_DISPATCH_BITS(bits, BITS, [&] {
      dequantize_kernel<C, BITS><<<grid, 256, 0, cuda::stream()>>>(
          packed.data_ptr<uint8_t>(), reinterpret_cast<const C*>(codebook.data_ptr<scalar_t>()),
          reinterpret_cast<C*>(out.data_ptr<scalar_t>()), pw.rows, pw.cols, pw.row_bytes, pw.rows / pw.groups,
          static_cast<int>(pw.K), vec16);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(weightshare, CUDA, m) { m.impl("dequantize", &dequantize_cuda); }

}  // namespace weightshare
