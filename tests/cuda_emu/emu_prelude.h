#pragma once
// Force-included (g++ -include) before every CUDA source of the emulator build: the CUDA keywords, built-in
// variables and device intrinsics the project's kernels use, defined for the host on top of the fiber machine of
// emu_runtime.h. Kernel launches (<<<...>>>) are rewritten by build.py into ws_emu::launcher(...)(args).
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>

#include "emu_runtime.h"

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __noinline__
#undef __launch_bounds__
#undef __shared__
#undef __constant__
#undef __restrict__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
// Block-scope __shared__ objects become static: one instance shared by the fibers of the running block (blocks run
// one at a time). extern __shared__ arrays are rewritten by build.py to the dynamic area.
#define __shared__ static
#define __constant__
#define __restrict__ __restrict

extern uint3 threadIdx, blockIdx;
extern dim3 blockDim, gridDim;
constexpr int warpSize = 32;

// ------------------------------------------------------------------------------------------------ arithmetic
using std::isfinite;  // CUDA's math functions live in the global namespace
using std::isinf;
using std::isnan;
template <typename A, typename B>
inline std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  return C(a) < C(b) ? C(a) : C(b);
}
template <typename A, typename B>
inline std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  return C(a) < C(b) ? C(b) : C(a);
}

// Sources are compiled with -ffp-contract=off, so these round once each, as their device forms.
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __dmul_rn(double a, double b) { return a * b; }
inline int __float2int_rn(float x) { return static_cast<int>(std::nearbyint(x)); }
inline float __int2float_rn(int x) { return static_cast<float>(x); }
inline float __ll2float_rn(long long x) { return static_cast<float>(x); }
inline float __double2float_rn(double x) { return static_cast<float>(x); }
inline unsigned __float_as_uint(float x) { unsigned u; std::memcpy(&u, &x, 4); return u; }
inline float __uint_as_float(unsigned u) { float x; std::memcpy(&x, &u, 4); return x; }
inline float __int_as_float(int u) { float x; std::memcpy(&x, &u, 4); return x; }
inline double __longlong_as_double(long long u) { double x; std::memcpy(&x, &u, 8); return x; }

inline int __dp4a(int a, int b, int c) {
  int s = c;
  for (int i = 0; i < 4; ++i) s += int(int8_t(a >> (8 * i))) * int(int8_t(b >> (8 * i)));
  return s;
}
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const uint64_t both = (uint64_t(y) << 32) | x;
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) r |= unsigned((both >> (8 * ((s >> (4 * i)) & 7))) & 0xff) << (8 * i);
  return r;
}
inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned shift) {
  return static_cast<unsigned>(((uint64_t(hi) << 32) | lo) >> (shift & 31));
}

// ------------------------------------------------------------------------------------------------ memory
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
inline size_t __cvta_generic_to_shared(const void* p) { return ws_emu::shared_address(p); }

// Fibers switch only at barriers, so any read-modify-write would be atomic here; std::atomic_ref (relaxed, as CUDA's
// atomics are) says so to ThreadSanitizer too, which then reports only the plain accesses that race.
template <typename T, typename V>
inline T atomicAdd(T* p, V v) {
  return std::atomic_ref<T>(*p).fetch_add(T(v), std::memory_order_relaxed);
}
template <typename T, typename V>
inline T atomicOr(T* p, V v) {
  return std::atomic_ref<T>(*p).fetch_or(T(v), std::memory_order_relaxed);
}
template <typename T, typename Op>
inline T emu_atomic_update(T* p, Op op) {
  std::atomic_ref<T> a(*p);
  T old = a.load(std::memory_order_relaxed);
  while (!a.compare_exchange_weak(old, op(old), std::memory_order_relaxed)) {
  }
  return old;
}
template <typename T, typename V>
inline T atomicMax(T* p, V v) {
  return emu_atomic_update(p, [&](T old) { return old < T(v) ? T(v) : old; });
}
template <typename T, typename V>
inline T atomicMin(T* p, V v) {
  return emu_atomic_update(p, [&](T old) { return T(v) < old ? T(v) : old; });
}

[[noreturn]] inline void __trap() { ws_emu::fail("__trap"); }

// ------------------------------------------------------------------------------------------------ barriers
inline void __syncthreads() { ws_emu::barrier(ws_emu::Wait::Block); }
inline void __syncwarp(unsigned = 0xffffffffu) { ws_emu::barrier(ws_emu::Wait::Warp); }

namespace ws_emu {
// Every shuffle and vote names a full warp: the kernels' masks are all 0xffffffff, and a lane that has exited
// cannot be read.
inline void full_mask(unsigned mask) {
  if (mask != 0xffffffffu) fail("a warp collective with a partial mask (not modelled)");
}
template <typename T>
inline T shuffle(T v, int src_of_lane(int, int), int arg, int width) {
  T out{};
  const int lane = linear_thread() % kWarp, warp = linear_thread() / kWarp;
  warp_collective(&v, sizeof(T), [&](auto slot) {
    const int base = lane & ~(width - 1);
    const int src = base + (src_of_lane(lane - base, arg) & (width - 1));
    if (!lane_live(warp, src)) fail("a shuffle reads an exited lane");
    std::memcpy(&out, slot(src), sizeof(T));
  });
  return out;
}
inline int xor_lane(int lane, int mask) { return lane ^ mask; }
inline int src_lane(int, int src) { return src; }
}  // namespace ws_emu

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  ws_emu::full_mask(mask);
  return ws_emu::shuffle(v, ws_emu::xor_lane, lane_mask, width);
}
template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  ws_emu::full_mask(mask);
  return ws_emu::shuffle(v, ws_emu::src_lane, src, width);
}
inline int __all_sync(unsigned mask, int pred) {
  ws_emu::full_mask(mask);
  int all = 1;
  const int p = pred != 0;
  ws_emu::warp_collective(&p, sizeof p, [&](auto slot) {
    const int warp = ws_emu::linear_thread() / ws_emu::kWarp;
    for (int l = 0; l < ws_emu::kWarp; ++l) {
      int v;
      std::memcpy(&v, slot(l), sizeof v);
      if (ws_emu::lane_live(warp, l) && !v) all = 0;
    }
  });
  return all;
}

// ------------------------------------------------------------------------------------------------ launches
namespace ws_emu {
template <typename... P>
struct Launcher {
  const char *name, *caller;
  void (*kernel)(P...);
  dim3 grid, block;
  size_t smem;
  template <typename... A>
  void operator()(A&&... args) const {
    // converted once to the kernel's parameter types; each thread's call gets its own copies (by-value parameters)
    const std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
    auto k = kernel;
    record_launch(name, caller, grid, block, smem);
    launch(grid, block, smem, [&] { std::apply(k, params); });
  }
};
template <typename... P, typename G, typename B>
Launcher<P...> launcher(const char* name, const char* caller, void (*kernel)(P...), G grid, B block, size_t smem = 0,
                        cudaStream_t = nullptr) {
  return Launcher<P...>{name, caller, kernel, dim3(grid), dim3(block), smem};
}
}  // namespace ws_emu

// The runtime's C++ overloads that take a kernel's address (cuda_runtime.h declares them for nvcc only).
template <typename T>
inline cudaError_t cudaFuncSetAttribute(T* kernel, cudaFuncAttribute attr, int value) {
  return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), attr, value);
}
template <typename T>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, T* kernel, int threads, size_t smem) {
  return ::cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks, reinterpret_cast<const void*>(kernel), threads, smem);
}
template <typename T>
inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, T* kernel) {
  return ::cudaFuncGetAttributes(attr, reinterpret_cast<const void*>(kernel));
}
