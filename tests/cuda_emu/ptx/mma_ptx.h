#pragma once
// The host emulator's csrc/cuda/mma_ptx.h (build.py puts this file in its place): the same functions, each doing
// what the PTX ISA says its instruction does, on the fiber machine of emu_runtime.h. Warp-wide instructions
// (mma.sync, ldmatrix) exchange their operands at a warp barrier; cp.async copies wait in the thread's groups until
// cp.async.wait_group lets them land, so a read before the wait sees what was there before.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "emu_runtime.h"

namespace weightshare::cuda {

#define WS_PTX_SM80 1

// A 16-bit value of an mma operand as float (both types' products are exact in fp32 and in double).
template <typename T>
inline double emu_element(uint32_t bits16) {
  if constexpr (std::is_same_v<T, __half>) {
    __half_raw r;
    r.x = static_cast<unsigned short>(bits16);
    return __half2float(__half(r));
  } else {
    const uint32_t u = bits16 << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
}

inline void emu_whole_warp() {
  const int warp = ws_emu::linear_thread() / ws_emu::kWarp;
  for (int l = 0; l < ws_emu::kWarp; ++l) {
    if (!ws_emu::lane_live(warp, l)) ws_emu::fail("a .sync.aligned warp instruction with an exited lane");
  }
}

// mma.m16n8k16.row.col, fp32 accumulation (the sum of a step in double, rounded once). Lane (g, t) holds A rows
// g / g+8 at k {2t, 2t+1} (a0 / a1) and {2t+8, 2t+9} (a2 / a3), B column g at the same k (b0, b1), D rows g / g+8
// at columns {2t, 2t+1}; the lower k or column in a register's low half.
template <typename T>
inline void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  emu_whole_warp();
  const uint32_t mine[6] = {a[0], a[1], a[2], a[3], b0, b1};
  double A[16][16], B[16][8];
  ws_emu::warp_collective(mine, sizeof mine, [&](auto slot) {
    for (int l = 0; l < 32; ++l) {
      uint32_t r[6];
      std::memcpy(r, slot(l), sizeof r);
      const int g = l >> 2, t = l & 3;
      for (int h = 0; h < 2; ++h) {
        A[g][2 * t + h] = emu_element<T>((r[0] >> (16 * h)) & 0xffff);
        A[g + 8][2 * t + h] = emu_element<T>((r[1] >> (16 * h)) & 0xffff);
        A[g][2 * t + 8 + h] = emu_element<T>((r[2] >> (16 * h)) & 0xffff);
        A[g + 8][2 * t + 8 + h] = emu_element<T>((r[3] >> (16 * h)) & 0xffff);
        B[2 * t + h][g] = emu_element<T>((r[4] >> (16 * h)) & 0xffff);
        B[2 * t + 8 + h][g] = emu_element<T>((r[5] >> (16 * h)) & 0xffff);
      }
    }
  });
  const int lane = ws_emu::linear_thread() % 32, g = lane >> 2, t = lane & 3;
  for (int r = 0; r < 4; ++r) {
    const int row = g + (r >= 2 ? 8 : 0), col = 2 * t + (r & 1);
    double s = 0.0;
    for (int k = 0; k < 16; ++k) s += A[row][k] * B[k][col];
    d[r] = static_cast<float>(double(d[r]) + s);
  }
}

inline uint32_t shared_address(const void* p) { return ws_emu::shared_address(p); }

template <typename V>
inline V emu_lds(uint32_t address) {
  if (address % sizeof(V) != 0) ws_emu::fail("a misaligned shared load");
  V v;
  std::memcpy(&v, ws_emu::shared_pointer(address), sizeof v);
  return v;
}
inline uint32_t lds_u32(uint32_t address) { return emu_lds<uint32_t>(address); }
inline float lds_f32(uint32_t address) { return emu_lds<float>(address); }
inline uint32_t lds_u16(uint32_t address) { return emu_lds<uint16_t>(address); }
inline uint2 lds_u64(uint32_t address) {
  const uint64_t v = emu_lds<uint64_t>(address);
  return make_uint2(static_cast<uint32_t>(v), static_cast<uint32_t>(v >> 32));
}
inline uint4 lds_u128(uint32_t address) { return emu_lds<uint4>(address); }

// An unspecified register: NaN in both halves, so a value that should never reach a stored output shows if it does.
inline uint32_t unspecified() { return 0x7fff7fffu; }

// ldmatrix.m8n8.x4.b16: lane 8 j + r hands the address of row r of matrix j (16 bytes, 16-byte aligned); lane l gets
// word l % 4 of row l / 4 of matrix j in r[j].
inline void ldmatrix_x4(uint32_t address, uint32_t (&r)[4]) {
  emu_whole_warp();
  const int lane = ws_emu::linear_thread() % 32;
  ws_emu::warp_collective(&address, sizeof address, [&](auto slot) {
    for (int j = 0; j < 4; ++j) {
      uint32_t row;
      std::memcpy(&row, slot(8 * j + lane / 4), 4);
      if (row % 16 != 0) ws_emu::fail("ldmatrix: a row address not 16-byte aligned");
      r[j] = emu_lds<uint32_t>(row + 4 * (lane % 4));
    }
  });
}

inline void cp_async16_zfill(uint32_t dst, const void* src, bool copy) {
  if (dst % 16 != 0 || (copy && reinterpret_cast<uintptr_t>(src) % 16 != 0)) {
    ws_emu::fail("cp.async of 16 bytes: a misaligned address");
  }
  ws_emu::cp_async_push([dst, src, copy] {
    void* to = ws_emu::shared_pointer(dst);
    if (copy) {
      std::memcpy(to, src, 16);
    } else {
      std::memset(to, 0, 16);
    }
  });
}
inline void cp_async16(uint32_t dst, const void* src) { cp_async16_zfill(dst, src, true); }
inline void cp_async_commit() { ws_emu::cp_async_commit(); }
template <int N>
inline void cp_async_wait() {
  ws_emu::cp_async_wait(N);
}

}  // namespace weightshare::cuda
