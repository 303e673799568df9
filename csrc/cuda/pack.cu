// CUDA pack/unpack over the layout in packing.h: one thread per packed 32-bit word (pack), one per index (unpack).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "weightshare/checks.h"
#include "weightshare/cuda_utils.h"
#include "weightshare/dispatch.h"
#include "weightshare/packing.h"

namespace weightshare {
namespace {

template <int BITS>
__global__ void pack_kernel(const uint8_t* __restrict__ idx, uint32_t* __restrict__ out, int64_t rows, int64_t n,
                            int64_t words, int* error) {
  bool bad = false;
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < rows * words;
       t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = t / words, w = t - r * words;
    out[t] = pack_word(idx + r * n, n, BITS, w, &bad);  // device is little-endian: word = its 4 bytes in order
  }
  if (bad) atomicOr(error, 1);
}

template <int BITS>
__global__ void unpack_kernel(const uint8_t* __restrict__ packed, uint8_t* __restrict__ out, int64_t rows, int64_t n,
                              int64_t row_bytes) {
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < rows * n;
       t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = t / n, i = t - r * n;
    out[t] = static_cast<uint8_t>(unpack_one(packed + r * row_bytes, i, BITS));
  }
}

at::Tensor pack_cuda(const at::Tensor& idx, int64_t bits) {
  check_pack(idx, bits);
  const c10::cuda::CUDAGuard guard(idx.device());
  const int64_t n = idx.size(-1);
  const int64_t rows = idx.numel() / n;
  const int64_t words = packed_row_words(n, static_cast<int>(bits));
  auto sizes = idx.sizes().vec();
  sizes.back() = words * 4;
  at::Tensor out = at::empty(sizes, idx.options());  // fresh allocation: 4-byte aligned for the word stores
  cuda::ErrorFlag error(idx);
  WS_DISPATCH_BITS(bits, BITS, [&] {
    pack_kernel<BITS><<<cuda::blocks_for(rows * words), cuda::kThreads, 0, cuda::stream()>>>(
        idx.data_ptr<uint8_t>(), reinterpret_cast<uint32_t*>(out.data_ptr<uint8_t>()), rows, n, words, error.ptr());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  error.check("idx holds a value >= 2**bits = " + std::to_string(1 << bits) + "; it cannot be packed in " +
              std::to_string(bits) + " bits");
  return out;
}

at::Tensor unpack_cuda(const at::Tensor& packed, int64_t bits, int64_t n) {
  check_unpack(packed, bits, n);
  const c10::cuda::CUDAGuard guard(packed.device());
  const int64_t row_bytes = packed.size(-1);
  const int64_t rows = packed.numel() / row_bytes;
  auto sizes = packed.sizes().vec();
  sizes.back() = n;
  at::Tensor out = at::empty(sizes, packed.options());
  WS_DISPATCH_BITS(bits, BITS, [&] {
    unpack_kernel<BITS><<<cuda::blocks_for(rows * n), cuda::kThreads, 0, cuda::stream()>>>(
        packed.data_ptr<uint8_t>(), out.data_ptr<uint8_t>(), rows, n, row_bytes);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(weightshare, CUDA, m) {
  m.impl("pack", &pack_cuda);
  m.impl("unpack", &unpack_cuda);
}

}  // namespace weightshare
