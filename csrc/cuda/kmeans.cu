// CUDA Lloyd statistics (kmeans_step): one block per tile of up to kTile weights inside one group accumulates
// the three per-entry sums in shared-memory float64, then adds them to the float64 output with global atomics.
// (Atomics make the last bits depend on the order of arrival; the CPU kernel is the bit-reproducible one.)
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include "weightshare/checks.h"
#include "weightshare/cuda_utils.h"
#include "weightshare/dispatch.h"

namespace weightshare {
namespace {

constexpr int64_t kTile = 16384;

template <typename T>
__device__ __forceinline__ double to_d(T x) { return static_cast<double>(static_cast<float>(x)); }

template <typename T>
__global__ void kmeans_step_kernel(const T* __restrict__ w, const uint8_t* __restrict__ idx,
                                   const float* __restrict__ h,
                                   int K, int64_t group_numel, int64_t tiles_per_group, int64_t G,
                                   double* __restrict__ sums, double* __restrict__ weights,
                                   double* __restrict__ sqsums, int* error) {
  extern __shared__ double s_acc[];  // [3, K]
  for (int j = threadIdx.x; j < 3 * K; j += blockDim.x) s_acc[j] = 0.0;
  __syncthreads();
  const int64_t g = blockIdx.x / tiles_per_group, tile = blockIdx.x % tiles_per_group;
  const int64_t start = g * group_numel + tile * kTile;
  const int64_t stop = g * group_numel + min(group_numel, (tile + 1) * kTile);
  bool bad = false;
  for (int64_t i = start + threadIdx.x; i < stop; i += blockDim.x) {
    const int j = idx[i];
    if (j >= K) {
      bad = true;
      continue;
    }
    const double x = to_d(w[i]);
    const double hi = h ? static_cast<double>(h[i]) : 1.0;
    atomicAdd(&s_acc[j], hi * x);
    atomicAdd(&s_acc[K + j], hi);
    atomicAdd(&s_acc[2 * K + j], hi * x * x);
  }
  if (bad) atomicOr(error, 1);
  __syncthreads();
  double* out[3] = {sums, weights, sqsums};
  for (int j = threadIdx.x; j < 3 * K; j += blockDim.x) {
    const int q = j / K, e = j % K;
    if (s_acc[j] != 0.0) atomicAdd(&out[q][g * K + e], s_acc[j]);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kmeans_step_cuda(const at::Tensor& w, const at::Tensor& idx, int64_t k,
                                                                const std::optional<at::Tensor>& importance,
                                                                int64_t groups) {
  const Grouping gr = check_kmeans_step(w, idx, k, importance, groups);
  const c10::cuda::CUDAGuard guard(w.device());
  const int K = static_cast<int>(k);
  const int64_t tiles = (gr.group_numel + kTile - 1) / kTile;
  WS_CHECK(gr.groups * tiles <= INT32_MAX, "weightshare: kmeans_step: too many tiles for one launch");
  const auto opts = w.options().dtype(at::kDouble);  // three separate outputs: the schema promises no aliasing
  at::Tensor out[3] = {at::zeros({gr.groups, K}, opts), at::zeros({gr.groups, K}, opts),
                       at::zeros({gr.groups, K}, opts)};
  // fp32 whatever w's dtype, as the CPU path and the reference read it
  const at::Tensor h = importance.has_value() ? importance->to(at::kFloat).contiguous() : at::Tensor();
  cuda::ErrorFlag error(w);
  WS_DISPATCH_FLOAT(w.scalar_type(), "weightshare::kmeans_step_cuda", [&] {
    kmeans_step_kernel<scalar_t><<<static_cast<unsigned>(gr.groups * tiles), cuda::kThreads,
                                   3 * K * sizeof(double), cuda::stream()>>>(
        w.data_ptr<scalar_t>(), idx.data_ptr<uint8_t>(), h.defined() ? h.data_ptr<float>() : nullptr, K,
        gr.group_numel, tiles, gr.groups, out[0].data_ptr<double>(), out[1].data_ptr<double>(),
        out[2].data_ptr<double>(), error.ptr());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  error.check("idx holds a value >= k = " + std::to_string(k));
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(weightshare, CUDA, m) { m.impl("kmeans_step", &kmeans_step_cuda); }

}  // namespace weightshare
