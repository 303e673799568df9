#pragma once
// A per-thread float buffer reused from call to call, and decoding a packed weight panel into it: shared_conv2d's
// CPU path (the conv then reads it) and shared_linear's batched path (the GEMM then reads it).
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "weightshare/checks.h"

namespace weightshare::cpu {

// `buf` grown to at least n elements (never shrunk) and its data: the CPU kernels' per-thread work buffers
// (thread_local vectors), rewritten on every call, because fresh allocations of their size page-fault on every call.
template <class T>
inline T* grown(std::vector<T>& buf, size_t n) {
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

// p rounded up to a 64-byte boundary (the buffer must have 64 bytes to spare): a 64-byte SIMD load from a
// vector-allocated (16-byte aligned) buffer straddles two cache lines. (On this Zen 4 VM the int8 kernels measured
// the same either way; split loads cost extra on other cores, and the alignment is free.)
template <class T>
inline T* aligned64(T* p) {
  return reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t(63));
}

// This thread's reused float buffer, at least n floats (grown, never shrunk). Valid until this thread's next call of
// any function here; the caller must not keep it.
float* scratch_floats(int64_t n);

// Rows [r0, r1) of the packed weight decoded (fp32) into this thread's scratch buffer, viewed as `shape`
// (shape[0] == r1 - r0). Valid until this thread's next call; the caller must not keep it.
// Why not a fresh tensor: a conv weight panel is often above glibc's mmap threshold (a 64x64x3x3 fp32 weight is
// 147 KB), so every call mapped, zero-filled and unmapped fresh pages; measured on the ResNet 3x3 benchmark layer,
// that page-fault churn made dequantize + conv 25-30 % slower than the dense conv (1.45 vs 1.10 ms).
at::Tensor decode_rows_to_scratch(const at::Tensor& packed, const at::Tensor& codebook, const PackedWeight& pw,
                                  int64_t bits, int64_t r0, int64_t r1, at::IntArrayRef shape);

}  // namespace weightshare::cpu
