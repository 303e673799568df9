#pragma once
// The data layout of the fused tensor-core GEMM of shared_linear (csrc/cuda/shared_linear_gemm_mma.cu): where each
// packed index, each activation and each table entry sits in shared memory, and which lane of a warp reads it. Kept
// apart from the kernel, host-callable, so that tests/native/fused_gemm_layout_check.cpp can run one block's whole
// data flow on the CPU (with the PTX semantics of ldmatrix and mma.m16n8k16 written out there) and check it against
// a plain matmul: CI has no GPU.
//
// The product. y [M, N] = x [M, K] W^T with W = table[idx]. In mma.m16n8k16 terms A = W (16 output rows x 16 k,
// decoded straight into registers), B = x^T (16 k x 8 rows of x, by ldmatrix from shared memory), D = y^T tiles in
// fp32. W as A lets one decoded fragment feed every 8-row tile of x a warp holds (kTilesN of them).
//
// Blocks and warps. A block owns kBlockOut output rows x kBlockBatch rows of x and runs 8 warps: 4 along the output
// rows (kTilesM 16-row tiles each) x 2 along x (kTilesN 8-row tiles each). K advances a 128-index unit at a time.
//
// Indices become "codes" once per block and unit. The mma's A fragment gives lane (g, t) = (lane / 4, lane % 4) the
// k pairs {2t, 2t+1} and {2t+8, 2t+9} of rows g and g+8 of its tile: index pairs, never single indices. So a
// staging pass turns the unit's packed indices (any width) into, per row, 16-bit table byte offsets already
// ordered for those lanes. BITS <= 4 ("pair" tables): one code per index pair, (i0 | i1 << BITS) << 7 | lane << 2,
// into a table of all 2**(2 BITS) pairs as half2, replicated 32 times so that lane l only ever reads bank l.
// BITS 5-8 ("single" tables): one code per index, idx << 7 | lane << 2, into a replicated table of single entries
// (a 32-bit word each, the value in its low half). A code already carries its reader's lane, so decoding a 32-bit
// half2 of A is one mask or shift, an add of the table's base, and a conflict-free 4-byte load.
//
// Activations. Each unit's x tile is kBlockBatch rows x 128 values (256 bytes a row), written by cp.async in
// 16-byte chunks: chunk c of row r sits at chunk c ^ (r & 7), so the 8 row addresses of every ldmatrix land in
// 8 different bank groups.
#include <cstdint>

#include "weightshare/macros.h"
#include "weightshare/packing.h"

namespace weightshare {

// ROWS: a codebook per output row (or any groups that do not cover whole blocks): one 16-bit table per block row,
// not replicated (2**BITS x 256 rows would not fit), codes (row * 2**BITS + idx) << 1, the byte offset of the entry;
// lookups are 2-byte loads that may meet in a bank (8 rows' tables per warp load).
//
// TM: 16-row tiles of W per warp where a layer has fewer output rows than the default block (the implicit-GEMM
// conv: 64 or 128 output channels are common): 0 = the default (4 with pair codes, 2 with single codes); 1 or 2
// make blocks of 64 or 128 output rows, so that their rows past the layer's are not computed for nothing.
template <int BITS, int NT, bool ROWS = false, int TM = 0>
struct FusedGemmLayout {
  static_assert(BITS >= 1 && BITS <= 8, "1 to 8 bits");
  static_assert(NT == 2 || NT == 4 || NT == 8, "8-row tiles of x per warp: ldmatrix.x4 takes two at a time");
  static constexpr bool kPair = !ROWS && BITS <= 4;
  static constexpr int kWarpsOut = 4, kWarpsBatch = 2, kWarps = kWarpsOut * kWarpsBatch, kThreads = 32 * kWarps;
  // 16-row tiles of W per warp: 4 with pair codes (one 4-byte load per half2), 2 with single codes (two per half2)
  static constexpr int kDefaultTilesM = kPair ? 4 : 2;
  static_assert(TM == 0 || ((TM == 1 || TM == 2) && TM < kDefaultTilesM), "fewer tiles than the default only");
  static constexpr int kTilesM = TM != 0 ? TM : kDefaultTilesM;
  static constexpr int kTilesN = NT;
  static constexpr int kWarpOut = 16 * kTilesM, kWarpBatch = 8 * kTilesN;
  static constexpr int kBlockOut = kWarpsOut * kWarpOut;        // 256 or 128 (TM: 64 or 128)
  static constexpr int kBlockBatch = kWarpsBatch * kWarpBatch;  // 32, 64 or 128
  static constexpr int kUnitK = 128;
  static constexpr int kSteps = kUnitK / 16;  // k16 steps per unit

  // ---- codes: per block row, for each step s and lane column t, kCodeWords 32-bit words: pair codes
  // {code(chunk 2s, t), code(chunk 2s + 1, t)} (the A registers a0/a1 and a2/a3), single codes
  // {idx(2s, 2t), idx(2s, 2t+1)}, {idx(2s+1, 2t), idx(2s+1, 2t+1)}. Rows padded to kCodePitch words so that the 32
  // lanes of a warp's load (rows g, 8-aligned base; column t; one step) hit 32 different banks (4-byte loads) or
  // 16 different bank pairs per half warp (8-byte loads).
  static constexpr int kCodeWords = kPair ? 1 : 2;
  static constexpr int kCodePitch = kSteps * 4 * kCodeWords + (kPair ? 4 : 8);  // 36 or 72 words
  static constexpr int kCodeBufferWords = kBlockOut * kCodePitch;
  WS_HD static int code_word(int row, int s, int t) { return row * kCodePitch + (4 * s + t) * kCodeWords; }

  // ---- staging: the unit's packed words of a block row are read a quarter (32 indices, BITS words) at a time;
  // thread `tid` stages items tid + kThreads * v, item = (row, quarter).
  static constexpr int kItems = kBlockOut * 4 / kThreads;  // 4 or 2 (TM: 1 or 2)
  static_assert(kItems * kThreads == 4 * kBlockOut, "whole items per thread, every (row, quarter) once");
  static_assert(TM == 0 || kBlockOut == 64 * TM, "TM tiles of 16 rows per warp, 4 warps along the rows");
  WS_HD static int item_row(int tid, int v) { return (tid + kThreads * v) >> 2; }
  WS_HD static int item_quarter(int tid, int v) { return (tid + kThreads * v) & 3; }
  // The lane that reads a block row's codes in column t: rows g and g + 8 of every 16-row tile go to lanes 4 g + t.
  WS_HD static uint32_t lane_of(int row, int t) { return static_cast<uint32_t>(4 * (row & 7) + t); }
  // Quarter q of block row `row` (w: its BITS packed words) -> the code words it owns, out[0 .. 8 kCodeWords), stored
  // from word code_word(row, 2 q, 0): the quarter holds chunks 4q .. 4q + 3 of 8 indices = steps 2q and 2q + 1.
  WS_HD static void quarter_codes(const uint32_t* w, int row, uint32_t* out) {
    for (int a = 0; a < 2; ++a) {      // step 2q + a: chunks 2a and 2a + 1 of the quarter
      for (int t = 0; t < 4; ++t) {
        const uint32_t lane = lane_of(row, t) << 2;
        if constexpr (kPair) {
          const uint32_t c0 = field_at<2 * BITS, 7>(w, 4 * (2 * a) + t) | lane;
          const uint32_t c1 = field_at<2 * BITS, 7>(w, 4 * (2 * a + 1) + t) | lane;
          out[4 * a + t] = c0 | (c1 << 16);
        } else {
          for (int h = 0; h < 2; ++h) {  // chunk 2a + h: indices 8 (2a + h) + 2t and + 1
            const int e = 8 * (2 * a + h) + 2 * t;
            uint32_t i0, i1;
            if constexpr (ROWS) {
              const uint32_t table = static_cast<uint32_t>(row) << (BITS + 1);
              i0 = field_at<BITS, 1>(w, e) | table;
              i1 = field_at<BITS, 1>(w, e + 1) | table;
            } else {
              i0 = field_at<BITS, 7>(w, e) | lane;
              i1 = field_at<BITS, 7>(w, e + 1) | lane;
            }
            out[2 * (4 * a + t) + h] = i0 | (i1 << 16);
          }
        }
      }
    }
  }

  // ---- tables: kTableEntries entries x 32 lanes of 4 bytes; entry p of lane l at byte (p << 7) | (l << 2).
  // ROWS: 2**BITS 16-bit entries per block row, row r's entry e at byte (r << (BITS + 1)) | (e << 1).
  static constexpr int kTableEntries = kPair ? (1 << (2 * BITS)) : (1 << BITS);
  static constexpr int kTableWords = ROWS ? kBlockOut * (1 << BITS) / 2 : kTableEntries * 32;
  static_assert(!ROWS || kBlockOut * (2 << BITS) <= 65536, "ROWS codes are 16-bit byte offsets");
  // The 32-bit word of entry p given the 16-bit values of the codebook in x's dtype (indices >= K: NaN's bits).
  WS_HD static uint32_t table_word(const uint16_t* values, int p) {
    if constexpr (kPair) {
      return uint32_t(values[p & ((1 << BITS) - 1)]) | (uint32_t(values[p >> BITS]) << 16);
    } else {
      return values[p];
    }
  }
  // A fragment registers {a0, a1, a2, a3} (rows g / g+8 x k pairs {2t, 2t+1} / {2t+8, 2t+9}) from the code words
  // of rows g (c0) and g + 8 (c1) at one step; lds(byte offset) reads the table.
  template <typename Lds>
  WS_HD static void decode_a(const uint32_t (&c0)[kCodeWords], const uint32_t (&c1)[kCodeWords], Lds lds,
                             uint32_t (&a)[4]) {
    if constexpr (kPair) {
      a[0] = lds(c0[0] & 0xffffu);
      a[2] = lds(c0[0] >> 16);
      a[1] = lds(c1[0] & 0xffffu);
      a[3] = lds(c1[0] >> 16);
    } else {
      a[0] = lds(c0[0] & 0xffffu) | (lds(c0[0] >> 16) << 16);
      a[2] = lds(c0[1] & 0xffffu) | (lds(c0[1] >> 16) << 16);
      a[1] = lds(c1[0] & 0xffffu) | (lds(c1[0] >> 16) << 16);
      a[3] = lds(c1[1] & 0xffffu) | (lds(c1[1] >> 16) << 16);
    }
  }

  // ---- the x tile: kBlockBatch rows of 16 chunks (16 bytes, 8 values each), swizzled.
  static constexpr int kXBytes = kBlockBatch * 256;
  static constexpr int kXChunks = kBlockBatch * 16;  // cp.async copies per unit
  WS_HD static int x_chunk_slot(int row, int c) { return row * 16 + (c ^ (row & 7)); }
  // The chunk slot lane `lane` of batch warp wb hands ldmatrix.x4 for 8-row tiles (2 jj, 2 jj + 1) at step s:
  // matrices {tile 2jj, chunk 2s}, {2jj, 2s+1}, {2jj+1, 2s}, {2jj+1, 2s+1} = B registers b0, b1 of both tiles.
  WS_HD static int ldmatrix_slot(int lane, int wb, int jj, int s) {
    const int m = lane >> 3, r = lane & 7;
    const int row = wb * kWarpBatch + 8 * (2 * jj + (m >> 1)) + r;
    return x_chunk_slot(row, 2 * s + (m & 1));
  }

  // ---- shared memory: tables, two code buffers, kStages x tiles: 3 stages where they fit in the 227 KiB of an
  // H100/H200 block (with the 2**BITS halfwords of static staging), else 2 (per-row tables at 8 bits)
  static constexpr int kFixedBytes = 4 * (kTableWords + 2 * kCodeBufferWords);
  static constexpr int kStages = kFixedBytes + 3 * kXBytes + (2 << BITS) <= 227 * 1024 ? 3 : 2;
  static constexpr int kSmemBytes = kFixedBytes + kStages * kXBytes;
};

// The wgmma form (shared_linear_gemm_wgmma.cu, sm_90a): the same block rows, codes and tables as
// FusedGemmLayout<BITS, 8> (256 output rows with pair codes, 128 with single codes), but 2 warpgroups of 4 warps,
// warpgroup w owning block rows [64 TILES w, 64 TILES (w + 1)) as TILES 64-row wgmma tiles (2 with pair codes, 1
// with single ones), warp j of a warpgroup rows 16 j + {g, g + 8} of each tile; and NB rows of x per block (the
// wgmma's N), which the tensor cores read from shared memory themselves. There x sits K-major in the 128-byte
// swizzle the descriptor names: a unit's tile is two halves of 64 k; in a half, row r's 128 bytes start at 128 r
// and its 16-byte chunk c sits at chunk c ^ (r & 7) (8 rows make one 1024-byte atom, atoms consecutive along the
// rows).
template <int NB, int TILES>
struct WgmmaTileLayout {
  static_assert(NB == 64 || NB == 128, "the wgmma widths instantiated");
  static_assert(TILES == 1 || TILES == 2, "64-row tiles per warpgroup");
  static constexpr int kTiles = TILES, kBlockOut = 2 * 64 * TILES;
  static constexpr int kThreads = 256;
  static constexpr int kStageBytes = NB * 256;  // a multiple of 1024: every stage starts an atom
  static constexpr int kChunks = NB * 16;       // cp.async copies per unit
  static constexpr int kStages = 3;
  // Byte offset in a stage of 16-byte chunk c (k 8c .. 8c + 8 of the unit) of row r.
  WS_HD static int chunk_byte(int row, int c) { return (c >> 3) * NB * 128 + row * 128 + (((c & 7) ^ (row & 7)) << 4); }
  // The descriptor's start (byte offset in the stage) for k16 step s: its half, then 32 bytes per step inside the atom.
  WS_HD static int step_start(int s) { return (s >> 2) * NB * 128 + (s & 3) * 32; }
  static constexpr int kAtomStride = 1024;  // the descriptor's stride byte offset
  // The block row of warp j of warpgroup wg in 64-row tile i, fragment row g (+8 when h).
  WS_HD static int block_row(int wg, int i, int j, int g, int h) {
    return 64 * TILES * wg + 64 * i + 16 * j + g + 8 * h;
  }
};

// The shared-memory matrix descriptor of a K-major operand in the 128-byte swizzle: rows of 64 16-bit values (128
// bytes), 8 rows to a 1024-byte atom (whose address must be 1024-byte aligned), atoms `stride` bytes apart along the
// rows. Fields (PTX ISA, "Matrix Descriptor Format"): start address >> 4 in bits 0-13, leading-dimension byte offset
// >> 4 in 16-29 (unused by swizzled K-major layouts: 1), stride-dimension byte offset >> 4 in 32-45, base offset 0 in
// 49-51, layout type in 62-63 (1: 128-byte swizzle). A k16 step inside the atom's 64 values adds 32 bytes to the start.
WS_HD uint64_t sw128_descriptor(uint32_t shared_address, uint32_t stride) {
  return uint64_t((shared_address & 0x3ffffu) >> 4) | (uint64_t(1) << 16) | (uint64_t((stride & 0x3ffffu) >> 4) << 32) |
         (uint64_t(1) << 62);
}

// The wgmma layout of a width: two 64-row tiles per warpgroup with pair codes (256-row blocks), one with single
// codes (128), so that its block rows are FusedGemmLayout<BITS, 8>'s.
template <int BITS, int NB>
using WgmmaLayoutFor = WgmmaTileLayout<NB, FusedGemmLayout<BITS, 8>::kPair ? 2 : 1>;

}  // namespace weightshare
