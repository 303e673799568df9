// CUDA shared_linear (float and int8 activations) and shared_linear_backward: W [N, Kin] is read only in its packed
// form (packing.h) and decoded on the fly through per-group tables; the dense W is never materialised.
//
// Paths (the size thresholds are first guesses for the H200, to be tuned by measurement):
//  * gemv_kernel, few rows of x (float: M <= 16 for fp32 x, <= 8 for fp16/bf16; int8: M <= 16). Memory-bound: 8
//    warps per block, each warp owns 2 output rows and spreads their k-range over its lanes in units of 128
//    indices (= BITS 16-byte loads per row); codebooks in per-warp shared tables; every decoded weight is applied
//    to up to 8 rows of x held... in L1 (grid.z takes further groups of 8 rows); fp32 FMA or dp4a; warp-shuffle
//    reduction. Split-K over grid.y when the rows alone do not fill the GPU.
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
#include <mma.h>
#include <torch/library.h>

#include <atomic>
#include <type_traits>

#include "weightshare/checks.h"
#include "weightshare/cuda_decode.h"
#include "weightshare/cuda_utils.h"
#include "weightshare/dispatch.h"
#include "weightshare/packing.h"

namespace weightshare {
namespace {

using cuda::from_float;
using cuda::native_t;
using cuda::to_float;

constexpr int64_t kMaxInt8InFeatures = 131072;  // 131072 * 127 * 127 < 2**31: the int32 accumulator is exact
constexpr int kGemvWarps = 8;
constexpr int kGemvRows = 2;    // output rows per warp: each loaded x value feeds both
constexpr int kGemvMaxMT = 8;   // x rows per GEMV block
constexpr int kUnit = 128;      // indices per lane per GEMV step: 4 chunks, BITS 16-byte words
constexpr int kT = 64;          // tile edge: output rows, output columns and reduction elements per step
constexpr int kTileThreads = 128;
constexpr int kAux = 2048;      // shared table / codebook-gradient budget, entries (8 KB)

// ----------------------------------------------------------------------------------------------- epilogue
enum class OutKind : int { Float, Half, BFloat16 };

// How a finished accumulator becomes an output element, shared by every kernel that writes y or grad_x and by the
// split-K finaliser. float: y = acc (+ bias). int8: y = float(acc) * (scale_x * scale_w) (+ bias), rounded exactly
// as the fp32 reference (no FMA contraction).
struct Epilogue {
  void* y;
  OutKind kind;
  int64_t M, ld;          // y is [M, ld]
  const float* bias;      // [ld] or null
  const float* sx;        // int8: [M] activation scales
  const float* sw;        // int8: [G] codebook scales
  int64_t rows_per_group;
  void* partial;          // [splits, M, ld] raw sums when splits > 1
  int splits;

  __device__ void store(int64_t i, float v) const {
    switch (kind) {
      case OutKind::Float: static_cast<float*>(y)[i] = v; break;
      case OutKind::Half: static_cast<__half*>(y)[i] = __float2half_rn(v); break;
      case OutKind::BFloat16: static_cast<__nv_bfloat16*>(y)[i] = __float2bfloat16_rn(v); break;
    }
  }
  __device__ void finish(int64_t m, int64_t c, float acc) const {
    store(m * ld + c, bias ? acc + bias[c] : acc);
  }
  __device__ void finish(int64_t m, int64_t c, int acc) const {
    float v = __fmul_rn(__int2float_rn(acc), __fmul_rn(sx[m], sw[c / rows_per_group]));
    if (bias) v = __fadd_rn(v, bias[c]);
    store(m * ld + c, v);
  }
  template <typename Acc>
  __device__ void put(int split, int64_t m, int64_t c, Acc acc) const {
    if (splits == 1) {
      finish(m, c, acc);
    } else {
      static_cast<Acc*>(partial)[(split * M + m) * ld + c] = acc;
    }
  }
};

template <typename Acc>
__global__ void finalize_kernel(const Epilogue e) {
  const Acc* p = static_cast<const Acc*>(e.partial);
  const int64_t total = e.M * e.ld;
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < total; t += int64_t(gridDim.x) * blockDim.x) {
    Acc s = p[t];
    for (int k = 1; k < e.splits; ++k) s += p[k * total + t];
    e.finish(t / e.ld, t % e.ld, s);
  }
}

// ----------------------------------------------------------------------------------------------- tables, int8 x
// Per-group tables over all 2**bits indices, so the hot loops never compare an index with K. float: the codebook
// in fp32, NaN past K (dequantize's rule for bad indices). int8: quantize_int8_symmetric(codebook, dim=1), 0 past
// K (reference.shared_linear), plus the per-group scale. One warp per group.
template <typename C>
__global__ void prepare_tables_kernel(const C* __restrict__ cb, int64_t G, int K, int ts, float* tab, int8_t* tabq,
                                      float* scale) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = (int64_t(gridDim.x) * blockDim.x) >> 5;
  for (int64_t g = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) >> 5; g < G; g += warps) {
    const C* c = cb + g * K;
    if (tabq == nullptr) {
      for (int j = lane; j < ts; j += 32) tab[g * ts + j] = j < K ? to_float(c[j]) : __uint_as_float(0x7fc00000u);
      continue;
    }
    float amax = 0.0f;
    for (int j = lane; j < K; j += 32) amax = cuda::nan_max(amax, fabsf(to_float(c[j])));
    for (int off = 16; off > 0; off >>= 1) amax = cuda::nan_max(amax, __shfl_xor_sync(0xffffffffu, amax, off));
    const float s = cuda::int8_scale(amax);
    for (int j = lane; j < ts; j += 32) tabq[g * ts + j] = static_cast<int8_t>(j < K ? cuda::quantize_int8(to_float(c[j]), s) : 0);
    if (lane == 0) scale[g] = s;
  }
}

// One block per row of x: max|x| (NaN-propagating, as torch.amax), then the int8 row, zero padded to kp bytes (a
// multiple of kUnit, so the int8 kernels read whole 16-byte groups without bounds checks).
template <typename T>
__global__ void __launch_bounds__(256) quantize_rows_kernel(const T* __restrict__ x, int64_t M, int64_t kin,
                                                            int64_t kp, int8_t* __restrict__ xq, float* sx) {
  __shared__ float red[8];
  for (int64_t m = blockIdx.x; m < M; m += gridDim.x) {
    const T* row = x + m * kin;
    float amax = 0.0f;
    for (int64_t k = threadIdx.x; k < kin; k += blockDim.x) amax = cuda::nan_max(amax, fabsf(to_float(row[k])));
    for (int off = 16; off > 0; off >>= 1) amax = cuda::nan_max(amax, __shfl_xor_sync(0xffffffffu, amax, off));
    __syncthreads();  // red is free (previous row done with it)
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = amax;
    __syncthreads();
    for (int w = 0; w < int(blockDim.x >> 5); ++w) amax = cuda::nan_max(amax, red[w]);
    const float s = cuda::int8_scale(amax);
    for (int64_t k4 = 4 * int64_t(threadIdx.x); k4 < kp; k4 += 4 * int64_t(blockDim.x)) {
      int q[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) q[e] = k4 + e < kin ? cuda::quantize_int8(to_float(row[k4 + e]), s) : 0;
      *reinterpret_cast<int*>(xq + m * kp + k4) = cuda::pack4_s8(q[0], q[1], q[2], q[3]);
    }
    if (threadIdx.x == 0) sx[m] = s;
  }
}

// ----------------------------------------------------------------------------------------------- GEMV
struct PackedRows {
  const uint32_t* packed;
  int64_t row_words;
  int row_align;  // bytes every row start is aligned to: 4, 8 or 16
  int64_t N, kin, rows_per_group;
  const void* table;  // [G, 2**BITS] float or int8
  int K;
};

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

// x[k .. k+8) as fp32; TAIL: only `left` of them exist, the rest read 0.
template <typename T, bool TAIL>
__device__ __forceinline__ void load_x8(const T* p, bool vec, int64_t left, float (&v)[8]) {
  if (!TAIL && vec) {
    if constexpr (sizeof(T) == 4) {
      const float4 a = __ldg(reinterpret_cast<const float4*>(p)), b = __ldg(reinterpret_cast<const float4*>(p) + 1);
      v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
    } else {
      unpack8<T>(__ldg(reinterpret_cast<const uint4*>(p)), v);
    }
    return;
  }
#pragma unroll
  for (int e = 0; e < 8; ++e) v[e] = (!TAIL || e < left) ? to_float(p[e]) : 0.0f;
}

// One lane's unit of 128 indices of both rows against mc (<= MT) rows of x, 8 indices at a time.
template <typename T, int BITS, int MT, bool TAIL>
__device__ __forceinline__ void gemv_unit_float(const uint32_t (&w)[kGemvRows][4 * BITS], const float (*tab)[1 << BITS],
                                                const T* x, int64_t x_ld, int mc, bool x_vec, int64_t k_unit,
                                                int64_t kin, float (&acc)[kGemvRows][MT]) {
#pragma unroll
  for (int q = 0; q < 4; ++q) {
#pragma unroll
    for (int h = 0; h < 4; ++h) {
      const int64_t k = k_unit + q * 32 + h * 8;
      if (TAIL && k >= kin) continue;
      float wv[kGemvRows][8];
#pragma unroll
      for (int r = 0; r < kGemvRows; ++r) {
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const float v = tab[r][cuda::chunk_index<BITS>(w[r] + q * BITS, h * 8 + e)];
          wv[r][e] = (!TAIL || k + e < kin) ? v : 0.0f;  // padding bits decode to index 0: keep them out
        }
      }
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        if (m >= mc) break;
        float xv[8];
        load_x8<T, TAIL>(x + m * x_ld + k, x_vec, kin - k, xv);
#pragma unroll
        for (int r = 0; r < kGemvRows; ++r) {
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[r][m] = fmaf(wv[r][e], xv[e], acc[r][m]);
        }
      }
    }
  }
}

// int8: x is zero padded to whole units and indices past kin meet those zeros, so no tail case.
template <int BITS, int MT>
__device__ __forceinline__ void gemv_unit_int8(const uint32_t (&w)[kGemvRows][4 * BITS], const int (*tab)[1 << BITS],
                                               const int8_t* xq, int64_t x_ld, int mc, int64_t k_unit,
                                               int (&acc)[kGemvRows][MT]) {
#pragma unroll
  for (int q = 0; q < 4; ++q) {
#pragma unroll
    for (int h = 0; h < 4; ++h) {
      const int64_t k = k_unit + q * 32 + h * 8;
      int wq[kGemvRows][2];
#pragma unroll
      for (int r = 0; r < kGemvRows; ++r) {
#pragma unroll
        for (int d = 0; d < 2; ++d) {
          const uint32_t* c = w[r] + q * BITS;
          const int j = h * 8 + d * 4;
          wq[r][d] = cuda::pack4_s8(tab[r][cuda::chunk_index<BITS>(c, j)], tab[r][cuda::chunk_index<BITS>(c, j + 1)],
                                    tab[r][cuda::chunk_index<BITS>(c, j + 2)], tab[r][cuda::chunk_index<BITS>(c, j + 3)]);
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
  }
}

// grid: (ceil(N / (8 warps * 2 rows)), splits, ceil(M / MT)).
template <typename T, int BITS, int MT, bool INT8>
__global__ void __launch_bounds__(kGemvWarps * 32) gemv_kernel(const GemvArgs a) {
  constexpr int TS = 1 << BITS;
  using Acc = std::conditional_t<INT8, int, float>;
  __shared__ Acc s_tab[kGemvWarps][kGemvRows][TS];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t n_first = (int64_t(blockIdx.x) * kGemvWarps + warp) * kGemvRows;
  if (n_first >= a.w.N) return;  // whole warps only: no block-wide barrier below
  int64_t n[kGemvRows];
#pragma unroll
  for (int r = 0; r < kGemvRows; ++r) {
    n[r] = n_first + r < a.w.N ? n_first + r : n_first;  // a missing last row repeats the first and is not stored
    const int64_t g = n[r] / a.w.rows_per_group;
    for (int j = lane; j < TS; j += 32) {
      if constexpr (INT8) {
        s_tab[warp][r][j] = static_cast<const int8_t*>(a.w.table)[g * TS + j];
      } else {
        s_tab[warp][r][j] = static_cast<const float*>(a.w.table)[g * TS + j];
      }
    }
  }
  __syncwarp();

  const int64_t m0 = int64_t(blockIdx.z) * MT;
  const int mc = static_cast<int>(a.out.M - m0 < MT ? a.out.M - m0 : MT);
  Acc acc[kGemvRows][MT] = {};
  const int64_t u_end = min(a.units, (blockIdx.y + 1) * a.units_per_split);
  for (int64_t u = blockIdx.y * a.units_per_split + lane; u < u_end; u += 32) {
    uint32_t w[kGemvRows][4 * BITS];
#pragma unroll
    for (int r = 0; r < kGemvRows; ++r) {
      cuda::load_words(a.w.packed + n[r] * a.w.row_words, u * 4 * BITS, a.w.row_words, a.w.row_align, w[r]);
    }
    if constexpr (INT8) {
      gemv_unit_int8<BITS, MT>(w, s_tab[warp], static_cast<const int8_t*>(a.x) + m0 * a.x_ld, a.x_ld, mc,
                               u * kUnit, acc);
    } else {
      const T* x = static_cast<const T*>(a.x) + m0 * a.x_ld;
      if ((u + 1) * kUnit <= a.w.kin) {
        gemv_unit_float<T, BITS, MT, false>(w, s_tab[warp], x, a.x_ld, mc, a.x_vec, u * kUnit, a.w.kin, acc);
      } else {
        gemv_unit_float<T, BITS, MT, true>(w, s_tab[warp], x, a.x_ld, mc, a.x_vec, u * kUnit, a.w.kin, acc);
      }
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
// Operand tiles live in shared memory reduction-major, a[r][p] and b[r][q], for all three products (forward: r = k;
// grad_x: r = n; grad_W: r = m), so one micro-kernel serves them. E is the stored element: float, a 16-bit type,
// or (int8) an int packing 4 consecutive reduction elements (a dp4a operand).
template <typename E> constexpr int kPack = std::is_same_v<E, int> ? 4 : 1;
template <typename E> constexpr int kRows = kT / kPack<E>;
template <typename E> constexpr int kLd = kT + 16 / int(sizeof(E));  // 16-byte rows, staggered banks
constexpr int kLdC = kT + 4;                                          // fp32/int32 result tile c[p][q]
template <typename E> constexpr int kOpBytes = 2 * kRows<E> * kLd<E> * int(sizeof(E));
template <typename E> constexpr int kTileBytes = kOpBytes<E> > kT * kLdC * 4 ? kOpBytes<E> : kT * kLdC * 4;

template <typename E>
__device__ __forceinline__ E zero_of() {
  if constexpr (std::is_same_v<E, int> || std::is_same_v<E, float>) {
    return E(0);
  } else {
    return from_float<E>(0.0f);
  }
}

// A [TR x TC] tile at (r0, c0) of a row-major matrix src[rows][cols], staged global -> registers (a step ahead) ->
// shared. TRANSPOSE stores it as s[c][r] (its columns are the reduction axis); consecutive threads then take
// consecutive rows, so those column stores hit distinct banks. Elements outside the matrix read 0.
template <typename E, int TR, int TC, bool TRANSPOSE>
struct DenseTile {
  static constexpr int V = 16 / sizeof(E);
  static constexpr int NV = TR * TC / V / kTileThreads;
  static_assert(NV * V * kTileThreads == TR * TC, "tile must split evenly into 16-byte vectors");
  uint4 reg[NV];

  __device__ static void at(int i, int& r, int& c) {
    const int v = threadIdx.x + kTileThreads * i;
    r = TRANSPOSE ? v % TR : v / (TC / V);
    c = (TRANSPOSE ? v / TR : v % (TC / V)) * V;
  }
  __device__ void load(const E* __restrict__ src, int64_t rows, int64_t cols, bool vec, int64_t r0, int64_t c0) {
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      int r, c;
      at(i, r, c);
      const int64_t gr = r0 + r, gc = c0 + c;
      if (vec && gr < rows && gc + V <= cols) {
        reg[i] = __ldg(reinterpret_cast<const uint4*>(src + gr * cols + gc));
      } else {
        E* e = reinterpret_cast<E*>(&reg[i]);
#pragma unroll
        for (int j = 0; j < V; ++j) e[j] = (gr < rows && gc + j < cols) ? src[gr * cols + gc + j] : zero_of<E>();
      }
    }
  }
  __device__ void store(E* s) const {
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      int r, c;
      at(i, r, c);
      if constexpr (TRANSPOSE) {
        const E* e = reinterpret_cast<const E*>(&reg[i]);
#pragma unroll
        for (int j = 0; j < V; ++j) s[(c + j) * kLd<E> + r] = e[j];
      } else {
        *reinterpret_cast<uint4*>(s + r * kLd<E> + c) = reg[i];
      }
    }
  }
};

// Per-group tables seen by a block: a shared copy of groups [first, first + count) when they fit in kAux entries,
// else the global tables (L1-cached). Entry (g, i) = base[(g - first) * TS + i].
template <typename Entry, int TS>
struct Table {
  const Entry* base;
  int64_t first;
  __device__ Entry operator()(int64_t g, uint32_t i) const { return base[(g - first) * TS + i]; }
};

template <typename Entry, int TS>
__device__ Table<Entry, TS> stage_table(const Entry* global, int64_t g_lo, int64_t g_hi, Entry* s) {
  const int64_t count = (g_hi - g_lo + 1) * TS;
  if (count > kAux) return {global, 0};
  for (int i = threadIdx.x; i < count; i += blockDim.x) s[i] = global[g_lo * TS + i];
  __syncthreads();
  return {s, g_lo};
}

// W[n0 : n0+64, k0 : k0+64]: thread t loads chunk (k0/32 + t/64) of row n0 + t%64 (BITS words) a step ahead and
// decodes it into the tile when storing.
template <int BITS>
struct PackedTile {
  uint32_t w[BITS];
  __device__ static int row() { return threadIdx.x % kT; }
  __device__ static int col() { return (threadIdx.x / kT) * 32; }
  __device__ void load(const PackedRows& p, int64_t n0, int64_t k0) {
    const int64_t n = n0 + row();
    if (n < p.N) {
      cuda::load_words(p.packed + n * p.row_words, ((k0 + col()) / 32) * BITS, p.row_words, p.row_align, w);
    } else {
#pragma unroll
      for (int i = 0; i < BITS; ++i) w[i] = 0;
    }
  }
  __device__ uint32_t index(int j) const { return cuda::chunk_index<BITS>(w, j); }

  // TRANSPOSE (forward, r = k): b[k][n]; else (grad_x, r = n): b[n][k]. Weights outside W are 0.
  template <typename E, bool TRANSPOSE, typename Tab>
  __device__ void store(const PackedRows& p, const Tab& tab, int64_t n0, int64_t k0, E* b) const {
    const int nl = row(), kl = col();
    const int64_t n = n0 + nl;
    const int64_t left = n < p.N ? p.kin - (k0 + kl) : 0;  // indices of this chunk inside W
    const int64_t g = n < p.N ? n / p.rows_per_group : 0;
    if constexpr (std::is_same_v<E, int>) {
#pragma unroll
      for (int d = 0; d < 8; ++d) {
        int q[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) q[e] = 4 * d + e < left ? int(tab(g, index(4 * d + e))) : 0;
        b[(kl / 4 + d) * kLd<E> + nl] = cuda::pack4_s8(q[0], q[1], q[2], q[3]);
      }
    } else if constexpr (TRANSPOSE) {
#pragma unroll
      for (int j = 0; j < 32; ++j) b[(kl + j) * kLd<E> + nl] = from_float<E>(j < left ? tab(g, index(j)) : 0.0f);
    } else {
      constexpr int V = 16 / sizeof(E);
#pragma unroll
      for (int v = 0; v < 32 / V; ++v) {
        uint4 pk;
        E* e = reinterpret_cast<E*>(&pk);
#pragma unroll
        for (int j = 0; j < V; ++j) e[j] = from_float<E>(v * V + j < left ? tab(g, index(v * V + j)) : 0.0f);
        *reinterpret_cast<uint4*>(b + nl * kLd<E> + kl + v * V) = pk;
      }
    }
  }
};

// fp32 FMA (E = float) or dp4a (E = int) micro-kernel: thread (tid/8, tid%8) owns c[4p' .. +4][8q' .. +8].
template <typename E>
struct ScalarMma {
  using Acc = std::conditional_t<std::is_same_v<E, int>, int, float>;
  Acc acc[4][8];
  __device__ ScalarMma() {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[i][j] = 0;
  }
  __device__ static Acc mac(float a, float b, float c) { return fmaf(a, b, c); }
  __device__ static Acc mac(int a, int b, int c) { return __dp4a(a, b, c); }
  __device__ void step(const E* a, const E* b) {
    const int p = (threadIdx.x / 8) * 4, q = (threadIdx.x % 8) * 8;
#pragma unroll 4
    for (int r = 0; r < kRows<E>; ++r) {
      E av[4], bv[8];
      *reinterpret_cast<uint4*>(av) = *reinterpret_cast<const uint4*>(a + r * kLd<E> + p);
      *reinterpret_cast<uint4*>(bv) = *reinterpret_cast<const uint4*>(b + r * kLd<E> + q);
      *reinterpret_cast<uint4*>(bv + 4) = *reinterpret_cast<const uint4*>(b + r * kLd<E> + q + 4);
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = mac(av[i], bv[j], acc[i][j]);
    }
  }
  __device__ void store(Acc* c) const {
    const int p = (threadIdx.x / 8) * 4, q = (threadIdx.x % 8) * 8;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      *reinterpret_cast<uint4*>(c + (p + i) * kLdC + q) = *reinterpret_cast<const uint4*>(&acc[i][0]);
      *reinterpret_cast<uint4*>(c + (p + i) * kLdC + q + 4) = *reinterpret_cast<const uint4*>(&acc[i][4]);
    }
  }
};

// Tensor-core micro-kernel for fp16/bf16 operands (fp32 accumulate): 4 warps in 2x2, each 32x32 = 2x2 fragments.
// a[r][p] is the col-major form of the p x r operand, b[r][q] the row-major form of the r x q one.
template <typename E>
struct WmmaMma {
  using Acc = float;
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc[2][2];
  __device__ WmmaMma() {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) nvcuda::wmma::fill_fragment(acc[i][j], 0.0f);
  }
  __device__ static int p0() { return (threadIdx.x / 64) * 32; }
  __device__ static int q0() { return ((threadIdx.x / 32) % 2) * 32; }
  __device__ void step(const E* a, const E* b) {
    using namespace nvcuda;
#pragma unroll
    for (int r = 0; r < kT; r += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, E, wmma::col_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, E, wmma::row_major> fb[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], a + r * kLd<E> + p0() + 16 * i, kLd<E>);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], b + r * kLd<E> + q0() + 16 * j, kLd<E>);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
  }
  __device__ void store(float* c) const {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        nvcuda::wmma::store_matrix_sync(c + (p0() + 16 * i) * kLdC + q0() + 16 * j, acc[i][j], kLdC,
                                        nvcuda::wmma::mem_row_major);
      }
  }
};

template <typename E>
using MmaFor = std::conditional_t<std::is_same_v<E, float> || std::is_same_v<E, int>, ScalarMma<E>, WmmaMma<E>>;

// The reduction loop shared by the tile kernels: steps [t0, t1), loading step t+1 into registers while step t
// computes; leaves the 64x64 result in c (which aliases the operand tiles).
template <typename E, typename Mma, typename A, typename B, typename LoadA, typename LoadB, typename StoreB>
__device__ void tile_mainloop(unsigned char* smem, int64_t t0, int64_t t1, A& ta, B& tb, LoadA load_a,
                              LoadB load_b, StoreB store_b) {
  E* sa = reinterpret_cast<E*>(smem);
  E* sb = sa + kRows<E> * kLd<E>;
  Mma mma;
  if (t0 < t1) {
    load_a(t0);
    load_b(t0);
  }
  for (int64_t t = t0; t < t1; ++t) {
    __syncthreads();  // the previous step is done reading the tiles
    ta.store(sa);
    store_b(t, sb);
    __syncthreads();
    if (t + 1 < t1) {
      load_a(t + 1);
      load_b(t + 1);
    }
    mma.step(sa, sb);
  }
  __syncthreads();
  mma.store(reinterpret_cast<typename Mma::Acc*>(smem));
  __syncthreads();
}

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
};

template <typename Acc>
__device__ void tile_epilogue(const TileArgs& a, const unsigned char* smem, int64_t r0, int64_t c0, int64_t cols) {
  const Acc* c = reinterpret_cast<const Acc*>(smem);
  for (int e = threadIdx.x; e < kT * kT; e += kTileThreads) {
    const int p = e / kT, q = e % kT;
    if (r0 + p < a.M && c0 + q < cols) a.out.put(blockIdx.z, r0 + p, c0 + q, c[p * kLdC + q]);
  }
}

// y tile [m0, +64) x [n0, +64); E = T (float / 16-bit), or int for the int8 path (A = xq viewed as int words).
// grid: (ceil(M / 64), ceil(N / 64), splits of ceil(kin / 64) steps).
template <typename E, int BITS>
__global__ void __launch_bounds__(kTileThreads) forward_tile_kernel(const TileArgs a) {
  constexpr bool INT8 = std::is_same_v<E, int>;
  __shared__ __align__(128) unsigned char smem[kTileBytes<E>];
  __shared__ __align__(16) float aux[kAux];
  const int64_t m0 = int64_t(blockIdx.x) * kT, n0 = int64_t(blockIdx.y) * kT;
  using Entry = std::conditional_t<INT8, int8_t, float>;
  const int64_t n_last = min(n0 + kT, a.w.N) - 1;
  const auto tab = stage_table<Entry, (1 << BITS)>(static_cast<const Entry*>(a.w.table), n0 / a.w.rows_per_group,
                                                   n_last / a.w.rows_per_group, reinterpret_cast<Entry*>(aux));
  DenseTile<E, kT, kRows<E>, true> ta;
  PackedTile<BITS> tb;
  const int64_t t0 = blockIdx.z * a.steps_per_split, t1 = min(a.steps, t0 + a.steps_per_split);
  tile_mainloop<E, MmaFor<E>>(
      smem, t0, t1, ta, tb,
      [&](int64_t t) { ta.load(static_cast<const E*>(a.x), a.M, a.x_cols, a.x_vec, m0, t * kRows<E>); },
      [&](int64_t t) { tb.load(a.w, n0, t * kT); },
      [&](int64_t t, E* sb) { tb.template store<E, true>(a.w, tab, n0, t * kT, sb); });
  tile_epilogue<typename MmaFor<E>::Acc>(a, smem, m0, n0, a.w.N);
}

