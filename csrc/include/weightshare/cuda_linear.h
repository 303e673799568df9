#pragma once
// What every CUDA shared_linear kernel file shares (shared_linear.cu, shared_linear_gemv_mma.cu): the epilogue
// that turns an accumulator into an output element (and the split-K workspace with its fixed-order finaliser),
// and the host-side launch sizing. Included by .cu files only.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>

#include <atomic>
#include <utility>

#include "weightshare/cuda_decode.h"
#include "weightshare/message.h"
#include "weightshare/cuda_utils.h"

namespace weightshare::cuda {

// ----------------------------------------------------------------------------------------------- epilogue
using OutKind = FloatKind;  // y's dtype

// How a finished accumulator becomes an output element, shared by every kernel that writes y or grad_x and by the
// split-K finaliser. float: y = acc (+ bias). int8: y = float(acc) * (scale_x * scale_w) (+ bias), rounded exactly
// as the fp32 reference (no FMA contraction).
struct Epilogue {
  void* y;
  OutKind kind;
  int64_t M, ld;          // y is [M, ld]
  const void* bias;       // [ld] or null, of bias_kind: read in its own dtype, so an fp16 model's bias needs no
  OutKind bias_kind;      // conversion kernel before a batch-1 call
  const float* sx;        // int8: [M] activation scales
  const float* sw;        // int8: [G] codebook scales
  const float* zw;        // int8: [G] codebook zero points (reference.int8_zero_points)
  const long long* xsum;  // int8: [M] sums of the quantized x rows
  int64_t rows_per_group;
  void* partial;          // [splits, M, ld] raw sums when splits > 1
  int splits;

  __device__ void store(int64_t i, float v) const {
    switch (kind) {
      case OutKind::Float: static_cast<float*>(y)[i] = v; break;
      case OutKind::Half: static_cast<__half*>(y)[i] = __float2half_rn(v); break;
      case OutKind::BFloat16: static_cast<__nv_bfloat16*>(y)[i] = __float2bfloat16_rn(v); break;
    }
  }
  __device__ float bias_at(int64_t c) const { return load_as_float(bias, bias_kind, c); }  // exact, as bias.float()
  __device__ void finish(int64_t m, int64_t c, float acc) const {
    store(m * ld + c, bias ? acc + bias_at(c) : acc);
  }
  __device__ void finish(int64_t m, int64_t c, int acc) const {
    const int64_t g = c / rows_per_group;
    float v = __fmul_rn(__int2float_rn(acc), __fmul_rn(sx[m], sw[g]));
    v = __fadd_rn(v, __fmul_rn(__fmul_rn(sx[m], zw[g]), __ll2float_rn(xsum[m])));  // the zero point's term
    if (bias) v = __fadd_rn(v, bias_at(c));
    store(m * ld + c, v);
  }
  template <typename Acc>
  __device__ void put(int split, int64_t m, int64_t c, Acc acc) const {
    if (splits == 1) {
      finish(m, c, acc);
    } else {
      static_cast<Acc*>(partial)[(split * M + m) * ld + c] = acc;
    }
  }
};

template <typename Acc>
__global__ void finalize_kernel(const Epilogue e) {
  const Acc* p = static_cast<const Acc*>(e.partial);
  const int64_t total = e.M * e.ld;
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < total; t += int64_t(gridDim.x) * blockDim.x) {
    Acc s = p[t];
    for (int k = 1; k < e.splits; ++k) s += p[k * total + t];
    e.finish(t / e.ld, t % e.ld, s);
  }
}

// ----------------------------------------------------------------------------------------------- host
// A device attribute read once per (attribute, device) and cached: cudaDeviceGetAttribute is a driver call, and
// these are asked on every op call. 0 for a device index past the cache.
template <cudaDeviceAttr kAttr>
inline int device_attribute(int device) {
  static std::atomic<int> cache[64];
  if (device < 0 || device >= 64) return 0;
  int v = cache[device].load(std::memory_order_relaxed);
  if (v == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, kAttr, device));
    cache[device].store(v, std::memory_order_relaxed);
  }
  return v;
}

// Whether a kernel's loaded device code has sm_80 instructions (the tensor-core kernels trap below sm_80, mma_ptx.h):
// a build from PTX for an older arch, JIT-compiled for a newer GPU, must not launch them (a trap poisons the CUDA
// context). Found by review, session 9. Callers cache the answer.
inline bool has_sm80_code(const void* kernel) {
  cudaFuncAttributes attr{};
  if (cudaFuncGetAttributes(&attr, kernel) != cudaSuccess) {
    (void)cudaGetLastError();  // clear the (non-sticky) error: the next launch check must not see it
    return false;
  }
  return attr.ptxVersion >= 80 && attr.binaryVersion >= 80;
}

inline int sm_count(int device) {
  const int v = device_attribute<cudaDevAttrMultiProcessorCount>(device);
  return v > 0 ? v : 132;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline bool rows_vec16(const void* p, int64_t row_bytes) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0 && row_bytes % 16 == 0;
}

inline int row_alignment(const void* p, int64_t row_bytes) {
  if (rows_vec16(p, row_bytes)) return 16;
  return reinterpret_cast<uintptr_t>(p) % 8 == 0 && row_bytes % 8 == 0 ? 8 : 4;
}

// Split-K: when `blocks` do not fill the GPU, split the `steps` of the reduction so that about two blocks per SM
// run, keeping >= min_steps per split. Returns the number of splits (none empty) and the steps of each.
inline std::pair<int, int64_t> split_k(int64_t blocks, int64_t steps, int64_t min_steps, int sms) {
  int64_t s = 1;
  if (blocks < sms) s = std::min<int64_t>({ceil_div(2 * sms, blocks), steps / min_steps, 64});
  s = std::max<int64_t>(s, 1);
  const int64_t per = ceil_div(steps, s);
  return {static_cast<int>(ceil_div(steps, per)), per};
}

inline OutKind out_kind(at::ScalarType t) {
  return t == at::kFloat ? OutKind::Float : (t == at::kHalf ? OutKind::Half : OutKind::BFloat16);
}

inline Epilogue make_epilogue(const at::Tensor& y, int64_t M, int64_t ld) {
  Epilogue e{};
  e.y = y.data_ptr();
  e.kind = out_kind(y.scalar_type());
  e.M = M;
  e.ld = ld;
  e.rows_per_group = 1;
  e.splits = 1;
  return e;
}

// Allocates the split-K workspace (stream-ordered: safe to release when the caller returns).
inline at::Tensor set_splits(Epilogue& e, int splits, bool int8, const at::Tensor& like) {
  e.splits = splits;
  if (splits == 1) return at::Tensor();
  at::Tensor ws = at::empty({splits, e.M, e.ld}, like.options().dtype(int8 ? at::kInt : at::kFloat));
  e.partial = ws.data_ptr();
  return ws;
}

inline void finalize(const Epilogue& e, bool int8) {
  if (e.splits == 1) return;
  if (int8) {
    finalize_kernel<int><<<blocks_for(e.M * e.ld), kThreads, 0, stream()>>>(e);
  } else {
    finalize_kernel<float><<<blocks_for(e.M * e.ld), kThreads, 0, stream()>>>(e);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

inline void check_grid(int64_t y, int64_t z, int64_t x = 1) {
  WS_CHECK_VALUE(x <= INT32_MAX && y <= 65535 && z <= 65535,
                    "weightshare: shared_linear is too large for one launch (grid ", x, " x ", y, " x ", z, ")");
}

}  // namespace weightshare::cuda
