#pragma once
// The host emulator's csrc/cuda/wgmma_ptx.h (build.py puts this file in its place). wgmma.mma_async runs at its
// wait_group: the warpgroup's A registers are exchanged when it is issued, B is read through the descriptor then
// and again when it completes (a change in between is reported: the kernel wrote shared memory under an
// in-flight wgmma), and the accumulators are written only at completion, so a read of them before the wait sees
// their old values, as on the GPU.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <array>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "emu_runtime.h"
#include "mma_ptx.h"
#include "weightshare/fused_gemm_layout.h"  // sw128_descriptor

namespace weightshare::cuda {

#define WS_PTX_SM90A 1

// The 16-bit element (k, n) of a K-major, 128-byte-swizzled B operand (PTX ISA, matrix descriptors): row n of 64
// values is 128 bytes, 8 rows to a 1024-byte atom, atoms `stride` bytes apart, and the swizzle XORs an address's
// 16-byte chunk bits [4, 7) with its bits [7, 10). The descriptor holds 18 address bits: the rest are the dynamic
// shared area's (where the kernel stages x).
inline uint16_t emu_descriptor_element(uint64_t desc, int k, int n) {
  const uint32_t start = uint32_t(desc & 0x3fffu) << 4, stride = uint32_t((desc >> 32) & 0x3fffu) << 4;
  if (((desc >> 62) & 3) != 1) ws_emu::fail("wgmma: a descriptor without the 128-byte swizzle");
  const uint32_t logical = start + (n >> 3) * stride + (n & 7) * 128 + 2 * k;
  const uint32_t physical = logical ^ (((logical >> 7) & 7) << 4);
  const uintptr_t base = reinterpret_cast<uintptr_t>(ws_emu::dynamic_shared());
  uintptr_t p = (base & ~uintptr_t(0x3ffff)) | (physical & 0x3ffffu);
  if (p < base) p += 0x40000;
  if (p + 2 > base + ws_emu::kDynamicSharedBytes) ws_emu::fail("wgmma: a B element outside the dynamic shared area");
  uint16_t v;
  std::memcpy(&v, reinterpret_cast<const void*>(p), 2);
  return v;
}

template <int N>
inline std::vector<uint16_t> emu_read_b(uint64_t desc) {
  std::vector<uint16_t> b(size_t(16) * N);
  for (int k = 0; k < 16; ++k) {
    for (int n = 0; n < N; ++n) b[size_t(k) * N + n] = emu_descriptor_element(desc, k, n);
  }
  return b;
}

// d (64 x N, fp32; rows 16 w + g / +8 of warp w at columns 8 j + 2t + {0, 1} in d[4 j .. 4 j + 4)) = (accumulate ?
// d : 0) + A (64 x 16, each warp's 16 rows laid out as mma.m16n8k16's A) x B (16 x N from the descriptor).
template <typename T, int N>
inline void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc, int accumulate) {
  static_assert(N == 64 || N == 128, "the widths instantiated here");
  struct Operands {
    uint32_t a[4];
    uint64_t desc;
    int accumulate;
  };
  const Operands mine{{a[0], a[1], a[2], a[3]}, desc, accumulate != 0};
  auto A = std::make_shared<std::array<double, 64 * 16>>();
  ws_emu::warpgroup_collective(&mine, sizeof mine, [&](auto slot) {
    for (int th = 0; th < 128; ++th) {
      Operands o;
      std::memcpy(&o, slot(th), sizeof o);
      if (o.desc != desc || o.accumulate != mine.accumulate) ws_emu::fail("wgmma: operands differ across the warpgroup");
      const int w = th / 32, g = (th % 32) >> 2, t = th & 3;
      for (int h = 0; h < 2; ++h) {
        (*A)[(16 * w + g) * 16 + 2 * t + h] = emu_element<T>((o.a[0] >> (16 * h)) & 0xffff);
        (*A)[(16 * w + g + 8) * 16 + 2 * t + h] = emu_element<T>((o.a[1] >> (16 * h)) & 0xffff);
        (*A)[(16 * w + g) * 16 + 2 * t + 8 + h] = emu_element<T>((o.a[2] >> (16 * h)) & 0xffff);
        (*A)[(16 * w + g + 8) * 16 + 2 * t + 8 + h] = emu_element<T>((o.a[3] >> (16 * h)) & 0xffff);
      }
    }
  });
  auto issued = std::make_shared<std::vector<uint16_t>>(emu_read_b<N>(desc));
  const int th = ws_emu::linear_thread() % 128, w = th / 32, g = (th % 32) >> 2, t = th & 3;
  float* out = d;
  const uint32_t* a_regs = a;
  const std::array<uint32_t, 4> a_issued{a[0], a[1], a[2], a[3]};
  // D's registers belong to the tensor cores from issue to completion; wgmma in flight on the same registers chain
  // (each adds to what the previous one wrote), so the value expected at completion is the snapshot when
  // none was in flight, else what the previous one wrote
  const std::shared_ptr<ws_emu::AccumulatorState> state = ws_emu::accumulator_state(out);
  if (state->in_flight++ == 0) state->expect.assign(d, d + N / 2);
  const bool acc = mine.accumulate;
  ws_emu::wgmma_push([=] {
    // the tensor cores read A's registers and B's shared memory until the group completes
    if (emu_read_b<N>(desc) != *issued) ws_emu::fail("wgmma: shared memory of B changed while the wgmma was in flight");
    if (std::memcmp(a_regs, a_issued.data(), sizeof a_issued) != 0) {
      ws_emu::fail("wgmma: A's registers changed while the wgmma was in flight");
    }
    if (std::memcmp(out, state->expect.data(), sizeof(float) * (N / 2)) != 0) {
      ws_emu::fail("wgmma: accumulator registers written while the wgmma was in flight");
    }
    for (int reg = 0; reg < N / 2; ++reg) {
      const int j = reg / 4, h = (reg / 2) % 2, e = reg % 2;
      const int row = 16 * w + g + 8 * h, col = 8 * j + 2 * t + e;
      double s = 0.0;
      for (int k = 0; k < 16; ++k) s += (*A)[row * 16 + k] * emu_element<T>((*issued)[size_t(k) * N + col]);
      out[reg] = static_cast<float>((acc ? double(out[reg]) : 0.0) + s);
    }
    state->expect.assign(out, out + N / 2);
    state->in_flight--;
  });
}

inline void wgmma_fence() {}
inline void wgmma_commit() { ws_emu::wgmma_commit(); }
template <int N>
inline void wgmma_wait() {
  ws_emu::wgmma_wait(N);
}
inline void fence_proxy_async_shared() {}
template <int R>
inline void pin_registers(float (&)[R]) {}

}  // namespace weightshare::cuda
