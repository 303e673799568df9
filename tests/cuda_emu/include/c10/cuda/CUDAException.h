#pragma once
// cuda_emu's stand-in for c10's header of the same name: no CUDA runtime behind it, so a failed call is the
// emulator's own runtime answering (emu_runtime.cpp) and is reported as a RuntimeError.
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#define C10_CUDA_CHECK(EXPR)                                                        \
  do {                                                                              \
    const cudaError_t ws_emu_err = (EXPR);                                          \
    TORCH_CHECK(ws_emu_err == cudaSuccess, "cuda_emu: runtime call failed: " #EXPR); \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)
