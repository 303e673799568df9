// Small kernels that check the emulator itself (tests/test_cuda_emu.py): its mma.sync and wgmma against a matrix
// product, and that it reports what it promises to (a warp split between barriers, a shuffle from an exited lane, a
// write to accumulators under an in-flight wgmma) and models what it promises to (a cp.async read before its
// wait sees the old bytes; wgmma on the same accumulators chain). Compiled only into the emulator's library.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <string>

#include "mma_ptx.h"
#include "wgmma_ptx.h"

namespace {

using namespace weightshare::cuda;
using weightshare::sw128_descriptor;

// One warp: D (16 x 8, fp32) = A (16 x 16) B (16 x 8), fp16, fragments loaded as mma16816's comment lays them out.
__global__ void mma_kernel(const uint16_t* a, const uint16_t* b, float* d) {
  const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
  auto pair = [](const uint16_t* p, int i, int j) { return uint32_t(p[i]) | (uint32_t(p[j]) << 16); };
  const uint32_t af[4] = {pair(a, g * 16 + 2 * t, g * 16 + 2 * t + 1),
                          pair(a, (g + 8) * 16 + 2 * t, (g + 8) * 16 + 2 * t + 1),
                          pair(a, g * 16 + 2 * t + 8, g * 16 + 2 * t + 9),
                          pair(a, (g + 8) * 16 + 2 * t + 8, (g + 8) * 16 + 2 * t + 9)};
  const uint32_t b0 = pair(b, (2 * t) * 8 + g, (2 * t + 1) * 8 + g);
  const uint32_t b1 = pair(b, (2 * t + 8) * 8 + g, (2 * t + 9) * 8 + g);
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  mma16816<__half>(acc, af, b0, b1);
  for (int r = 0; r < 4; ++r) d[(g + (r >= 2 ? 8 : 0)) * 8 + 2 * t + (r & 1)] = acc[r];
}

// One warpgroup: D (64 x 64) = A (64 x 16) B (16 x 64) by two chained wgmma of half the k each (the second issued
// before the first completes), B staged K-major in the 128-byte swizzle. mode 1: the accumulators are written
// between issue and wait; mode 2: the first wgmma's A registers are reused for the second (both must be
// reported).
__global__ void wgmma_kernel(const uint16_t* a, const uint16_t* b, float* d, int mode) {
  extern __shared__ __align__(1024) uint16_t stage[];
  const int tid = threadIdx.x, w = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  for (int i = tid; i < 64 * 64; i += 128) {  // B's column n, k in 0..63 (16 used), swizzled 16-byte chunks
    const int n = i / 64, k = i % 64;
    const int logical = (n >> 3) * 1024 + (n & 7) * 128 + 2 * k;
    const int physical = logical ^ (((logical >> 7) & 7) << 4);
    stage[physical / 2] = k < 16 ? b[k * 64 + n] : uint16_t(0);
  }
  __syncthreads();
  float acc[32];
  uint32_t af[2][4];  // a register set per wgmma: A's registers are read until the wgmma completes
  for (int half = 0; half < 2; ++half) {
    // A with the other half's k zeroed: the two products add up to A B
    auto at = [&](int row, int k) { return (k >= 8 * half && k < 8 * half + 8) ? uint32_t(a[row * 16 + k]) : 0u; };
    const int r0 = 16 * w + g, r1 = r0 + 8;
    const int set = mode == 2 ? 0 : half;
    af[set][0] = at(r0, 2 * t) | (at(r0, 2 * t + 1) << 16);
    af[set][1] = at(r1, 2 * t) | (at(r1, 2 * t + 1) << 16);
    af[set][2] = at(r0, 2 * t + 8) | (at(r0, 2 * t + 9) << 16);
    af[set][3] = at(r1, 2 * t + 8) | (at(r1, 2 * t + 9) << 16);
    wgmma_fence();
    wgmma_rs<__half, 64>(acc, af[set], sw128_descriptor(shared_address(stage), 1024), half);
    wgmma_commit();
  }
  if (mode == 1) acc[0] = 1.0f;
  wgmma_wait<0>();
  for (int reg = 0; reg < 32; ++reg) {
    const int j = reg / 4, h = (reg / 2) % 2, e = reg % 2;
    d[(16 * w + g + 8 * h) * 64 + 8 * j + 2 * t + e] = acc[reg];
  }
}

// One thread: 16 bytes copied by cp.async, read before and after the wait: out[0..3] the old words, out[4..7] new.
__global__ void cp_async_kernel(const uint32_t* src, uint32_t* out) {
  __shared__ __align__(16) uint32_t buf[4];
  for (int i = 0; i < 4; ++i) buf[i] = 7u;
  cp_async16(shared_address(buf), src);
  cp_async_commit();
  for (int i = 0; i < 4; ++i) out[i] = buf[i];
  cp_async_wait<0>();
  for (int i = 0; i < 4; ++i) out[4 + i] = buf[i];
}

// Half of warp 0 at __syncwarp, the other half at __syncthreads: neither barrier can complete.
__global__ void split_barrier_kernel() {
  if (threadIdx.x < 16) {
    __syncwarp();
  } else {
    __syncthreads();
  }
}

// Lanes 16-31 exit; lanes 0-15 read lane + 16.
__global__ void exited_lane_kernel(float* out) {
  if (threadIdx.x >= 16) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, float(threadIdx.x), 16);
}

// Thread t writes s[t], then reads its neighbour's s[(t + 1) % 64] across two warps. mode 0: __syncthreads in
// between (no race); 1: no barrier (a race, reported by the tsan variant); 2: __syncwarp only (a race between
// threads 31 and 32, 63 and 0); 3: a barrier, and every thread also adds to one shared counter atomically (no race).
__global__ void neighbour_kernel(const float* in, float* out, int mode) {
  __shared__ float s[64];
  __shared__ int counter;
  const int t = threadIdx.x;
  if (t == 0) counter = 0;
  if (mode == 3) __syncthreads();
  s[t] = in[t];
  if (mode == 0 || mode == 3) __syncthreads();
  if (mode == 2) __syncwarp();
  if (mode == 3) atomicAdd(&counter, 1);
  out[t] = s[(t + 1) % 64];
  if (mode == 3) {
    __syncthreads();
    out[t] += counter;
  }
}

// Thread t copies in[t] through the dynamic shared memory (64 floats launched) to out[t]. mode 0: in bounds; 1:
// thread 63 reads one float past the launch's shared memory; 2: thread 63 reads one float past `in` (reported by
// the asan variant, each where it happens).
__global__ void overrun_kernel(const float* in, float* out, int mode) {
  extern __shared__ float dyn[];
  const int t = threadIdx.x;
  dyn[t] = in[t + (mode == 2 && t == 63 ? 1 : 0)];
  __syncthreads();
  out[t] = dyn[t + (mode == 1 && t == 63 ? 1 : 0)];
}

at::Tensor selftest(c10::string_view name, const at::Tensor& a, const at::Tensor& b, int64_t mode) {
  const std::string n(name);
  if (n == "mma") {
    at::Tensor d = at::empty({16, 8}, a.options().dtype(at::kFloat));
    mma_kernel<<<1, 32>>>(reinterpret_cast<const uint16_t*>(a.data_ptr()),
                          reinterpret_cast<const uint16_t*>(b.data_ptr()),
                          d.data_ptr<float>());
    return d;
  }
  if (n == "wgmma") {
    at::Tensor d = at::empty({64, 64}, a.options().dtype(at::kFloat));
    wgmma_kernel<<<1, 128, 64 * 64 * 2>>>(reinterpret_cast<const uint16_t*>(a.data_ptr()),
                                          reinterpret_cast<const uint16_t*>(b.data_ptr()), d.data_ptr<float>(),
                                          static_cast<int>(mode));
    return d;
  }
  if (n == "cp_async") {
    at::Tensor out = at::empty({8}, a.options().dtype(at::kInt));
    cp_async_kernel<<<1, 1>>>(reinterpret_cast<const uint32_t*>(a.data_ptr()),
                              reinterpret_cast<uint32_t*>(out.data_ptr()));
    return out;
  }
  if (n == "split_barrier") {
    split_barrier_kernel<<<1, 64>>>();
    return a;
  }
  if (n == "exited_lane") {
    at::Tensor out = at::empty({16}, a.options().dtype(at::kFloat));
    exited_lane_kernel<<<1, 32>>>(out.data_ptr<float>());
    return out;
  }
  if (n == "neighbour") {
    TORCH_CHECK_VALUE(a.numel() == 64 && a.scalar_type() == at::kFloat, "neighbour: a must be 64 floats");
    at::Tensor out = at::empty({64}, a.options());
    neighbour_kernel<<<1, 64>>>(a.data_ptr<float>(), out.data_ptr<float>(), static_cast<int>(mode));
    return out;
  }
  if (n == "overrun") {
    TORCH_CHECK_VALUE(a.numel() == 64 && a.scalar_type() == at::kFloat, "overrun: a must be 64 floats");
    at::Tensor in = a.clone();  // an allocation of exactly 64 floats
    at::Tensor out = at::empty({64}, a.options());
    overrun_kernel<<<1, 64, 64 * sizeof(float)>>>(in.data_ptr<float>(), out.data_ptr<float>(), static_cast<int>(mode));
    return out;
  }
  TORCH_CHECK_VALUE(false, "cuda_emu: no self-test named ", n);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(weightshare_emu, m) {
  m.def("selftest(str name, Tensor a, Tensor b, int mode=0) -> Tensor");
}
TORCH_LIBRARY_IMPL(weightshare_emu, CPU, m) { m.impl("selftest", &selftest); }
