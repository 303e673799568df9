#pragma once
// The PTX the kernels of shared_linear use (the GEMVs, shared_linear_gemm_mma.cu, the implicit-GEMM conv): mma.sync
// m16n8k16 with fp32 accumulation, ldmatrix, cp.async and shared loads by address. Below sm_80 each one traps: the
// host never launches these kernels there (their *_takes functions check the device and what was compiled), but a
// build from PTX for an older arch must still compile. tests/cuda_emu/ptx/mma_ptx.h defines the same functions for
// the host emulator, as the PTX ISA defines the instructions: keep the two in step.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace weightshare::cuda {

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define WS_PTX_SM80 1
#else
#define WS_PTX_SM80 0
#endif

// d += A (16x16, row) * B (16x8, col), fp32 accumulation. Lane (g, t) = (lane / 4, lane % 4) holds A rows g / g+8
// at k {2t, 2t+1} (a0 / a1) and {2t+8, 2t+9} (a2 / a3), B column g at the same k (b0, b1), D rows g / g+8 at
// columns {2t, 2t+1} (d0 d1 / d2 d3); the lower k or column in a register's low half.
template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if WS_PTX_SM80
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#else
  __trap();
#endif
}

__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ uint32_t lds_u32(uint32_t address) {
  uint32_t v;
  asm volatile("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(address) : "memory");
  return v;
}

__device__ __forceinline__ float lds_f32(uint32_t address) {
  float v;
  asm volatile("ld.shared.f32 %0, [%1];" : "=f"(v) : "r"(address) : "memory");
  return v;
}

__device__ __forceinline__ uint32_t lds_u16(uint32_t address) {
  uint16_t v;
  asm volatile("ld.shared.u16 %0, [%1];" : "=h"(v) : "r"(address) : "memory");
  return v;
}

__device__ __forceinline__ uint2 lds_u64(uint32_t address) {
  uint2 v;
  asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "r"(address) : "memory");
  return v;
}

__device__ __forceinline__ uint4 lds_u128(uint32_t address) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(address)
               : "memory");
  return v;
}

// A register holding an unspecified value, made without an instruction (the tensor-core GEMV's A fragment rows 8-15
// when no row of x lands there: an A row reaches only its own D row, and rows past M are never stored).
__device__ __forceinline__ uint32_t unspecified() {
  uint32_t v;
  asm volatile("" : "=r"(v));
  return v;
}

// Four 8x8 matrices of 16-bit values: lane 8 j + r hands the address of row r of matrix j (16 bytes); lane l gets
// word l % 4 of row l / 4 of matrix j in r[j].
__device__ __forceinline__ void ldmatrix_x4(uint32_t address, uint32_t (&r)[4]) {
#if WS_PTX_SM80
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address)
               : "memory");
#else
  __trap();
#endif
}

// 16 bytes global -> shared without passing through registers (L2 only: .cg), in the thread's current group.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src) {
#if WS_PTX_SM80
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" : : "r"(dst), "l"(src) : "memory");
#else
  __trap();
#endif
}

// The same, but 16 zero bytes instead where `copy` is false (src is then not read: the implicit-GEMM conv's padding).
__device__ __forceinline__ void cp_async16_zfill(uint32_t dst, const void* src, bool copy) {
#if WS_PTX_SM80
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" : : "r"(dst), "l"(src), "r"(copy ? 16 : 0) : "memory");
#else
  __trap();
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if WS_PTX_SM80
  asm volatile("cp.async.commit_group;" : : : "memory");
#endif
}

// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if WS_PTX_SM80
  asm volatile("cp.async.wait_group %0;" : : "n"(N) : "memory");
#endif
}

}  // namespace weightshare::cuda
