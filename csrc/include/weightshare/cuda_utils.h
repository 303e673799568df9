#pragma once
// Shared CUDA plumbing: launch sizing on the current stream, and a device-side error flag that kernels raise
// when the data is bad (NaN weight, index out of range) and the host turns into a clear Python exception.
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <string>

#include "weightshare/checks.h"

namespace weightshare::cuda {

constexpr int kThreads = 256;

// Blocks for a grid-stride loop over `work` items: enough to fill the device, never more than needed.
inline int blocks_for(int64_t work, int threads = kThreads) {
  const int64_t needed = (work + threads - 1) / threads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(needed, 65535LL * 8)));
}

inline cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }

// Whether the current stream is being captured into a CUDA graph.
inline bool capturing() {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream(), &status));
  return status != cudaStreamCaptureStatusNone;
}

// One int32 on the device; kernels atomicOr bits into it. value() copies it back (one synchronising 4-byte read;
// these ops validate data they cannot check without reading it) and check() raises `message` if it is set.
// Inside CUDA graph capture a device-to-host read is not allowed (and a replay could not raise): there the flag
// reads 0, so the op captures, and bad data in a replay gives unchecked results (the same call run eagerly, e.g.
// the warm-up before capture, validates).
struct ErrorFlag {
  at::Tensor flag;
  explicit ErrorFlag(const at::Tensor& like) : flag(at::zeros({1}, like.options().dtype(at::kInt))) {}
  int* ptr() { return flag.data_ptr<int>(); }
  int value() const { return capturing() ? 0 : flag.item<int>(); }
  void check(const std::string& message) const {
    if (value() != 0) fail_value(message);
  }
};

}  // namespace weightshare::cuda
