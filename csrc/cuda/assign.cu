// CUDA nearest-entry assignment and loss-aware assignment.
//
// assign: a table kernel builds each group's search table (search_table.h, one thread per group, the same code
// as the CPU), then a streaming kernel reads 8 weights per thread with 16/32-byte loads, binary-searches the
// thresholds (shared memory for a per-layer codebook), and writes 8 index bytes with one 8-byte store.
// loss_aware_assign: one weight per thread, a loop over the K entries held in shared memory (per-layer codebook)
// or read from global memory (per-row codebooks, cached in L1), rounding exactly as the fp32 reference.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include "weightshare/checks.h"
#include "weightshare/cuda_utils.h"
#include "weightshare/dispatch.h"
#include "weightshare/search_table.h"

namespace weightshare {
namespace {

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(c10::Half x) { return __half2float(*reinterpret_cast<const __half*>(&x)); }
__device__ __forceinline__ float to_f(c10::BFloat16 x) {
  return __bfloat162float(*reinterpret_cast<const __nv_bfloat16*>(&x));
}

// Loads 8 consecutive weights (16-byte aligned) as floats.
template <typename T>
__device__ __forceinline__ void load8(const T* p, float* out) {
  static_assert(sizeof(T) == 2 || sizeof(T) == 4, "fp32/fp16/bf16 only");
  if constexpr (sizeof(T) == 4) {
    const float4 a = reinterpret_cast<const float4*>(p)[0];
    const float4 b = reinterpret_cast<const float4*>(p)[1];
    out[0] = a.x; out[1] = a.y; out[2] = a.z; out[3] = a.w;
    out[4] = b.x; out[5] = b.y; out[6] = b.z; out[7] = b.w;
  } else {
    const uint4 v = *reinterpret_cast<const uint4*>(p);
    const T* h = reinterpret_cast<const T*>(&v);
#pragma unroll
    for (int q = 0; q < 8; ++q) out[q] = to_f(h[q]);
  }
}

__global__ void build_tables_kernel(const float* __restrict__ c, int64_t G, int K, int P, float* thr, uint8_t* order,
                                    float* value, int* error) {
  const int64_t g = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (g >= G) return;
  const int stride = P > 1 ? P - 1 : 1;
  if (build_search_table(c + g * K, K, thr + g * stride, order + g * P, value + g * P) < 0) atomicOr(error, 1);
}

// Sorted position -> original index, for 8 weights; sets `nan` for NaN weights.
template <int P>
__device__ __forceinline__ void search8(const float* thr, const uint8_t* order, const float* x, uint8_t* idx,
                                        bool& nan) {
#pragma unroll
  for (int q = 0; q < 8; ++q) {
    nan |= x[q] != x[q];
    idx[q] = order[search_position(thr, P, x[q])];
  }
}

// One thread: weights [8c, 8c+8). vec = the whole tensor is 16-byte aligned and a multiple of 8 long, and every
// chunk of 8 lies in one group (group_numel % 8 == 0), so chunks are loaded and stored whole.
template <typename T, int P, bool SHARED_TABLE>
__global__ void assign_kernel(const T* __restrict__ w, uint8_t* __restrict__ out, int64_t numel, int64_t group_numel,
                              const float* __restrict__ thr_all, const uint8_t* __restrict__ order_all, bool vec,
                              int* error) {
  constexpr int S = P > 1 ? P - 1 : 1;
  __shared__ float s_thr[S];
  __shared__ uint8_t s_order[P];
  if constexpr (SHARED_TABLE) {
    for (int j = threadIdx.x; j < S; j += blockDim.x) s_thr[j] = thr_all[j];
    for (int j = threadIdx.x; j < P; j += blockDim.x) s_order[j] = order_all[j];
    __syncthreads();
  }
  bool nan = false;
  const int64_t chunks = (numel + 7) / 8;
  for (int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; c < chunks; c += int64_t(gridDim.x) * blockDim.x) {
    const int64_t base = c * 8;
    if (vec) {
      const int64_t g = SHARED_TABLE ? 0 : base / group_numel;
      const float* thr = SHARED_TABLE ? s_thr : thr_all + g * S;
      const uint8_t* order = SHARED_TABLE ? s_order : order_all + g * P;
      float x[8];
      load8(w + base, x);
      alignas(8) uint8_t idx[8];  // read as uint2
      search8<P>(thr, order, x, idx, nan);
      *reinterpret_cast<uint2*>(out + base) = *reinterpret_cast<const uint2*>(idx);
    } else {
      for (int64_t i = base; i < base + 8 && i < numel; ++i) {
        const int64_t g = SHARED_TABLE ? 0 : i / group_numel;
        const float* thr = SHARED_TABLE ? s_thr : thr_all + g * S;
        const uint8_t* order = SHARED_TABLE ? s_order : order_all + g * P;
        const float x = to_f(w[i]);
        nan |= x != x;
        out[i] = order[search_position(thr, P, x)];
      }
    }
  }
  if (nan) atomicOr(error, 1);
}

at::Tensor assign_cuda(const at::Tensor& w, const at::Tensor& codebook) {
  const Grouping gr = check_assign(w, codebook);
  const c10::cuda::CUDAGuard guard(w.device());
  const at::Tensor cb = codebook.to(at::kFloat).contiguous();
  const int K = static_cast<int>(cb.size(1));
  const int P = next_pow2(K);
  const int64_t G = gr.groups;
  at::Tensor thr = at::empty({G, P > 1 ? P - 1 : 1}, cb.options());
  at::Tensor order = at::empty({G, P}, cb.options().dtype(at::kByte));
  at::Tensor value = at::empty({G, P}, cb.options());
  cuda::ErrorFlag table_error(w), nan_error(w);
  build_tables_kernel<<<cuda::blocks_for(G, 128), 128, 0, cuda::stream()>>>(
      cb.data_ptr<float>(), G, K, P, thr.data_ptr<float>(), order.data_ptr<uint8_t>(), value.data_ptr<float>(),
      table_error.ptr());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor out = at::empty(w.sizes(), w.options().dtype(at::kByte));
  const bool vec = reinterpret_cast<uintptr_t>(w.data_ptr()) % 16 == 0 && gr.numel % 8 == 0 &&
                   gr.group_numel % 8 == 0;
  WS_DISPATCH_FLOAT(w.scalar_type(), "weightshare::assign_cuda", [&] {
    WS_DISPATCH_POW2(P, PP, [&] {
      const auto* x = w.data_ptr<scalar_t>();
      const int blocks = cuda::blocks_for((gr.numel + 7) / 8);
      if (G == 1) {
        assign_kernel<scalar_t, PP, true><<<blocks, cuda::kThreads, 0, cuda::stream()>>>(
            x, out.data_ptr<uint8_t>(), gr.numel, gr.group_numel, thr.data_ptr<float>(), order.data_ptr<uint8_t>(),
            vec, nan_error.ptr());
      } else {
        assign_kernel<scalar_t, PP, false><<<blocks, cuda::kThreads, 0, cuda::stream()>>>(
            x, out.data_ptr<uint8_t>(), gr.numel, gr.group_numel, thr.data_ptr<float>(), order.data_ptr<uint8_t>(),
            vec, nan_error.ptr());
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  table_error.check("codebook contains NaN or Inf; codebook entries must be finite");
  nan_error.check("w contains NaN; NaN weights have no nearest codebook entry");
  return out;
}

// ---------------------------------------------------------------------------------------------------------------

template <typename T, bool SHARED_TABLE>
__global__ void loss_aware_kernel(const T* __restrict__ w, const float* __restrict__ grad,
                                  const float* __restrict__ hdiag,
                                  const float* __restrict__ c_all, const float* __restrict__ p_all, int K,
                                  int64_t numel, int64_t group_numel, uint8_t* __restrict__ out, int* error) {
  extern __shared__ float s_table[];  // [2K]: codebook then penalty, for a per-layer codebook
  if constexpr (SHARED_TABLE) {
    for (int j = threadIdx.x; j < K; j += blockDim.x) {
      s_table[j] = c_all[j];
      s_table[K + j] = p_all[j];
    }
    __syncthreads();
  }
  bool bad = false;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < numel; i += int64_t(gridDim.x) * blockDim.x) {
    const float* c = SHARED_TABLE ? s_table : c_all + (i / group_numel) * K;
    const float* p = SHARED_TABLE ? s_table + K : p_all + (i / group_numel) * K;
    const float x = to_f(w[i]);
    const float g = grad ? grad[i] : 0.0f;
    const float hh = __fmul_rn(0.5f, hdiag[i]);
    bad |= !(is_finite_f(x) && is_finite_f(g) && is_finite_f(hh));
    float best = 0.0f;
    int arg = 0;
    for (int j = 0; j < K; ++j) {
      const float d = __fsub_rn(c[j], x);
      const float obj = __fadd_rn(__fmul_rn(__fadd_rn(__fmul_rn(hh, d), g), d), p[j]);
      if (j == 0 || obj < best) {
        best = obj;
        arg = j;
      }
    }
    out[i] = static_cast<uint8_t>(arg);
  }
  if (bad) atomicOr(error, 1);
}

__global__ void check_tables_kernel(const float* c, const float* p, int64_t n, int* error) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    if (!is_finite_f(c[i])) atomicOr(error, 1);
    if (p[i] != p[i] || p[i] == -INFINITY) atomicOr(error, 2);
  }
}

at::Tensor loss_aware_assign_cuda(const at::Tensor& w, const std::optional<at::Tensor>& grad,
                                  const at::Tensor& hdiag, const at::Tensor& codebook,
                                  const std::optional<at::Tensor>& penalty) {
  const Grouping gr = check_loss_aware_assign(w, grad, hdiag, codebook, penalty);
  const c10::cuda::CUDAGuard guard(w.device());
  const at::Tensor c = codebook.to(at::kFloat).contiguous();
  const at::Tensor p = penalty.has_value() ? penalty->to(at::kFloat).contiguous() : at::zeros_like(c);
  // fp32 whatever w's dtype, as the CPU path and the reference read them
  const at::Tensor g = grad.has_value() ? grad->to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor h = hdiag.to(at::kFloat).contiguous();
  const int K = static_cast<int>(c.size(1));
  cuda::ErrorFlag table_error(w), value_error(w);
  check_tables_kernel<<<cuda::blocks_for(c.numel()), cuda::kThreads, 0, cuda::stream()>>>(
      c.data_ptr<float>(), p.data_ptr<float>(), c.numel(), table_error.ptr());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor out = at::empty(w.sizes(), w.options().dtype(at::kByte));
  WS_DISPATCH_FLOAT(w.scalar_type(), "weightshare::loss_aware_assign_cuda", [&] {
    const float* gp = g.defined() ? g.data_ptr<float>() : nullptr;
    const int blocks = cuda::blocks_for(gr.numel);
    if (gr.groups == 1) {
      loss_aware_kernel<scalar_t, true><<<blocks, cuda::kThreads, 2 * K * sizeof(float), cuda::stream()>>>(
          w.data_ptr<scalar_t>(), gp, h.data_ptr<float>(), c.data_ptr<float>(), p.data_ptr<float>(), K, gr.numel,
          gr.group_numel, out.data_ptr<uint8_t>(), value_error.ptr());
    } else {
      loss_aware_kernel<scalar_t, false><<<blocks, cuda::kThreads, 0, cuda::stream()>>>(
          w.data_ptr<scalar_t>(), gp, h.data_ptr<float>(), c.data_ptr<float>(), p.data_ptr<float>(), K, gr.numel,
          gr.group_numel, out.data_ptr<uint8_t>(), value_error.ptr());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const int te = table_error.value();
  if (te & 1) fail_value("codebook contains NaN or Inf; codebook entries must be finite");
  if (te & 2) fail_value("penalty contains NaN or -Inf; use +inf to forbid an entry");
  value_error.check("w, grad or hdiag contains NaN or Inf; the loss-change model needs finite values");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(weightshare, CUDA, m) {
  m.impl("assign", &assign_cuda);
  m.impl("loss_aware_assign", &loss_aware_assign_cuda);
}

}  // namespace weightshare
