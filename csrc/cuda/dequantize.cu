// CUDA dequantize: packed indices [R, packed_row_bytes(n, bits)] + codebook [G, K] -> dense weight in the codebook's
// dtype. One thread per output element (coalesced stores; the output is 2-8x the bytes of everything read): it
// decodes its index with unpack_one (packing.h, the same code as the CPU) and reads the entry of its row's group;
// an index >= K reads NaN, as reference.dequantize does. A reference/autograd helper: the shared-weight kernels
// never materialise the dense weight.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

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

template <typename C, int BITS>
__global__ void dequantize_kernel(const uint8_t* __restrict__ packed, const C* __restrict__ codebook,
                                  C* __restrict__ out, int64_t rows, int64_t n, int64_t row_bytes,
                                  int64_t rows_per_group, int K) {
  const int64_t total = rows * n;
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < total; t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = t / n, i = t - r * n;
    const uint32_t idx = unpack_one(packed + r * row_bytes, i, BITS);
    out[t] = idx < static_cast<uint32_t>(K) ? codebook[(r / rows_per_group) * K + idx] : quiet_nan<C>();
  }
}

at::Tensor dequantize_cuda(const at::Tensor& packed, const at::Tensor& codebook, int64_t bits, at::IntArrayRef shape) {
  const PackedWeight pw = check_dequantize(packed, codebook, bits, shape);
  const c10::cuda::CUDAGuard guard(packed.device());
  at::Tensor out = at::empty(shape, codebook.options());
  const int64_t total = pw.rows * pw.cols;
  WS_DISPATCH_FLOAT(codebook.scalar_type(), "weightshare::dequantize_cuda", [&] {
    using C = cuda::native_t<scalar_t>;
    WS_DISPATCH_BITS(bits, BITS, [&] {
      dequantize_kernel<C, BITS><<<cuda::blocks_for(total), cuda::kThreads, 0, cuda::stream()>>>(
          packed.data_ptr<uint8_t>(), reinterpret_cast<const C*>(codebook.data_ptr<scalar_t>()),
          reinterpret_cast<C*>(out.data_ptr<scalar_t>()), pw.rows, pw.cols, pw.row_bytes, pw.rows / pw.groups,
          static_cast<int>(pw.K));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(weightshare, CUDA, m) { m.impl("dequantize", &dequantize_cuda); }

}  // namespace weightshare
