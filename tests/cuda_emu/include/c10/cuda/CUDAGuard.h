#pragma once
// cuda_emu's stand-in: one device, nothing to switch (tensors are CPU tensors standing for device memory).
#include <c10/core/Device.h>
#include "c10/cuda/CUDAStream.h"

namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
  explicit CUDAGuard(c10::DeviceIndex) {}
};
}  // namespace c10::cuda
