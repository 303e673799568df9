#pragma once
// shared_linear for many rows of x on the GPU by panels (shared_linear_panels.cu).
#include <ATen/core/Tensor.h>

#include <optional>

#include "weightshare/cuda_decode.h"

namespace weightshare::cuda {

// Whether forward calls with more rows of x than the GEMV takes use decoded panels + cuBLAS (the default) rather
// than the tile kernels (WS_CUDA_LINEAR=tiles, kept for comparison in the benchmarks). Read per call.
bool panels_enabled();

// y [M, N] (x's dtype) = x2d [M, kin] @ W^T (+ bias), W decoded a panel of rows at a time (w.table: the fp32
// per-group tables of prepare(), NaN past K) into a workspace of x's dtype sized to stay in L2, each panel
// multiplied by cuBLAS. The whole dense W never exists at once.
void linear_by_panels(const PackedRows& w, int bits, const at::Tensor& x2d, const std::optional<at::Tensor>& bias,
                      at::Tensor& y2d);

}  // namespace weightshare::cuda
