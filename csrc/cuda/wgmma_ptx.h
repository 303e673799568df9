#pragma once
// The sm_90a PTX of the wgmma form of the fused GEMM (shared_linear_gemm_wgmma.cu): warpgroup-wide asynchronous
// mma with A in registers and B read by the tensor cores straight from shared memory through a matrix descriptor,
// and the fences that order it. Compiled only for sm_90a (__CUDA_ARCH_FEAT_SM90_ALL: TORCH_CUDA_ARCH_LIST="9.0a");
// elsewhere every function traps and the host never launches the kernel (gemm_wgmma_takes, WS_SM90A).
// tests/cuda_emu/ptx/wgmma_ptx.h defines the same functions for the host emulator: keep the two in step.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "weightshare/fused_gemm_layout.h"  // sw128_descriptor

namespace weightshare::cuda {

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define WS_PTX_SM90A 1
#else
#define WS_PTX_SM90A 0
#endif

// The asm of one m64nNk16 with A in registers for a PTX input type (f16, bf16): operands d[N / 2], a[4], desc, then
// scale-d as a predicate from `accumulate` (0: d = A B, ignoring d's registers), scale-a = scale-b = 1, B not
// transposed (K-major).
#define WS_WGMMA_RS_M64N64(TYPE) \
  asm volatile( \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n" \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." #TYPE "." #TYPE " {" \
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15," \
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31" \
      "}, {%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n" \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]) \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(accumulate))

#define WS_WGMMA_RS_M64N128(TYPE) \
  asm volatile( \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n" \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." #TYPE "." #TYPE " {" \
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15," \
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31," \
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47," \
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63" \
      "}, {%64, %65, %66, %67}, %68, p, 1, 1, 0;\n}\n" \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]) \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(accumulate))

// d (64 x N, fp32, rows 16 w + g / +8 of warp w at columns 8 j + 2t + {0, 1} in d[4 j .. 4 j + 4)) = (accumulate ?
// d : 0) + A (64 x 16, each warp's 16 rows in registers laid out as mma.m16n8k16's A) x B (16 x N, K-major, from
// the descriptor). The first wgmma of a kernel passes accumulate = 0 instead of zeroing d with other instructions:
// a non-wgmma definition of d reaching a wgmma that is in flight across a loop's back edge makes ptxas serialise
// every wgmma (C7515).
template <typename T, int N>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc, int accumulate) {
  static_assert(N == 64 || N == 128, "the widths instantiated here");
#if WS_PTX_SM90A
  constexpr bool kHalf = std::is_same_v<T, __half>;
  if constexpr (N == 64 && kHalf) {
    WS_WGMMA_RS_M64N64(f16);
  } else if constexpr (N == 64) {
    WS_WGMMA_RS_M64N64(bf16);
  } else if constexpr (kHalf) {
    WS_WGMMA_RS_M64N128(f16);
  } else {
    WS_WGMMA_RS_M64N128(bf16);
  }
#else
  __trap();
#endif
}

// Before the first wgmma of a batch whose A or accumulator registers other instructions wrote.
__device__ __forceinline__ void wgmma_fence() {
#if WS_PTX_SM90A
  asm volatile("wgmma.fence.sync.aligned;" : : : "memory");
#endif
}

__device__ __forceinline__ void wgmma_commit() {
#if WS_PTX_SM90A
  asm volatile("wgmma.commit_group.sync.aligned;" : : : "memory");
#endif
}

// Waits until at most N committed wgmma groups of this warpgroup are still running.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
#if WS_PTX_SM90A
  asm volatile("wgmma.wait_group.sync.aligned %0;" : : "n"(N) : "memory");
#endif
}

// Makes this thread's generic-proxy writes to shared memory (st.shared, cp.async) visible to the async proxy that
// wgmma reads B through; a barrier then publishes them to the warpgroup.
__device__ __forceinline__ void fence_proxy_async_shared() {
#if WS_PTX_SM90A
  asm volatile("fence.proxy.async.shared::cta;" : : : "memory");
#endif
}

// Pins accumulator registers around a batch of wgmma (CUTLASS's warpgroup_fence_operand): keeps the compiler from
// moving reads or writes of them across the asynchronous instructions.
template <int R>
__device__ __forceinline__ void pin_registers(float (&d)[R]) {
#pragma unroll
  for (int i = 0; i < R; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

}  // namespace weightshare::cuda
