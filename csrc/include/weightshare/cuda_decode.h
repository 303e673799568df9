#pragma once
// Device-side helpers of the CUDA shared-weight kernels (dequantize.cu, shared_linear.cu): decoding the packed
// layout of packing.h, scalar conversions, the int8 quantisation rules of reference.quantize_int8_symmetric and
// quantize_int8_codebook, and the building blocks of the tiled products (decode a W tile into shared memory, stage
// dense tiles, the fp32 / dp4a / tensor-core micro-kernels, the pipelined reduction loop), kept here for the
// implicit-GEMM conv to reuse.
//
// The unit of decoding is a *chunk*: 32 consecutive indices of a row. A chunk holds exactly 32*BITS bits, so it
// starts on a 32-bit word boundary and covers BITS whole words whatever BITS is (3, 5, 6, 7 included). With BITS
// a compile-time constant and the index within the chunk unrolled, every word select, shift and mask folds.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

namespace weightshare::cuda {

// c10's storage types -> CUDA's native types (same bits; the kernels use the intrinsics of the native ones).
template <typename T> struct Native { using type = T; };
template <> struct Native<c10::Half> { using type = __half; };
template <> struct Native<c10::BFloat16> { using type = __nv_bfloat16; };
template <typename T> using native_t = typename Native<T>::type;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// The float dtypes a kernel reads or writes through an untyped pointer (y, a bias, a codebook).
enum class FloatKind : int { Float, Half, BFloat16 };

// p[i] of kind k as fp32 (exact).
__device__ __forceinline__ float load_as_float(const void* p, FloatKind k, int64_t i) {
  switch (k) {
    case FloatKind::Half: return to_float(static_cast<const __half*>(p)[i]);
    case FloatKind::BFloat16: return to_float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

// The bits of a 16-bit float (to pack two into a 32-bit word).
__device__ __forceinline__ uint16_t bits_of(__half v) { return __half_as_ushort(v); }
__device__ __forceinline__ uint16_t bits_of(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }

// Round to nearest even, as torch's .to(dtype).
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Loads NW words starting at word w0 of a row (row_words long, its start aligned to row_align = 4, 8 or 16 bytes)
// with the widest loads the alignment allows; words past the end of the row read 0 (the last chunk of a row may
// hold fewer than BITS words).
template <int NW>
__device__ __forceinline__ void load_words(const uint32_t* __restrict__ row, int64_t w0, int64_t row_words,
                                           int row_align, uint32_t (&w)[NW]) {
  const uint32_t* p = row + w0;
  if (w0 + NW <= row_words) {
    if constexpr (NW % 4 == 0) {
      if (row_align >= 16 && (w0 & 3) == 0) {
#pragma unroll
        for (int i = 0; i < NW / 4; ++i) {
          const uint4 v = __ldg(reinterpret_cast<const uint4*>(p) + i);
          w[4 * i] = v.x; w[4 * i + 1] = v.y; w[4 * i + 2] = v.z; w[4 * i + 3] = v.w;
        }
        return;
      }
    }
    if constexpr (NW % 2 == 0) {
      if (row_align >= 8 && (w0 & 1) == 0) {
#pragma unroll
        for (int i = 0; i < NW / 2; ++i) {
          const uint2 v = __ldg(reinterpret_cast<const uint2*>(p) + i);
          w[2 * i] = v.x; w[2 * i + 1] = v.y;
        }
        return;
      }
    }
#pragma unroll
    for (int i = 0; i < NW; ++i) w[i] = __ldg(p + i);
    return;
  }
#pragma unroll
  for (int i = 0; i < NW; ++i) w[i] = w0 + i < row_words ? __ldg(p + i) : 0u;
}

// Index j (0..31, a constant after unrolling) of the chunk held in words w[0 .. BITS-1]. An index that straddles
// two words (bits 3, 5, 6, 7) is one funnel shift.
template <int BITS>
__device__ __forceinline__ uint32_t chunk_index(const uint32_t* w, int j) {
  const int bit = j * BITS, word = bit >> 5, shift = bit & 31;
  uint32_t v;
  if (shift + BITS > 32) {
    v = __funnelshift_r(w[word], w[word + 1], shift);
  } else {
    v = w[word] >> shift;
  }
  return v & ((1u << BITS) - 1u);
}

// ---------------------------------------------------------------------------------------------------------------
// int8 symmetric quantisation, bit for bit as reference.quantize_int8_symmetric: scale = max|t| / 127 in fp32
// (1 where that is 0; NaN where the max is not finite, see int8_scale), q = clamp(round_half_even(t / scale), -127,
// 127). The divisions are the correctly rounded ones whatever the compiler flags.

// max that propagates NaN, as torch.amax does (fmaxf would drop it).
__device__ __forceinline__ float nan_max(float a, float b) { return (a > b || a != a) ? a : b; }

// A non-finite max|.| (NaN or Inf in the row or codebook) gives a NaN scale: that row's (group's) outputs are NaN,
// as on the float path, instead of finite garbage.
__device__ __forceinline__ float int8_scale(float amax) {
  if (!(amax <= 3.402823466e38f)) return __int_as_float(0x7fc00000);
  const float s = __fdiv_rn(amax, 127.0f);
  return s > 0.0f ? s : 1.0f;
}

// A NaN input gives 0 (the reference's float->int64 cast of NaN is undefined).
__device__ __forceinline__ int quantize_int8(float v, float scale) {
  const int q = __float2int_rn(__fdiv_rn(v, scale));
  return q < -127 ? -127 : (q > 127 ? 127 : q);
}

// The 7-bit affine grid's candidate step t for a codebook of K <= 16 entries (reference.quantize_int8_codebook), from
// its min and max entries and whether all are finite: hi / (126 - t) - lo / (126 - t) over [lo, hi] =
// [min(c, 0), max(c, 0)] (1 where that is 0; NaN for a non-finite group). The entries' q: prepare_tables_kernel.
__device__ __forceinline__ float int8_affine_scale(float lo, float hi, bool finite, int t) {
  if (!finite) return __int_as_float(0x7fc00000);
  lo = fminf(lo, 0.0f);
  hi = fmaxf(hi, 0.0f);
  const float den = static_cast<float>(126 - t);
  const float s = __fsub_rn(__fdiv_rn(hi, den), __fdiv_rn(lo, den));
  return s > 0.0f ? s : 1.0f;
}

// Four int8 values (each in the low byte of an int) -> one dp4a operand, lowest k in the lowest byte.
__device__ __forceinline__ int pack4_s8(int a, int b, int c, int d) {
  return static_cast<int>(__byte_perm(__byte_perm(a, b, 0x0040), __byte_perm(c, d, 0x0040), 0x5410));
}

// ---------------------------------------------------------------------------------------------------------------
// Tiles: 64x64 outputs per block of 128 threads, reduction steps of 64 elements.
constexpr int kT = 64;
constexpr int kTileThreads = 128;
constexpr int kAux = 2048;  // shared entries (8 KB) for a block's codebook tables or codebook-gradient sums

// A packed weight as the kernels see it. Rows are word arrays (packing.h pads each row to whole 32-bit words).
struct PackedRows {
  const uint32_t* packed;
  int64_t row_words;
  int row_align;  // bytes every row start is aligned to: 4, 8 or 16
  int64_t N, kin, rows_per_group;
  const void* table;         // [G, 2**BITS] float or int8 (prepare_tables_kernel); null for the float GEMVs
  int K;
  const void* codebook;      // [G, K] in its own dtype: the GEMV kernels stage their float tables from it
  FloatKind codebook_kind;   // (codebook_entry)
};

// Entry e < 2**BITS of group g's float table: the codebook value, NaN past K (dequantize's rule for bad indices).
// The GEMV kernels stage their tables with it straight from the codebook in its own dtype, so a batch-1 call is
// one launch (no table kernel, no conversion of an fp16 model's codebook).
__device__ __forceinline__ float codebook_entry(const PackedRows& w, int64_t g, int e) {
  return e < w.K ? load_as_float(w.codebook, w.codebook_kind, g * w.K + e) : __uint_as_float(0x7fc00000u);
}

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
      load_words(p.packed + n * p.row_words, ((k0 + col()) / 32) * BITS, p.row_words, p.row_align, w);
    } else {
#pragma unroll
      for (int i = 0; i < BITS; ++i) w[i] = 0;
    }
  }
  __device__ uint32_t index(int j) const { return chunk_index<BITS>(w, j); }

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
        b[(kl / 4 + d) * kLd<E> + nl] = pack4_s8(q[0], q[1], q[2], q[3]);
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
      alignas(16) E av[4];  // written as uint4: aligned even if they ever leave registers
      alignas(16) E bv[8];
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
// The A operand is always a DenseTile (ta); load_b / store_b stage B (decoded W, or dense).
template <typename E, typename Mma, typename A, typename LoadA, typename LoadB, typename StoreB>
__device__ void tile_mainloop(unsigned char* smem, int64_t t0, int64_t t1, A& ta, LoadA load_a, LoadB load_b,
                              StoreB store_b) {
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

}  // namespace weightshare::cuda
