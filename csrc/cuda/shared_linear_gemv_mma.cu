// shared_linear for fp16/bf16 activations and few rows of x (up to 16 per block) on tensor cores: the decoded
// weights go straight from the packed indices into mma.sync B fragments in registers, never through memory.
//
// Why mma for a GEMV: the SIMT GEMV spends one shared-memory lookup, one conversion and one fp32 FMA per weight
// and x row; here a 16x8x16 mma does 16 rows x 8 weights x 16 k at once, so the per-weight cost is the decode
// alone (a lookup per *pair* of indices), and 16 rows of x cost the same as one.
//
// The k permutation that makes it cheap. mma.m16n8k16 pairs A[m][k] with B[k][n] for 16 "logical" k, where the
// lane with t = lane % 4 holds logical k {2t, 2t+1, 2t+8, 2t+9} of both operands. The products do not care which
// physical k a logical k stands for, as long as A and B agree. So lane t owns a whole 32-index chunk of its row
// (one BITS-word load), and in k-step s (0..7) of a 128-k unit it supplies physical k = 32t + 4s + {0, 1, 2, 3}:
// B = two index pairs looked up as half2, A = one 8-byte load of 4 consecutive x values per row of x.
//
// Work split. A block owns 16 output rows (2 blocks of 8, the mma's n) and 16 rows of x (grid.z for more); its 4
// warps take the 128-k units of its k-range in turn (grid.y splits k further when the rows alone do not fill the
// GPU) and the loads of a warp's next unit are issued before the current one is computed. The warps' partial
// sums meet in shared memory, in a fixed order, so results are deterministic.
//
// Tables. BITS <= 4 with one codebook per block: a table of all 2**(2 BITS) index pairs as half2, replicated 32
// times so that lane l reads only bank l (no bank conflicts whatever the indices): one 4-byte lookup per two
// weights. Otherwise a table per codebook of single 16-bit entries. Codebook values are rounded to the activation
// dtype, as the tile kernel does; indices >= K decode to NaN (the dequantize rule).
#include "shared_linear_gemv_mma.h"

#include <ATen/ops/empty.h>

#include <cstdlib>
#include <string_view>

#include "weightshare/dispatch.h"

namespace weightshare::cuda {
namespace {

constexpr int kWarps = 4;            // warps per block, splitting its k-range
constexpr int kRowBlocks = 2;        // mma n-blocks of 8 output rows per block
constexpr int kBlockRows = 8 * kRowBlocks;
constexpr int kM = 16;               // rows of x per block (the mma's m)
constexpr int kUnitK = 128;          // k per unit: 4 lanes x one 32-index chunk

struct MmaGemvArgs {
  PackedRows w;
  const void* x;  // T [M, x_ld]
  int64_t x_ld;
  bool x_vec8;    // every row of x starts 8-byte aligned: 4 values per load
  int64_t units, units_per_split;
  Epilogue out;
};

// d += A (16x16, row) * B (16x8, col), fp32 accumulation.
template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#else
  __trap();  // the host never launches this kernel below sm_80 (gemv_mma_takes)
#endif
}

// x[k .. k+4) of one row as two half2 words (k is a multiple of 4); past kin reads 0 (PARTIAL units only).
template <typename T, bool PARTIAL>
__device__ __forceinline__ uint2 load_x4(const T* row, int64_t k, int64_t kin, bool vec8) {
  if (!PARTIAL && vec8) return __ldg(reinterpret_cast<const uint2*>(row + k));
  const uint16_t* r = reinterpret_cast<const uint16_t*>(row);
  uint32_t e[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) e[j] = (!PARTIAL || k + j < kin) ? uint32_t(r[k + j]) : 0u;
  return make_uint2(e[0] | (e[1] << 16), e[2] | (e[3] << 16));
}

template <typename T, int BITS, bool PAIR>
struct Tables {
  static constexpr int TS = 1 << BITS;
  // PAIR: [TS * TS][32] words, entry p = i0 | i1 << BITS -> half2(tab[i0], tab[i1]), column = lane.
  // single: [kBlockRows][TS] 16-bit entries, one table per codebook the block's rows use.
  static constexpr int kWords = PAIR ? TS * TS * 32 : kBlockRows * TS / 2;
  uint32_t words[kWords];
  uint16_t single[PAIR ? TS : 1];
};

template <typename T, int BITS, bool PARTIAL, bool PAIR>
__device__ __forceinline__ void mma_unit(const MmaGemvArgs& a, const Tables<T, BITS, PAIR>& tabs,
                                         const uint32_t (&w)[kRowBlocks][BITS], const int (&tbase)[kRowBlocks],
                                         const T* x_lo, const T* x_hi, bool has_lo, bool has_hi, int64_t u, int t,
                                         int lane, float (&acc)[kRowBlocks][4]) {
  const int64_t kt = u * kUnitK + 32 * t;  // this lane's 32 physical k
  const uint16_t* single = reinterpret_cast<const uint16_t*>(tabs.words);
#pragma unroll
  for (int s = 0; s < 8; ++s) {
    const int64_t k = kt + 4 * s;
    const uint2 lo = has_lo ? load_x4<T, PARTIAL>(x_lo, k, a.w.kin, a.x_vec8) : make_uint2(0u, 0u);
    const uint2 hi = has_hi ? load_x4<T, PARTIAL>(x_hi, k, a.w.kin, a.x_vec8) : make_uint2(0u, 0u);
    const uint32_t af[4] = {lo.x, hi.x, lo.y, hi.y};
#pragma unroll
    for (int nb = 0; nb < kRowBlocks; ++nb) {
      uint32_t b[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        if constexpr (PAIR) {
          b[h] = tabs.words[(chunk_index<2 * BITS>(w[nb], 2 * s + h) << 5) | lane];
        } else {
          const uint32_t e0 = single[tbase[nb] + chunk_index<BITS>(w[nb], 4 * s + 2 * h)];
          const uint32_t e1 = single[tbase[nb] + chunk_index<BITS>(w[nb], 4 * s + 2 * h + 1)];
          b[h] = e0 | (e1 << 16);
        }
        if constexpr (PARTIAL) {  // weights past kin (padding bits, index 0) must not meet x = 0 as Inf * 0
          const int64_t k0 = k + 2 * h;
          if (k0 >= a.w.kin) b[h] = 0u;
          else if (k0 + 1 >= a.w.kin) b[h] &= 0xffffu;
        }
      }
      mma16816<T>(acc[nb], af, b[0], b[1]);
    }
  }
}

// grid: (ceil(N / 16), splits of the 128-k units, ceil(M / 16)); 4 warps.
template <typename T, int BITS, bool PAIR>
__global__ void __launch_bounds__(kWarps * 32) gemv_mma_kernel(const MmaGemvArgs a) {
  constexpr int TS = 1 << BITS;
  __shared__ __align__(16) Tables<T, BITS, PAIR> tabs;
  __shared__ float red[kWarps - 1][kRowBlocks][4][32];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int64_t n0 = int64_t(blockIdx.x) * kBlockRows;
  const int64_t rpg = a.w.rows_per_group;
  const int64_t g_lo = n0 / rpg;

  // This warp's first unit is loaded before the tables are staged, so its latency overlaps the staging.
  const uint32_t* rows[kRowBlocks];
  int tbase[kRowBlocks];
#pragma unroll
  for (int nb = 0; nb < kRowBlocks; ++nb) {
    const int64_t n = min(n0 + nb * 8 + g, a.w.N - 1);  // a row past N repeats the last one and is not stored
    rows[nb] = a.w.packed + n * a.w.row_words;
    tbase[nb] = static_cast<int>(n / rpg - g_lo) * TS;
  }
  const int64_t u_begin = int64_t(blockIdx.y) * a.units_per_split;
  const int64_t u_end = min(a.units, u_begin + a.units_per_split);
  auto load = [&](int64_t u, uint32_t (&w)[kRowBlocks][BITS]) {
#pragma unroll
    for (int nb = 0; nb < kRowBlocks; ++nb) {
      load_words(rows[nb], (u * 4 + t) * BITS, a.w.row_words, a.w.row_align, w[nb]);
    }
  };
  uint32_t cur[kRowBlocks][BITS], nxt[kRowBlocks][BITS] = {};  // nxt: copied on the last pass too, unused
  int64_t u = u_begin + warp;
  if (u < u_end) load(u, cur);

  // Stage the tables from the codebook (codebook_entry: NaN past K).
  if constexpr (PAIR) {
    for (int i = threadIdx.x; i < TS; i += blockDim.x) {
      tabs.single[i] = bits_of(from_float<T>(codebook_entry(a.w, g_lo, i)));
    }
    __syncthreads();
    for (int p = warp; p < TS * TS; p += kWarps) {  // a warp writes one 128-byte row: conflict-free
      tabs.words[(p << 5) | lane] = uint32_t(tabs.single[p & (TS - 1)]) | (uint32_t(tabs.single[p >> BITS]) << 16);
    }
  } else {
    const int64_t g_hi = (min(n0 + kBlockRows, a.w.N) - 1) / rpg;
    uint16_t* single = reinterpret_cast<uint16_t*>(tabs.words);
    for (int i = threadIdx.x; i < (g_hi - g_lo + 1) * TS; i += blockDim.x) {
      single[i] = bits_of(from_float<T>(codebook_entry(a.w, g_lo + i / TS, i % TS)));
    }
  }
  __syncthreads();

  const int64_t m0 = int64_t(blockIdx.z) * kM;
  const int mc = static_cast<int>(a.out.M - m0 < kM ? a.out.M - m0 : kM);
  const T* x = static_cast<const T*>(a.x) + m0 * a.x_ld;
  const bool has_lo = g < mc, has_hi = g + 8 < mc;
  const T* x_lo = x + (has_lo ? g : 0) * a.x_ld;
  const T* x_hi = x + (has_hi ? g + 8 : 0) * a.x_ld;

  float acc[kRowBlocks][4] = {};
  const int64_t full_units = a.w.kin / kUnitK;
  for (; u < u_end; u += kWarps) {
    if (u + kWarps < u_end) load(u + kWarps, nxt);
    if (u < full_units) {
      mma_unit<T, BITS, false, PAIR>(a, tabs, cur, tbase, x_lo, x_hi, has_lo, has_hi, u, t, lane, acc);
    } else {
      mma_unit<T, BITS, true, PAIR>(a, tabs, cur, tbase, x_lo, x_hi, has_lo, has_hi, u, t, lane, acc);
    }
#pragma unroll
    for (int nb = 0; nb < kRowBlocks; ++nb) {
#pragma unroll
      for (int i = 0; i < BITS; ++i) cur[nb][i] = nxt[nb][i];
    }
  }

  // Warps 1..3 hand their sums to warp 0, which adds them in warp order and stores. Accumulator r of row block nb:
  // x row g (+8 for r >= 2), output row nb * 8 + 2t + (r & 1).
  if (warp > 0) {
#pragma unroll
    for (int nb = 0; nb < kRowBlocks; ++nb) {
#pragma unroll
      for (int r = 0; r < 4; ++r) red[warp - 1][nb][r][lane] = acc[nb][r];
    }
  }
  __syncthreads();
  if (warp != 0) return;
#pragma unroll
  for (int nb = 0; nb < kRowBlocks; ++nb) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      float v = acc[nb][r];
#pragma unroll
      for (int w = 0; w < kWarps - 1; ++w) v += red[w][nb][r][lane];
      const int m = g + (r >= 2 ? 8 : 0);
      const int64_t n = n0 + nb * 8 + 2 * t + (r & 1);
      if (m < mc && n < a.w.N) a.out.put(blockIdx.y, m0 + m, n, v);
    }
  }
}

// Whether the kernel's loaded device code has the mma instructions: mma16816 compiles them only for sm_80+ and
// traps otherwise, so a build from PTX for an older arch (TORCH_CUDA_ARCH_LIST="7.5+PTX"), JIT-compiled for an
// H200, must not take this path (a trap would poison the CUDA context). Found by review, session 9.
bool mma_compiled() {
  static const bool ok = [] {
    cudaFuncAttributes attr{};
    if (cudaFuncGetAttributes(&attr, gemv_mma_kernel<__half, 4, false>) != cudaSuccess) {
      (void)cudaGetLastError();  // clear the (non-sticky) error: the next launch check must not see it
      return false;
    }
    return attr.ptxVersion >= 80 && attr.binaryVersion >= 80;
  }();
  return ok;
}

}  // namespace

bool gemv_mma_takes(at::ScalarType x_dtype, int64_t M, int device) {
  const char* sw = std::getenv("WS_CUDA_GEMV");
  const std::string_view mode = sw == nullptr ? std::string_view() : std::string_view(sw);
  if (mode == "off") return false;
  const bool asked = mode == "mma";
  if (M < (asked ? 1 : kGemvMmaFirstM) || M > (asked ? kGemvMmaMaxM : kGemvMmaLastM)) return false;
  return (x_dtype == at::kHalf || x_dtype == at::kBFloat16) &&
         device_attribute<cudaDevAttrComputeCapabilityMajor>(device) >= 8 && mma_compiled();
}

void launch_gemv_mma(const PackedRows& w, const at::Tensor& x, int64_t x_ld, int bits, Epilogue out, int sms) {
  MmaGemvArgs a{};
  a.w = w;
  a.x = x.data_ptr();
  a.x_ld = x_ld;
  a.x_vec8 = reinterpret_cast<uintptr_t>(x.data_ptr()) % 8 == 0 && x_ld % 4 == 0;
  a.units = ceil_div(w.kin, kUnitK);
  const int64_t nblocks = ceil_div(w.N, kBlockRows), mblocks = ceil_div(out.M, kM);
  const auto [splits, per] = split_k(nblocks * mblocks, a.units, 2 * kWarps, sms);
  a.units_per_split = per;
  const at::Tensor workspace = set_splits(out, splits, false, x);
  a.out = out;
  check_grid(splits, mblocks);
  WS_CHECK_VALUE(nblocks <= 0x7fffffffLL, "weightshare: shared_linear has too many output rows for one launch");
  // One codebook per block (all of it, or whole multiples of 16 rows per codebook) lets BITS <= 4 use pair tables.
  const bool one_group = w.rows_per_group == w.N || w.rows_per_group % kBlockRows == 0;
  const dim3 grid(static_cast<unsigned>(nblocks), static_cast<unsigned>(splits), static_cast<unsigned>(mblocks));
  WS_DISPATCH_BITS(bits, BITS, [&] {
    auto go = [&](auto t_tag) {
      using T = decltype(t_tag);
      if constexpr (BITS <= 4) {
        if (one_group) {
          gemv_mma_kernel<T, BITS, true><<<grid, kWarps * 32, 0, stream()>>>(a);
          return;
        }
      }
      gemv_mma_kernel<T, BITS, false><<<grid, kWarps * 32, 0, stream()>>>(a);
    };
    if (x.scalar_type() == at::kHalf) {
      go(__half{});
    } else {
      go(__nv_bfloat16{});
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  finalize(out, false);
}

}  // namespace weightshare::cuda
