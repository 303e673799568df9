#pragma once
// The per-group decode tables of shared_linear's CUDA kernels (shared_linear_tables.cu): the packed weight made
// 4-byte aligned, and per codebook group either nothing (kernels that read the codebook themselves), an fp32 table
// over all 2**bits indices (NaN past K), or the int8 table with its scale and zero point (reference.py's
// quantize_int8_codebook and int8_zero_points, bit for bit).
#include <ATen/core/Tensor.h>

#include "weightshare/checks.h"
#include "weightshare/cuda_decode.h"

namespace weightshare::cuda {

// The packed weight (4-byte aligned, as the kernels read words) and what its kernels decode through.
struct Prepared {
  at::Tensor packed, table, scale, zero;
  PackedRows rows;
};

// Which per-group tables a path reads: none (the float GEMV kernels stage theirs from the codebook, in its own
// dtype, saving a launch where a call is a few microseconds), fp32 over all 2**bits indices (tiles, panels), or
// int8 with scales and zero points.
enum class Tables { None, Float, Int8 };

// The tables of `kind` for a shared_linear call, launched on the current stream (nothing waits on them).
Prepared prepare(const at::Tensor& packed, const at::Tensor& codebook, int bits, const PackedWeight& pw,
                 Tables kind);

}  // namespace weightshare::cuda
