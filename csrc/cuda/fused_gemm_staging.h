#pragma once
// What the two fused GEMM kernels of shared_linear (shared_linear_gemm_mma.cu: mma.sync; shared_linear_gemm_wgmma.cu:
// wgmma) share: the per-thread staging of a block's packed indices into table codes (fused_gemm_layout.h), the
// replicated tables, the launch arguments, and the host's shape rules and split-K choice.
#include <ATen/core/Tensor.h>

#include <atomic>
#include <cstdint>

#include "weightshare/cuda_linear.h"
#include "weightshare/fused_gemm_layout.h"
#include "weightshare/implicit_conv.h"
#include "mma_ptx.h"

namespace weightshare::cuda {

struct FusedArgs {
  PackedRows w;
  const void* x;  // T [M, kin], 16-byte aligned
  int64_t units, units_per_split;
  int64_t mblocks;  // blocks along the rows of x: blockIdx.x = output block * mblocks + x block (neighbours share W)
  Epilogue out;
  ConvGeometry conv;  // the implicit-GEMM conv's kernel only: x is [N, H, W, C], its rows the output pixels
};

// One thread's share of staging a block's packed indices: items (block row, quarter of a 128-index unit) of layout L
// (a FusedGemmLayout), loaded into registers a unit ahead and stored as codes. A row past N repeats the last one
// (loaded, its outputs never stored).
template <typename L, int BITS>
struct IndexStager {
  const uint32_t* src[L::kItems];
  uint32_t words[L::kItems][BITS];

  __device__ __forceinline__ IndexStager(const PackedRows& w, int64_t n0, int tid) {
#pragma unroll
    for (int v = 0; v < L::kItems; ++v) {
      const int64_t n = min(n0 + L::item_row(tid, v), w.N - 1);
      src[v] = w.packed + n * w.row_words + L::item_quarter(tid, v) * BITS;
    }
  }
  // Unit u's BITS words of each item (u * 4 BITS words into the row). Whole units only (kin % 128 == 0, rows 16-byte
  // aligned: fused_shape_ok), so no bounds, and widths with 4 | BITS (2 | BITS) read 16 (8) bytes at a time.
  __device__ __forceinline__ void load(int64_t u) {
#pragma unroll
    for (int v = 0; v < L::kItems; ++v) {
      const uint32_t* p = src[v] + u * (4 * BITS);
      if constexpr (BITS % 4 == 0) {
#pragma unroll
        for (int i = 0; i < BITS / 4; ++i) {
          const uint4 q = __ldg(reinterpret_cast<const uint4*>(p) + i);
          words[v][4 * i] = q.x;
          words[v][4 * i + 1] = q.y;
          words[v][4 * i + 2] = q.z;
          words[v][4 * i + 3] = q.w;
        }
      } else if constexpr (BITS % 2 == 0) {
#pragma unroll
        for (int i = 0; i < BITS / 2; ++i) {
          const uint2 q = __ldg(reinterpret_cast<const uint2*>(p) + i);
          words[v][2 * i] = q.x;
          words[v][2 * i + 1] = q.y;
        }
      } else {
#pragma unroll
        for (int i = 0; i < BITS; ++i) words[v][i] = __ldg(p + i);
      }
    }
  }
  // The loaded unit's codes into `buffer` (L::kCodeBufferWords words, 16-byte aligned).
  __device__ __forceinline__ void store(uint32_t* buffer, int tid) const {
    constexpr int CW = L::kCodeWords;
#pragma unroll
    for (int v = 0; v < L::kItems; ++v) {
      const int row = L::item_row(tid, v);
      uint32_t out[8 * CW];
      L::quarter_codes(words[v], row, out);
      uint4* dst = reinterpret_cast<uint4*>(buffer + L::code_word(row, 2 * L::item_quarter(tid, v), 0));
#pragma unroll
      for (int i = 0; i < 2 * CW; ++i) dst[i] = make_uint4(out[4 * i], out[4 * i + 1], out[4 * i + 2], out[4 * i + 3]);
    }
  }
};

// A lane's code words at step s for its A fragment's rows: block rows `row` (c0) and row + 8 (c1), column t, from
// the code buffer at shared address cbuf (one 4-byte or 8-byte load each: conflict-free, fused_gemm_layout.h).
template <typename L>
__device__ __forceinline__ void load_codes(uint32_t cbuf, int row, int s, int t, uint32_t (&c0)[L::kCodeWords],
                                           uint32_t (&c1)[L::kCodeWords]) {
  if constexpr (L::kCodeWords == 1) {
    c0[0] = lds_u32(cbuf + 4 * L::code_word(row, s, t));
    c1[0] = lds_u32(cbuf + 4 * L::code_word(row + 8, s, t));
  } else {
    const uint2 v0 = lds_u64(cbuf + 4 * L::code_word(row, s, t));
    const uint2 v1 = lds_u64(cbuf + 4 * L::code_word(row + 8, s, t));
    c0[0] = v0.x;
    c0[1] = v0.y;
    c1[0] = v1.x;
    c1[1] = v1.y;
  }
}

// Unit u's tile of x (ROWS rows from m0, 128 values = 16 chunks of 16 bytes each) by cp.async into the stage at
// shared address `stage`, chunk c of tile row r at byte place(r, c). Rows past M repeat row M - 1 (their outputs
// are never stored).
template <typename T, int THREADS, int ROWS, typename Place>
__device__ __forceinline__ void load_x_tile(uint32_t stage, const T* x, int64_t m0, int64_t M, int64_t kin, int64_t u,
                                            int tid, Place place) {
  static_assert(ROWS * 16 % THREADS == 0, "whole copies per thread");
#pragma unroll
  for (int v = 0; v < ROWS * 16 / THREADS; ++v) {
    const int c = tid + v * THREADS, row = c >> 4, chunk = c & 15;
    const int64_t m = min(m0 + row, M - 1);
    cp_async16(stage + place(row, chunk), x + m * kin + u * 128 + 8 * chunk);
  }
}

// The implicit-GEMM conv's form of load_x_tile (implicit_conv.h): row r of the tile is output pixel m0 + r, whose
// origin the block keeps in origins[r]; chunk c of unit u is the 8 channels of reduction positions 128 u + 8 c, one
// tap of that pixel, copied from x or zero-filled (padding, past K, rows past the pixels).
template <typename T, int THREADS, int ROWS, typename Place>
__device__ __forceinline__ void load_conv_tile(uint32_t stage, const T* x, const ConvGeometry& g,
                                               const PixelOrigin* origins, int64_t u, int tid, Place place) {
  static_assert(ROWS * 16 % THREADS == 0 && THREADS % 16 == 0, "whole copies per thread, one chunk column each");
  const int chunk = tid & 15;  // the same for each of this thread's copies: one tap per unit
  const ConvTap tap = conv_tap(g, static_cast<int32_t>(u * 128 + 8 * chunk));
#pragma unroll
  for (int v = 0; v < ROWS * 16 / THREADS; ++v) {
    const int row = (tid + v * THREADS) >> 4;
    const int64_t offset = tap_offset(g, origins[row], tap);
    cp_async16_zfill(stage + place(row, chunk), offset >= 0 ? x + offset : x, offset >= 0);
  }
}

// The block's replicated table (L::kTableWords words) from codebook `group` in x's dtype T, through `values`
// (2**BITS 16-bit entries of shared memory). Ends with the table written by this thread, not yet published.
template <typename L, typename T, int BITS>
__device__ __forceinline__ void stage_table(const PackedRows& w, int64_t group, uint16_t* values, uint32_t* tab,
                                            int tid) {
  for (int i = tid; i < (1 << BITS); i += L::kThreads) values[i] = bits_of(from_float<T>(codebook_entry(w, group, i)));
  __syncthreads();
  for (int i = tid; i < L::kTableWords; i += L::kThreads) tab[i] = L::table_word(values, i >> 5);
}

// ROWS layouts: each block row's own table (its row's codebook, rows past N repeating the last one), 2**BITS
// halfwords per row. Not yet published.
template <typename L, typename T, int BITS>
__device__ __forceinline__ void stage_row_tables(const PackedRows& w, int64_t n0, uint32_t* tab, int tid) {
  uint16_t* entries = reinterpret_cast<uint16_t*>(tab);
  for (int i = tid; i < L::kBlockOut << BITS; i += L::kThreads) {
    const int64_t n = min(n0 + (i >> BITS), w.N - 1);
    entries[i] = bits_of(from_float<T>(codebook_entry(w, n / w.rows_per_group, i & ((1 << BITS) - 1))));
  }
}

// WS_CUDA_LINEAR, read per call: "fused" / "wgmma" ask for that fused GEMM wherever it can take a call (any number
// of rows); "panels" / "tiles" refuse both; otherwise (unset) each takes the calls of at least kFusedDefaultFirstM
// rows it can, the wgmma form first.
enum class FusedAsk { Mma, Wgmma, Refused, Default };
FusedAsk fused_ask();
// Disabled (no default call takes them) until a GPU run has measured them: the first H200 run sets it to where they
// overtake the tensor-core GEMV and the panels (bench_shared_linear.py --cuda times every path per batch).
constexpr int64_t kFusedDefaultFirstM = INT64_MAX;

// The fused kernels' epilogue: Epilogue::put unrolled for them (y in x's dtype T, launch_fused checks it), with one
// bias load per output row instead of one per element (through put, a thread's 128 outputs cost ~1700
// instructions: a dtype switch and a bias load each).
__device__ __forceinline__ float row_bias(const Epilogue& out, int64_t n) {  // 0 where split-K's finaliser adds it
  return out.splits == 1 && out.bias != nullptr ? out.bias_at(n) : 0.0f;
}
template <typename T>
__device__ __forceinline__ void put_output(const Epilogue& out, int64_t m, int64_t n, float v, float bias) {
  if (out.splits == 1) {
    static_cast<T*>(out.y)[m * out.ld + n] = from_float<T>(out.bias != nullptr ? v + bias : v);  // as finish
  } else {
    static_cast<float*>(out.partial)[(int64_t(blockIdx.y) * out.M + m) * out.ld + n] = v;
  }
}

// The shape rules of both fused kernels: 16-bit x whose data is 16-byte aligned, in_features a multiple of 128,
// a 16-byte aligned packed tensor (its rows then are too).
bool fused_shape_ok(const at::Tensor& x, const at::Tensor& packed, int64_t M, int64_t in_features);
// Whether every block of block_out output rows has one codebook (else the ROWS layouts).
inline bool one_codebook_per_block(int64_t out_features, int64_t rows_per_group, int64_t block_out) {
  return rows_per_group == out_features || rows_per_group % block_out == 0;
}

// 8-row tiles of x per warp for M rows of x (blocks of 32, 64 or 128 rows).
inline int tiles_n_for(int64_t M) { return M <= 32 ? 2 : (M <= 64 ? 4 : 8); }

// Splits of the units when the blocks alone leave block slots of the GPU empty (shared_linear_gemm_mma.cu).
int choose_splits(int64_t blocks, int64_t units, int64_t slots);

// Waves of `blocks` blocks of a kernel that holds `per_sm` blocks per SM -> FusedArgs' split fields and the
// workspace of `out` (returned: keep it alive across the launch).
at::Tensor plan_splits(FusedArgs& a, int64_t blocks, int per_sm, int sms, const at::Tensor& like);

// Launches one fused kernel: y = x W^T over blocks of block_out output rows x block_batch rows of x, split-K as
// plan_splits chooses, then the finaliser. Once per kernel and device: its opt-in to `smem` bytes of dynamic shared
// memory (above the default 48 KiB) and how many of its blocks an SM holds (the split choice counts block slots).
// `conv`: the implicit-GEMM conv's geometry (out.M = its output pixels).
template <auto KERNEL>
void launch_fused(const PackedRows& w, const at::Tensor& x, const Epilogue& out, int threads, int smem,
                  int64_t block_out, int64_t block_batch, int sms, const ConvGeometry& conv = {}) {
  WS_CHECK_VALUE(out.kind == out_kind(x.scalar_type()), "weightshare: the fused GEMMs write y in x's dtype");
  static std::atomic<int> slots_per_sm[64];
  const int device = x.get_device();
  int per_sm = device < 64 ? slots_per_sm[device].load(std::memory_order_relaxed) : 0;
  if (per_sm == 0) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(KERNEL, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, KERNEL, threads, smem));
    WS_CHECK_VALUE(per_sm > 0, "weightshare: a fused shared_linear kernel does not fit on this GPU");
    if (device < 64) slots_per_sm[device].store(per_sm, std::memory_order_relaxed);
  }
  FusedArgs a{};
  a.w = w;
  a.x = x.data_ptr();
  a.units = w.kin / 128;
  a.mblocks = ceil_div(out.M, block_batch);
  a.out = out;
  a.conv = conv;
  const int64_t blocks = ceil_div(w.N, block_out) * a.mblocks;
  const at::Tensor workspace = plan_splits(a, blocks, per_sm, sms, x);  // alive until the launch is queued
  KERNEL<<<dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(a.out.splits)), threads, smem, stream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  finalize(a.out, false);
}

}  // namespace weightshare::cuda
