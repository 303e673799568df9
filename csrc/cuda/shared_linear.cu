// CUDA shared_linear (float and int8 activations) and shared_linear_backward: W [N, Kin] is read only in its packed
// form (packing.h) and decoded on the fly through per-group tables; the dense W is never materialised.
//
// Paths (the 16-bit thresholds measured on the H200, 2026-11-30; the fp32 and int8 ones first guesses):
//  * gemv_kernel, few rows of x (float: M <= 16 for fp32 x, <= 8 for fp16/bf16 that the tensor-core GEMV does not
//    take, so 1 row by default; int8: M <= 16): 8 warps per block,
//    each warp owns 2 output rows and walks them 256 indices at a time, lane l taking indices [8 l, 8 l + 8)
//    (LaneSpan, packing.h), so a warp's loads of x are one contiguous run and its index loads consecutive words;
//    codebooks in per-warp shared tables (float: staged straight from the codebook, so a float call of few rows is
//    one launch); each decoded weight is applied to up to 8 rows of x (read through L1; grid.z takes further groups
//    of 8 rows); fp32 FMA or dp4a; warp-shuffle reduction. Split-K over grid.y when the rows alone do not fill the
//    GPU. The first layout (a lane per 128 consecutive indices) made every warp load of x touch 32 cache lines: the
//    H200 run of 2026-11-30 found it L1-bound (ncu: L1 86 % busy, DRAM 19 %) at 1.08x cuBLAS for batch 1; this
//    layout ran 1.46-1.67x cuBLAS there (fp16, 8192 and 28672 x 8192, 4 and 2 bits), bound by its instructions
//    (ncu: SM 70 %, L1 66 %, DRAM 29 %, 64 registers, one wave of 4 blocks per SM). Since then, not yet run on a
//    GPU: the x-alignment flag as a template parameter (XV), lookups addressed by OR (entry_address) and spans
//    loaded without bounds checks where they lie inside the row cut the fp16 4-bit batch-1 loop from 995 to 673
//    SASS instructions per 128 weights (5.3 per weight: shift, LOP3, LDS, FFMA, half an fp16 conversion, 0.8 other).
//    Its byte-table form (BYTES; 2 and 4 bits, a codebook per block; kGemvBytesDefault: WS_CUDA_GEMV=bytes until a GPU
//    run has timed it) looks each index *byte* up at once: a 256-entry table of the 2 (4 bits) or 4 (2 bits) fp32
//    weights a byte stands for, replicated so that the lanes of one shared-memory transaction read distinct banks. A
//    PRMT, a LEA
//    and one 8- or 16-byte load per byte instead of a shift, a LOP3 and a load per weight: SASS per 128 weights
//    (fp16, batch 1) 673 -> 481 at 4 bits, 672 -> 401 at 2 bits. Same products in the same order: bit-identical.
//  * the tensor-core GEMV (shared_linear_gemv_mma.cu) for fp16/bf16 x of 2 to 16 rows (gemv_mma_takes), so 16-bit x
//    takes the SIMT GEMV at 1 row only.
//  * WS_CUDA_LINEAR=fused: the fused tensor-core GEMM (shared_linear_gemm_mma.cu) for fp16/bf16 x of any number of
//    rows where its shape rules allow (gemm_mma_takes); not yet run on a GPU, so taken only when asked.
//    WS_CUDA_LINEAR=wgmma: its Hopper form (shared_linear_gemm_wgmma.cu; sm_90a builds), likewise.
//  * forward with more rows (float activations): decoded panels + cuBLAS (shared_linear_panels.cu), unless
//    WS_CUDA_LINEAR=tiles selects the tile kernel below (the int8 forward and the backward always use tiles),
//    =panels the panels even where a fused GEMM would take the call by default.
//  * forward_tile_kernel / grad_x_tile_kernel / grad_w_tile_kernel, many rows: 64x64 output tiles, 128 threads,
//    reduction steps of 64. Each step decodes a 64x64 W tile once into shared memory (one 32-index chunk per
//    thread) and multiplies it with a 64x64 tile of x / grad_out: tensor cores (wmma, fp32 accumulate) for
//    fp16/bf16, fp32 FMA for fp32 (exact products), dp4a for int8. The next step's global data is loaded into
//    registers while the current one computes. Split-K over grid.z when the tiles are few.
// Split-K partial sums go to an fp32 (int32 for int8) workspace that finalize_kernel reduces in a fixed order, so
// results are deterministic; grad_codebook alone accumulates with float atomics (order-dependent rounding).
// Nothing here synchronises with the host: every op is capturable in a CUDA graph.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <string_view>
#include <type_traits>

#include "weightshare/checks.h"
#include "weightshare/cuda_decode.h"
#include "weightshare/cuda_linear.h"
#include "weightshare/cuda_utils.h"
#include "weightshare/dispatch.h"
#include "weightshare/packing.h"
#include "shared_linear_gemm_mma.h"
#include "shared_linear_gemm_wgmma.h"
#include "shared_linear_gemv_mma.h"
#include "shared_linear_panels.h"
#include "shared_linear_tables.h"
#include "mma_ptx.h"

namespace weightshare {
namespace {

using namespace cuda;  // the device helpers and tile building blocks of cuda_decode.h

constexpr int kGemvWarps = 8;
constexpr int kGemvRows = 2;    // output rows per warp: each loaded x value feeds both
constexpr int kGemvMaxMT = 8;   // x rows per GEMV block
constexpr int kSpan = LaneSpan<1>::kSpan;  // indices of a row per GEMV warp step (packing.h)

// The byte table (BYTES): entry b (a byte of packed indices) holds the 8 / BITS fp32 weights of its indices, one copy
// per lane of a shared-memory transaction: 128 bytes per entry (16 copies of 8 bytes at 4 bits, 8 of 16 at 2 bits,
// the lanes of a half- or quarter-warp each in their own banks), 32 KB in all.
constexpr int kByteEntryBytes = 128;
constexpr int kByteTableFloats = 256 * kByteEntryBytes / 4;
template <int BITS>
constexpr bool byte_table_bits() { return BITS == 2 || BITS == 4; }


// One block per row of x: max|x| (NaN-propagating, as torch.amax), then the int8 row, zero padded to kp bytes (a
// multiple of kSpan, so the int8 GEMV reads whole spans without bounds checks).
template <typename T>
__global__ void __launch_bounds__(256) quantize_rows_kernel(const T* __restrict__ x, int64_t M, int64_t kin,
                                                            int64_t kp, int8_t* __restrict__ xq, float* sx,
                                                            long long* xsum) {
  __shared__ float red[8];
  __shared__ long long red_sum[8];
  for (int64_t m = blockIdx.x; m < M; m += gridDim.x) {
    const T* row = x + m * kin;
    float amax = 0.0f;
    for (int64_t k = threadIdx.x; k < kin; k += blockDim.x) amax = nan_max(amax, fabsf(to_float(row[k])));
    for (int off = 16; off > 0; off >>= 1) amax = nan_max(amax, __shfl_xor_sync(0xffffffffu, amax, off));
    __syncthreads();  // red is free (previous row done with it)
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = amax;
    __syncthreads();
    for (int w = 0; w < int(blockDim.x >> 5); ++w) amax = nan_max(amax, red[w]);
    const float s = int8_scale(amax);
    long long sum = 0;  // of the row's int8 values: the zero points' term multiplies it
    for (int64_t k4 = 4 * int64_t(threadIdx.x); k4 < kp; k4 += 4 * int64_t(blockDim.x)) {
      int q[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) q[e] = k4 + e < kin ? quantize_int8(to_float(row[k4 + e]), s) : 0;
      sum += q[0] + q[1] + q[2] + q[3];
      *reinterpret_cast<int*>(xq + m * kp + k4) = pack4_s8(q[0], q[1], q[2], q[3]);
    }
    for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    if ((threadIdx.x & 31) == 0) red_sum[threadIdx.x >> 5] = sum;
    __syncthreads();
    if (threadIdx.x == 0) {
      long long total = 0;
      for (int w = 0; w < int(blockDim.x >> 5); ++w) total += red_sum[w];
      sx[m] = s;
      xsum[m] = total;
    }
  }
}

// ----------------------------------------------------------------------------------------------- GEMV
struct GemvArgs {
  PackedRows w;
  const void* x;   // float path: T [M, kin]; int8 path: int8 [M, x_ld] (zero padded)
  int64_t x_ld;
  bool x_vec;      // float path: every x row 16-byte aligned
  int64_t units, units_per_split;
  Epilogue out;
};

template <typename T>
__device__ __forceinline__ void unpack8(const uint4& u, float (&v)[8]) {
  const auto* h = reinterpret_cast<const T*>(&u);
#pragma unroll
  for (int e = 0; e < 8; ++e) v[e] = to_float(h[e]);
}

// x[k .. k+8) as fp32 (16-byte loads when the rows allow).
template <typename T>
__device__ __forceinline__ void load_x8(const T* p, bool vec, float (&v)[8]) {
  if (vec) {
    if constexpr (sizeof(T) == 4) {
      const float4 a = __ldg(reinterpret_cast<const float4*>(p)), b = __ldg(reinterpret_cast<const float4*>(p) + 1);
      v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
    } else {
      unpack8<T>(__ldg(reinterpret_cast<const uint4*>(p)), v);
    }
    return;
  }
#pragma unroll
  for (int e = 0; e < 8; ++e) v[e] = to_float(p[e]);
}

// Shared-memory address of table entry [index e of v] in a float table at `base`, which is aligned to 4 * 2**BITS
// bytes, so the entry's byte offset ORs into it: a shift and one LOP3 (and-or) per lookup, no separate add (the
// compiler's own form: shift, mask, add the table's address).
template <int BITS>
__device__ __forceinline__ uint32_t entry_address(const uint32_t* v, int e, uint32_t base) {
  return field_at<BITS, 2>(v, e) | base;
}

// The lane's 8 indices (v: LaneSpan's bits from bit 0) of both rows against mc (<= MT) rows of x[., k .. k+8);
// tab: the shared address of the rows' float tables (row r's at tab + 4 r 2**BITS). XV: x rows 16-byte aligned (a
// template flag: as a run-time one, both load forms were issued, the unused one predicated off, on every span).
// BYTES: tab is the lane's copy in the byte table (its address + lane % copies * entry bytes) and each of the BITS
// bytes of v gives 8 / BITS weights with one load (byte b moved to bits 7.. by a PRMT and a LEA).
template <typename T, int BITS, int MT, bool XV, bool BYTES>
__device__ __forceinline__ void gemv_lane_float(const uint32_t (&v)[kGemvRows][LaneSpan<BITS>::kWords], uint32_t tab,
                                                const T* x, int64_t x_ld, int mc, int64_t k,
                                                float (&acc)[kGemvRows][MT]) {
  float wv[kGemvRows][8];
#pragma unroll
  for (int r = 0; r < kGemvRows; ++r) {
    if constexpr (BYTES) {
#pragma unroll
      for (int b = 0; b < BITS; ++b) {
        const uint32_t address = tab + (__byte_perm(v[r][0], 0u, 0x4440u + b) << 7);
        if constexpr (BITS == 4) {
          const uint2 u = lds_u64(address);
          wv[r][2 * b] = __uint_as_float(u.x);
          wv[r][2 * b + 1] = __uint_as_float(u.y);
        } else {
          const uint4 u = lds_u128(address);
          wv[r][4 * b] = __uint_as_float(u.x);
          wv[r][4 * b + 1] = __uint_as_float(u.y);
          wv[r][4 * b + 2] = __uint_as_float(u.z);
          wv[r][4 * b + 3] = __uint_as_float(u.w);
        }
      }
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) wv[r][e] = lds_f32(entry_address<BITS>(v[r], e, tab + 4u * r * (1u << BITS)));
    }
  }
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    if (m >= mc) break;
    float xv[8];
    load_x8<T>(x + m * x_ld + k, XV, xv);
#pragma unroll
    for (int r = 0; r < kGemvRows; ++r) {
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[r][m] = fmaf(wv[r][e], xv[e], acc[r][m]);
    }
  }
}

// The int8 twin: the 8 weights as two dp4a operands, 8 int8 activations per load.
template <int BITS, int MT>
__device__ __forceinline__ void gemv_lane_int8(const uint32_t (&v)[kGemvRows][LaneSpan<BITS>::kWords],
                                               const int (*tab)[1 << BITS], const int8_t* xq, int64_t x_ld, int mc,
                                               int64_t k, int (&acc)[kGemvRows][MT]) {
  int wq[kGemvRows][2];
#pragma unroll
  for (int r = 0; r < kGemvRows; ++r) {
#pragma unroll
    for (int d = 0; d < 2; ++d) {
      wq[r][d] = pack4_s8(tab[r][chunk_index<BITS>(v[r], 4 * d)], tab[r][chunk_index<BITS>(v[r], 4 * d + 1)],
                          tab[r][chunk_index<BITS>(v[r], 4 * d + 2)], tab[r][chunk_index<BITS>(v[r], 4 * d + 3)]);
    }
  }
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    if (m >= mc) break;
    const uint2 xv = __ldg(reinterpret_cast<const uint2*>(xq + m * x_ld + k));
#pragma unroll
    for (int r = 0; r < kGemvRows; ++r) {
      acc[r][m] = __dp4a(static_cast<int>(xv.x), wq[r][0], acc[r][m]);
      acc[r][m] = __dp4a(static_cast<int>(xv.y), wq[r][1], acc[r][m]);
    }
  }
}

// The last, partial span of a float row, index by index, the lanes 32 indices apart (short; keeps the hot loop free
// of bounds checks, and keeps the padding bits, which decode to index 0, out of the sums).
template <typename T, int BITS, int MT>
__device__ void gemv_tail_float(const uint32_t* const (&rows)[kGemvRows], const float (*tab)[1 << BITS], const T* x,
                                int64_t x_ld, int mc, int64_t k_first, int64_t kin, float (&acc)[kGemvRows][MT]) {
  for (int64_t k = k_first; k < kin; k += 32) {
    float wv[kGemvRows];
#pragma unroll
    for (int r = 0; r < kGemvRows; ++r) wv[r] = tab[r][unpack_one(reinterpret_cast<const uint8_t*>(rows[r]), k, BITS)];
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if (m >= mc) break;
      const float xv = to_float(x[m * x_ld + k]);
#pragma unroll
      for (int r = 0; r < kGemvRows; ++r) acc[r][m] = fmaf(wv[r], xv, acc[r][m]);
    }
  }
}

// grid: (ceil(N / (8 warps * 2 rows)), splits, ceil(M / MT)). A warp walks its rows' spans (LaneSpan: lane l takes
// indices [8 l, 8 l + 8) of each 256, so the warp's x loads are one contiguous run and its index loads consecutive
// words), kAhead spans' words loaded before the first is used (the bytes in flight that hide HBM latency).
// BYTES: the byte table, staged by the whole block (its rows share one codebook: the host checks) before any warp
// leaves; the per-warp tables stay for the row's partial last span.
template <typename T, int BITS, int MT, bool INT8, bool XV, bool BYTES>
__global__ void __launch_bounds__(kGemvWarps * 32) gemv_kernel(const GemvArgs a) {
  static_assert(!BYTES || (!INT8 && byte_table_bits<BITS>()), "the byte table: float path, 2 or 4 bits");
  constexpr int TS = 1 << BITS;
  using Acc = std::conditional_t<INT8, int, float>;
  using Lane = LaneSpan<BITS>;
  constexpr int kAhead = 8 / Lane::kLoad;  // 8, 4 or 2 spans: 8 to 12 words per row in flight per lane
  // aligned to a whole table pair, so each table's address has zeros where entry_address ORs in the offset
  __shared__ __align__(8 * TS) Acc s_tab[kGemvWarps][kGemvRows][TS];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  uint32_t lane_bytes = 0;  // BYTES: the lane's copy in the byte table
  if constexpr (BYTES) {
    constexpr int E = 8 / BITS;  // weights per index byte
    __shared__ __align__(128) float s_bytes[kByteTableFloats];
    const int64_t g = int64_t(blockIdx.x) * kGemvWarps * kGemvRows / a.w.rows_per_group;
    for (int i = threadIdx.x; i < kByteTableFloats; i += kGemvWarps * 32) {
      const int byte = i / (kByteEntryBytes / 4), e = i % E;  // float i: weight e of byte `byte`, some copy
      s_bytes[i] = codebook_entry(a.w, g, (byte >> (BITS * e)) & (TS - 1));
    }
    __syncthreads();
    lane_bytes = shared_address(s_bytes) + (lane % (kByteEntryBytes / (4 * E))) * (4 * E);
  }
  const int64_t n_first = (int64_t(blockIdx.x) * kGemvWarps + warp) * kGemvRows;
  if (n_first >= a.w.N) return;  // whole warps only: no block-wide barrier below
  int64_t n[kGemvRows];
  const uint32_t* rows[kGemvRows];
#pragma unroll
  for (int r = 0; r < kGemvRows; ++r) {
    n[r] = n_first + r < a.w.N ? n_first + r : n_first;  // a missing last row repeats the first and is not stored
    rows[r] = a.w.packed + n[r] * a.w.row_words;
    const int64_t g = n[r] / a.w.rows_per_group;
    for (int j = lane; j < TS; j += 32) {
      if constexpr (INT8) {
        s_tab[warp][r][j] = static_cast<const int8_t*>(a.w.table)[g * TS + j];
      } else {
        s_tab[warp][r][j] = codebook_entry(a.w, g, j);
      }
    }
  }
  __syncwarp();

  const int64_t m0 = int64_t(blockIdx.z) * MT;
  const int mc = static_cast<int>(a.out.M - m0 < MT ? a.out.M - m0 : MT);
  // a.x is x (T) or, for int8, the quantized rows: only the matching pointer is formed
  const T* x = INT8 ? nullptr : static_cast<const T*>(a.x) + m0 * a.x_ld;
  const int8_t* xq = INT8 ? static_cast<const int8_t*>(a.x) + m0 * a.x_ld : nullptr;
  Acc acc[kGemvRows][MT] = {};
  const int64_t sp_begin = int64_t(blockIdx.y) * a.units_per_split;
  const int64_t sp_end = min(a.units, sp_begin + a.units_per_split);
  // int8 rows of x are zero padded to whole spans (words past a row's end read 0), so only the float path has a
  // partial last span
  const int64_t full_end = INT8 ? sp_end : min(sp_end, a.w.kin / Lane::kSpan);
  const int64_t lane_word = Lane::first_word(lane);
  const int shift = Lane::shift(lane);
  const uint32_t tab = static_cast<uint32_t>(__cvta_generic_to_shared(s_tab[warp]));
  // kAhead spans from sp: all their words loaded, then each decoded. GUARD: some of them may lie past full_end or
  // read past the row's last word; without it, plain loads at constant offsets (no compares on the hot path)
  auto spans = [&](int64_t sp, auto guard) {
    constexpr bool GUARD = decltype(guard)::value;
    uint32_t w[kAhead][kGemvRows][Lane::kLoad];
#pragma unroll
    for (int t = 0; t < kAhead; ++t) {
      const int64_t q = (sp + t) * Lane::kSpanWords + lane_word;
      const bool live = sp + t < full_end;
#pragma unroll
      for (int r = 0; r < kGemvRows; ++r) {
#pragma unroll
        for (int i = 0; i < Lane::kLoad; ++i) {
          w[t][r][i] = !GUARD || (live && q + i < a.w.row_words) ? __ldg(rows[r] + q + i) : 0u;
        }
      }
    }
#pragma unroll
    for (int t = 0; t < kAhead; ++t) {
      if (GUARD && sp + t >= full_end) break;
      uint32_t v[kGemvRows][Lane::kWords];
#pragma unroll
      for (int r = 0; r < kGemvRows; ++r) Lane::align(w[t][r], shift, v[r]);
      const int64_t k = (sp + t) * Lane::kSpan + 8 * lane;
      if constexpr (INT8) {
        gemv_lane_int8<BITS, MT>(v, s_tab[warp], xq, a.x_ld, mc, k, acc);
      } else {
        gemv_lane_float<T, BITS, MT, XV, BYTES>(v, BYTES ? lane_bytes : tab, x, a.x_ld, mc, k, acc);
      }
    }
  };
  // spans whose words all lie inside the row, the one a lane reads past its indices included (kLoad > 1)
  const int64_t safe_end = min(full_end, (a.w.row_words - (Lane::kLoad > 1 ? 1 : 0)) / Lane::kSpanWords);
  int64_t sp = sp_begin;
  for (; sp + kAhead <= safe_end; sp += kAhead) spans(sp, std::false_type{});
  for (; sp < full_end; sp += kAhead) spans(sp, std::true_type{});
  if constexpr (!INT8) {
    if (full_end < sp_end) {
      gemv_tail_float<T, BITS, MT>(rows, s_tab[warp], x, a.x_ld, mc, full_end * Lane::kSpan + lane, a.w.kin, acc);
    }
  }
#pragma unroll
  for (int r = 0; r < kGemvRows; ++r) {
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      Acc v = acc[r][m];
      for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
      if (lane == r * MT + m && m < mc && n_first + r < a.w.N) a.out.put(blockIdx.y, m0 + m, n[r], v);
    }
  }
}

// ----------------------------------------------------------------------------------------------- tiles
struct TileArgs {
  PackedRows w;
  const void* x;   // forward: x [M, kin] (int8: xq as int [M, x_cols]); grad_W: x [M, kin]
  int64_t x_cols;
  bool x_vec;      // 16-byte vector loads allowed on x rows
  const void* g;   // backward: grad_out [M, N]
  bool g_vec;
  int64_t M;
  int64_t steps, steps_per_split;
  Epilogue out;
  float* grad_codebook;  // [G, K]
  // The tiles of a launch are (x, y) pairs enumerated along grid.x, x fastest (consecutive blocks share a y tile,
  // so its W rows stay in L2): one axis of gridDim.y (at most 65535 tiles) capped a layer at 4.19M output features.
  int64_t tiles_x;
};

__device__ __forceinline__ int64_t tile_x(const TileArgs& a) { return int64_t(blockIdx.x) % a.tiles_x; }
__device__ __forceinline__ int64_t tile_y(const TileArgs& a) { return int64_t(blockIdx.x) / a.tiles_x; }

template <typename Acc>
__device__ void tile_epilogue(const TileArgs& a, const unsigned char* smem, int64_t r0, int64_t c0, int64_t cols) {
  const Acc* c = reinterpret_cast<const Acc*>(smem);
  for (int e = threadIdx.x; e < kT * kT; e += kTileThreads) {
    const int p = e / kT, q = e % kT;
    if (r0 + p < a.M && c0 + q < cols) a.out.put(blockIdx.z, r0 + p, c0 + q, c[p * kLdC + q]);
  }
}

// y tile [m0, +64) x [n0, +64); E = T (float / 16-bit), or int for the int8 path (A = xq viewed as int words).
// tiles: (ceil(M / 64), ceil(N / 64)), splits of ceil(kin / 64) steps along grid.z.
template <typename E, int BITS>
__global__ void __launch_bounds__(kTileThreads) forward_tile_kernel(const TileArgs a) {
  constexpr bool INT8 = std::is_same_v<E, int>;
  __shared__ __align__(128) unsigned char smem[kTileBytes<E>];
  __shared__ __align__(16) float aux[kAux];
  const int64_t m0 = tile_x(a) * kT, n0 = tile_y(a) * kT;
  using Entry = std::conditional_t<INT8, int8_t, float>;
  const int64_t n_last = min(n0 + kT, a.w.N) - 1;
  const auto tab = stage_table<Entry, (1 << BITS)>(static_cast<const Entry*>(a.w.table), n0 / a.w.rows_per_group,
                                                   n_last / a.w.rows_per_group, reinterpret_cast<Entry*>(aux));
  DenseTile<E, kT, kRows<E>, true> ta;
  PackedTile<BITS> tb;
  const int64_t t0 = blockIdx.z * a.steps_per_split, t1 = min(a.steps, t0 + a.steps_per_split);
  tile_mainloop<E, MmaFor<E>>(
      smem, t0, t1, ta,
      [&](int64_t t) { ta.load(static_cast<const E*>(a.x), a.M, a.x_cols, a.x_vec, m0, t * kRows<E>); },
      [&](int64_t t) { tb.load(a.w, n0, t * kT); },
      [&](int64_t t, E* sb) { tb.template store<E, true>(a.w, tab, n0, t * kT, sb); });
  tile_epilogue<typename MmaFor<E>::Acc>(a, smem, m0, n0, a.w.N);
}

// grad_x tile [m0, +64) x [k0, +64) = grad_out[m0.., :] @ W[:, k0..]: the reduction runs over W's rows, so the
// decoded tile is stored b[n][k]. tiles: (ceil(M / 64), ceil(kin / 64)), splits of ceil(N / 64) steps.
template <typename E, int BITS>
__global__ void __launch_bounds__(kTileThreads) grad_x_tile_kernel(const TileArgs a) {
  __shared__ __align__(128) unsigned char smem[kTileBytes<E>];
  __shared__ __align__(16) float aux[kAux];
  const int64_t m0 = tile_x(a) * kT, k0 = tile_y(a) * kT;
  const auto tab = stage_table<float, (1 << BITS)>(static_cast<const float*>(a.w.table), 0,
                                                   (a.w.N - 1) / a.w.rows_per_group, aux);
  DenseTile<E, kT, kT, true> ta;
  PackedTile<BITS> tb;
  const int64_t t0 = blockIdx.z * a.steps_per_split, t1 = min(a.steps, t0 + a.steps_per_split);
  tile_mainloop<E, MmaFor<E>>(
      smem, t0, t1, ta,
      [&](int64_t t) { ta.load(static_cast<const E*>(a.g), a.M, a.w.N, a.g_vec, m0, t * kT); },
      [&](int64_t t) { tb.load(a.w, t * kT, k0); },
      [&](int64_t t, E* sb) { tb.template store<E, false>(a.w, tab, t * kT, k0, sb); });
  tile_epilogue<float>(a, smem, m0, k0, a.w.kin);
}

// dL/dW tile [n0, +64) x [k0, +64) = grad_out[:, n0..]^T @ x[:, k0..] (reduction over the rows of x), scattered by
// index into grad_codebook: into per-block shared sums when the tile's groups fit, else straight into global
// memory. Indices >= K have no entry and credit nothing (as the reference). Splits of the rows of x scatter their
// partial tiles independently (the scatter is linear). tiles: (ceil(kin / 64), ceil(N / 64)), splits of ceil(M / 64).
template <typename E, int BITS>
__global__ void __launch_bounds__(kTileThreads) grad_w_tile_kernel(const TileArgs a) {
  __shared__ __align__(128) unsigned char smem[kTileBytes<E>];
  __shared__ __align__(16) float aux[kAux];
  const int64_t k0 = tile_x(a) * kT, n0 = tile_y(a) * kT;
  const int K = a.w.K;
  const int64_t g_lo = n0 / a.w.rows_per_group, g_hi = (min(n0 + kT, a.w.N) - 1) / a.w.rows_per_group;
  const int64_t hist_size = (g_hi - g_lo + 1) * K;
  const bool shared_hist = hist_size <= kAux;
  if (shared_hist) {
    for (int i = threadIdx.x; i < hist_size; i += kTileThreads) aux[i] = 0.0f;  // published by the loop's barriers
  }
  DenseTile<E, kT, kT, false> ta, tb;
  const int64_t t0 = blockIdx.z * a.steps_per_split, t1 = min(a.steps, t0 + a.steps_per_split);
  tile_mainloop<E, MmaFor<E>>(
      smem, t0, t1, ta,
      [&](int64_t t) { ta.load(static_cast<const E*>(a.g), a.M, a.w.N, a.g_vec, t * kT, n0); },
      [&](int64_t t) { tb.load(static_cast<const E*>(a.x), a.M, a.w.kin, a.x_vec, t * kT, k0); },
      [&](int64_t, E* sb) { tb.store(sb); });

  PackedTile<BITS> pt;
  pt.load(a.w, n0, k0);
  const float* c = reinterpret_cast<const float*>(smem);
  const int nl = pt.row(), kl = pt.col();
  const int64_t n = n0 + nl;
  if (n < a.w.N) {
    const int64_t g = n / a.w.rows_per_group;
    float* hist = shared_hist ? aux + (g - g_lo) * K : a.grad_codebook + g * K;
    const int64_t left = a.w.kin - (k0 + kl);
#pragma unroll
    for (int j = 0; j < 32; ++j) {
      const uint32_t e = pt.index(j);
      if (j < left && e < uint32_t(K)) atomicAdd(hist + e, c[nl * kLdC + kl + j]);
    }
  }
  if (shared_hist) {
    __syncthreads();
    for (int i = threadIdx.x; i < hist_size; i += kTileThreads) {
      if (aux[i] != 0.0f) atomicAdd(a.grad_codebook + g_lo * K + i, aux[i]);  // NaN != 0: propagated
    }
  }
}


// Whether the SIMT GEMV takes its byte-table form where it applies: off until a GPU run has timed it (the first
// H200 run sets it: `python benchmarks/gpu_defaults.py` reads bench_shared_linear.py --cuda's simt / simt_bytes
// columns). WS_CUDA_GEMV, read per call: "bytes" asks for it, "off" for the plain SIMT GEMV.
constexpr bool kGemvBytesDefault = false;

bool gemv_bytes_wanted() {
  const char* sw = std::getenv("WS_CUDA_GEMV");
  const std::string_view mode = sw == nullptr ? std::string_view() : std::string_view(sw);
  return mode == "bytes" || (mode != "off" && kGemvBytesDefault);
}

// BYTES: the byte-table form (its own instantiation, so the emulator's launch log shows which form ran).
template <typename T, int BITS, bool INT8, bool BYTES = false>
void launch_gemv(GemvArgs a, int sms, const at::Tensor& like) {
  if constexpr (!INT8 && !BYTES && byte_table_bits<BITS>()) {  // where asked and the block's rows share a codebook
    const bool one_group = a.w.rows_per_group == a.w.N || a.w.rows_per_group % (kGemvWarps * kGemvRows) == 0;
    if (one_group && gemv_bytes_wanted()) return launch_gemv<T, BITS, false, true>(a, sms, like);
  }
  const int64_t M = a.out.M;
  // Two specialisations: M = 1 (the decode case) and up to 8 rows per block (the kernel stops at the real count).
  const int mt = M == 1 ? 1 : kGemvMaxMT;
  const int64_t mblocks = ceil_div(M, mt), nblocks = ceil_div(a.w.N, kGemvWarps * kGemvRows);
  a.units = ceil_div(a.w.kin, kSpan);
  const auto [splits, per] = split_k(nblocks * mblocks, a.units, 8, sms);  // >= 2048 indices per split
  a.units_per_split = per;
  const at::Tensor ws = set_splits(a.out, splits, INT8, like);
  check_grid(splits, mblocks, nblocks);
  // float x rows 16-byte aligned or not (int8 rows are padded: always)
  auto* kernel = [&] {
    if constexpr (INT8) {
      return mt == 1 ? gemv_kernel<T, BITS, 1, true, true, false> : gemv_kernel<T, BITS, kGemvMaxMT, true, true, false>;
    } else {
      if (a.x_vec) {
        return mt == 1 ? gemv_kernel<T, BITS, 1, false, true, BYTES>
                       : gemv_kernel<T, BITS, kGemvMaxMT, false, true, BYTES>;
      }
      return mt == 1 ? gemv_kernel<T, BITS, 1, false, false, BYTES>
                     : gemv_kernel<T, BITS, kGemvMaxMT, false, false, BYTES>;
    }
  }();
  const dim3 grid(static_cast<unsigned>(nblocks), splits, static_cast<unsigned>(mblocks));
  kernel<<<grid, kGemvWarps * 32, 0, cuda::stream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  finalize(a.out, INT8);
}

// A tile kernel over (gx, gy) output tiles, its `steps` reduction steps split over grid.z. partials: the splits
// write raw sums that finalize_kernel reduces (grad_w_tile_kernel instead scatters each split atomically).
void launch_tiles(void (*kernel)(TileArgs), TileArgs a, int64_t gx, int64_t gy, int64_t steps, bool partials,
                  bool int8, int sms, const at::Tensor& like) {
  a.steps = steps;
  const auto [splits, per] = split_k(gx * gy, steps, 4, sms);
  a.steps_per_split = per;
  const at::Tensor ws = partials ? set_splits(a.out, splits, int8, like) : at::Tensor();
  a.tiles_x = gx;
  check_grid(1, splits, gx * gy);
  kernel<<<dim3(static_cast<unsigned>(gx * gy), 1, splits), kTileThreads, 0, cuda::stream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (partials) finalize(a.out, int8);
}

at::Tensor shared_linear_cuda(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& codebook, int64_t bits,
                              int64_t out_features, int64_t in_features, const std::optional<at::Tensor>& bias,
                              c10::string_view activation) {
  Activation act;
  const PackedWeight pw =
      check_shared_linear(x, packed, codebook, bits, out_features, in_features, bias, activation, &act);
  const bool int8 = act == Activation::Int8;
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.numel() / in_features;
  auto sizes = x.sizes().vec();
  sizes.back() = out_features;
  at::Tensor y = at::empty(sizes, x.options());
  // the path: the tensor-core GEMV (2 to 16 rows of 16-bit x), the float GEMV (up to 16 rows of fp32 x, 8 of
  // 16-bit x), else the panels (or the tiles); int8 takes its GEMV or tiles below
  const bool wgmma = !int8 && gemm_wgmma_takes(x, packed, bits, M, out_features, in_features, pw.rows / pw.groups);
  const bool fused =
      !int8 && (wgmma || gemm_mma_takes(x, packed, bits, M, out_features, in_features, pw.rows / pw.groups));
  const bool mma = !int8 && !fused && gemv_mma_takes(x.scalar_type(), M, x.get_device());
  const bool float_gemv = M <= (x.scalar_type() == at::kFloat ? 2 * kGemvMaxMT : kGemvMaxMT);
  const Tables tables = int8 ? Tables::Int8 : (fused || mma || float_gemv ? Tables::None : Tables::Float);
  const Prepared w = prepare(packed, codebook, static_cast<int>(bits), pw, tables);
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();  // read in its dtype (Epilogue)
  const int sms = sm_count(x.get_device());
  const int64_t mt = ceil_div(M, kT), nt = ceil_div(out_features, kT), steps = ceil_div(in_features, kT);

  Epilogue e = make_epilogue(y, M, out_features);
  e.bias = b.defined() ? b.data_ptr() : nullptr;
  e.bias_kind = b.defined() ? out_kind(b.scalar_type()) : OutKind::Float;
  e.rows_per_group = w.rows.rows_per_group;
  GemvArgs ga{};
  TileArgs ta{};
  ga.w = ta.w = w.rows;
  ta.M = M;
  if (fused) {
    if (wgmma) {
      launch_gemm_wgmma(w.rows, x, static_cast<int>(bits), e, sms);
    } else {
      launch_gemm_mma(w.rows, x, static_cast<int>(bits), e, sms);
    }
    return y;
  }
  if (mma) {
    launch_gemv_mma(w.rows, x, in_features, static_cast<int>(bits), e, sms);
    return y;
  }
  if (!int8 && !float_gemv && panels_enabled()) {
    at::Tensor y2d = y.view({M, out_features});
    linear_by_panels(w.rows, static_cast<int>(bits), x.view({M, in_features}), bias, y2d);
    return y;
  }
  if (!int8) {
    ga.x = ta.x = x.data_ptr();
    ga.x_ld = ta.x_cols = in_features;
    ga.x_vec = ta.x_vec = rows_vec16(x.data_ptr(), in_features * x.element_size());
    ga.out = ta.out = e;
    WS_DISPATCH_FLOAT(x.scalar_type(), "weightshare::shared_linear_cuda", [&] {
      using T = native_t<scalar_t>;
      WS_DISPATCH_BITS(bits, BITS, [&] {
        if (float_gemv) {
          launch_gemv<T, BITS, false>(ga, sms, x);
        } else {
          launch_tiles(forward_tile_kernel<T, BITS>, ta, mt, nt, steps, true, false, sms, x);
        }
      });
    });
    return y;
  }

  // int8: x quantized per row (zero padded to whole GEMV units), then integer products against the int8 tables.
  const int64_t kp = ceil_div(in_features, kSpan) * kSpan;
  at::Tensor xq = at::empty({M, kp}, x.options().dtype(at::kChar));
  at::Tensor sx = at::empty({M}, x.options().dtype(at::kFloat));
  at::Tensor xsum = at::empty({M}, x.options().dtype(at::kLong));
  WS_DISPATCH_FLOAT(x.scalar_type(), "weightshare::shared_linear_cuda_int8", [&] {
    using T = native_t<scalar_t>;
    const int blocks = static_cast<int>(std::min<int64_t>(M, 65535LL * 8));
    quantize_rows_kernel<T><<<blocks, 256, 0, cuda::stream()>>>(reinterpret_cast<const T*>(x.data_ptr<scalar_t>()),
                                                                M, in_features, kp, xq.data_ptr<int8_t>(),
                                                                sx.data_ptr<float>(),
                                                                reinterpret_cast<long long*>(xsum.data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  e.sx = sx.data_ptr<float>();
  e.sw = w.scale.data_ptr<float>();
  e.zw = w.zero.data_ptr<float>();
  e.xsum = reinterpret_cast<const long long*>(xsum.data_ptr<int64_t>());
  ga.x = ta.x = xq.data_ptr();
  ga.x_ld = kp;
  ta.x_cols = kp / 4;  // xq rows as int words of 4 activations
  ta.x_vec = true;     // fresh allocation, rows of a multiple of kSpan bytes
  ga.out = ta.out = e;
  WS_DISPATCH_BITS(bits, BITS, [&] {
    if (M <= 2 * kGemvMaxMT) {
      launch_gemv<float, BITS, true>(ga, sms, x);
    } else {
      launch_tiles(forward_tile_kernel<int, BITS>, ta, mt, nt, steps, true, true, sms, x);
    }
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> shared_linear_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                                               const at::Tensor& packed, const at::Tensor& codebook,
                                                               int64_t bits, int64_t out_features,
                                                               int64_t in_features, bool need_x_grad,
                                                               bool need_codebook_grad) {
  const PackedWeight pw =
      check_shared_linear_backward(grad_out, x, packed, codebook, bits, out_features, in_features);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto f32 = codebook.options().dtype(at::kFloat);
  at::Tensor gc = need_codebook_grad ? at::zeros({pw.groups, pw.K}, f32) : at::empty({0}, f32);
  if (!need_x_grad && !need_codebook_grad) return {at::empty({0}, x.options()), gc};

  const int64_t M = x.numel() / in_features;
  // Both operands are read in one dtype: x's, which autograd gives grad_out too. Mixed dtypes (a direct call with
  // an fp32 grad_out for bf16 x) run in fp32, as the reference and the CPU do: rounding grad_out to x's dtype would
  // drop 16 of its mantissa bits before both products.
  const bool mixed = grad_out.scalar_type() != x.scalar_type();
  const at::Tensor xs = mixed ? x.to(at::kFloat) : x;
  const at::Tensor g = mixed ? grad_out.to(at::kFloat) : grad_out;
  at::Tensor gx = need_x_grad ? at::empty(x.sizes(), xs.options()) : at::empty({0}, x.options());
  const Prepared w = prepare(packed, codebook, static_cast<int>(bits), pw, Tables::Float);
  const int sms = sm_count(x.get_device());
  const int64_t mt = ceil_div(M, kT), nt = ceil_div(out_features, kT), kt = ceil_div(in_features, kT);
  TileArgs a{};
  a.w = w.rows;
  a.M = M;
  a.x = xs.data_ptr();
  a.x_cols = in_features;
  a.x_vec = rows_vec16(xs.data_ptr(), in_features * xs.element_size());
  a.g = g.data_ptr();
  a.g_vec = rows_vec16(g.data_ptr(), out_features * g.element_size());
  a.grad_codebook = need_codebook_grad ? gc.data_ptr<float>() : nullptr;
  if (need_x_grad) a.out = make_epilogue(gx, M, in_features);
  WS_DISPATCH_FLOAT(xs.scalar_type(), "weightshare::shared_linear_backward_cuda", [&] {
    using T = native_t<scalar_t>;
    WS_DISPATCH_BITS(bits, BITS, [&] {
      if (need_x_grad) launch_tiles(grad_x_tile_kernel<T, BITS>, a, mt, kt, nt, true, false, sms, xs);
      if (need_codebook_grad) launch_tiles(grad_w_tile_kernel<T, BITS>, a, kt, nt, mt, false, false, sms, xs);
    });
  });
  if (mixed && need_x_grad) gx = gx.to(x.scalar_type());
  return {gx, gc};
}

}  // namespace

TORCH_LIBRARY_IMPL(weightshare, CUDA, m) {
  m.impl("shared_linear", &shared_linear_cuda);
  m.impl("shared_linear_backward", &shared_linear_backward_cuda);
}

}  // namespace weightshare
