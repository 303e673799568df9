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
// B = two index pairs looked up as half2, A = 4 consecutive x values per row of x (two 4-byte loads).
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
#include <type_traits>

#include "weightshare/dispatch.h"
#include "weightshare/packing.h"
#include "mma_ptx.h"

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

// x[k .. k+4) of one row as two half2 words (k is a multiple of 4); past kin reads 0 (PARTIAL units only). XV8: the
// rows are 8-byte aligned (a template flag: as a run-time one, both load forms sat in the loop).
template <typename T, bool PARTIAL, bool XV8>
__device__ __forceinline__ uint2 load_x4(const T* row, int64_t k, int64_t kin) {
  if constexpr (!PARTIAL && XV8) {
    return __ldg(reinterpret_cast<const uint2*>(row + k));
  } else {
    const uint16_t* r = reinterpret_cast<const uint16_t*>(row);
    uint32_t e[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) e[j] = (!PARTIAL || k + j < kin) ? uint32_t(r[k + j]) : 0u;
    return make_uint2(e[0] | (e[1] << 16), e[2] | (e[3] << 16));
  }
}

// Byte offset, in the replicated pair table, of the entry for index pair j (2 BITS bits) of the chunk in w, less the
// lane's column: entry p, lane l sits at word 32 p + l, byte (p << 7) + (l << 2), so the pair's bits are shifted
// to bit 7 and masked (a shift and one LOP3); the caller adds its lane's column and the table's address, one
// register for the whole loop. (The table's shared address on sm_90 carries the CTA's cluster id and is not a
// link-time constant, so it cannot be folded into the load; the form through chunk_index spent a shift, a mask,
// another shift, an OR and the add.)
template <int BITS>
__device__ __forceinline__ uint32_t pair_offset(const uint32_t* w, int j) {
  return field_at<2 * BITS, 7>(w, j);
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

// One 128-k unit. Rows of x past M are read from a valid row (x_lo / x_hi clamped) rather than zeroed, for the
// reason above. HI: some row of x lands in fragment rows 8-15 (M > 8 in this block). On whole units with aligned
// x rows the fragment registers are loaded 4 bytes at a time straight into their slots ({row g, row g + 8} x
// {k 0-1, k 2-3}): assembling them from two 8-byte loads cost four register moves per mma (SASS, sm_90).
template <typename T, int BITS, bool PARTIAL, bool PAIR, bool XV8, bool HI>
__device__ __forceinline__ void mma_unit(const MmaGemvArgs& a, const Tables<T, BITS, PAIR>& tabs,
                                         const uint32_t (&w)[kRowBlocks][BITS], const int (&tbase)[kRowBlocks],
                                         const T* x_lo, const T* x_hi, int64_t u, int t, uint32_t pair_base,
                                         float (&acc)[kRowBlocks][4]) {
  const int64_t kt = u * kUnitK + 32 * t;  // this lane's 32 physical k
  const uint16_t* single = reinterpret_cast<const uint16_t*>(tabs.words);
#pragma unroll
  for (int s = 0; s < 8; ++s) {
    const int64_t k = kt + 4 * s;
    uint32_t af[4];
    if constexpr (!PARTIAL && XV8) {
      const uint32_t* lo = reinterpret_cast<const uint32_t*>(x_lo + k);
      af[0] = __ldg(lo);
      af[2] = __ldg(lo + 1);
      if constexpr (HI) {
        const uint32_t* hi = reinterpret_cast<const uint32_t*>(x_hi + k);
        af[1] = __ldg(hi);
        af[3] = __ldg(hi + 1);
      } else {
        af[1] = unspecified();
        af[3] = unspecified();
      }
    } else {
      const uint2 lo = load_x4<T, PARTIAL, XV8>(x_lo, k, a.w.kin);
      const uint2 hi = load_x4<T, PARTIAL, XV8>(x_hi, k, a.w.kin);
      af[0] = lo.x;
      af[1] = hi.x;
      af[2] = lo.y;
      af[3] = hi.y;
    }
#pragma unroll
    for (int nb = 0; nb < kRowBlocks; ++nb) {
      uint32_t b[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        if constexpr (PAIR) {
          b[h] = lds_u32(pair_base + pair_offset<BITS>(w[nb], 2 * s + h));
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
template <typename T, int BITS, bool PAIR, bool XV8>
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
  const int64_t full_units = a.w.kin / kUnitK;
  // a whole unit's words lie inside the row: plain loads (u is the same across the warp, so the branch is uniform)
  auto load = [&](int64_t u, uint32_t (&w)[kRowBlocks][BITS]) {
#pragma unroll
    for (int nb = 0; nb < kRowBlocks; ++nb) {
      const int64_t w0 = (u * 4 + t) * BITS;
      if (u < full_units) {
#pragma unroll
        for (int i = 0; i < BITS; ++i) w[nb][i] = __ldg(rows[nb] + w0 + i);
      } else {
        load_words(rows[nb], w0, a.w.row_words, a.w.row_align, w[nb]);
      }
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
  const T* x_lo = x + (g < mc ? g : 0) * a.x_ld;  // rows past M: any valid row (mma_unit)
  const T* x_hi = x + (g + 8 < mc ? g + 8 : 0) * a.x_ld;

  float acc[kRowBlocks][4] = {};
  // this lane's column of the pair table (PAIR): its address plus the lane's 4 bytes, added to each entry's offset
  const uint32_t pair_base = shared_address(tabs.words) + (uint32_t(lane) << 2);
  auto run = [&](auto hi_tag) {
    constexpr bool HI = decltype(hi_tag)::value;
    for (; u < u_end; u += kWarps) {
      if (u + kWarps < u_end) load(u + kWarps, nxt);
      if (u < full_units) {
        mma_unit<T, BITS, false, PAIR, XV8, HI>(a, tabs, cur, tbase, x_lo, x_hi, u, t, pair_base, acc);
      } else {
        mma_unit<T, BITS, true, PAIR, XV8, HI>(a, tabs, cur, tbase, x_lo, x_hi, u, t, pair_base, acc);
      }
#pragma unroll
      for (int nb = 0; nb < kRowBlocks; ++nb) {
#pragma unroll
        for (int i = 0; i < BITS; ++i) cur[nb][i] = nxt[nb][i];
      }
    }
  };
  if (mc > 8) {  // the same for the whole block
    run(std::true_type{});
  } else {
    run(std::false_type{});
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

// Whether the loaded device code has the sm_80 instructions (has_sm80_code), asked once.
bool mma_compiled() {
  static const bool ok = has_sm80_code(reinterpret_cast<const void*>(gemv_mma_kernel<__half, 4, false, true>));
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
    auto go = [&](auto t_tag, auto xv8_tag) {
      using T = decltype(t_tag);
      constexpr bool XV8 = decltype(xv8_tag)::value;
      if constexpr (BITS <= 4) {
        if (one_group) {
          gemv_mma_kernel<T, BITS, true, XV8><<<grid, kWarps * 32, 0, stream()>>>(a);
          return;
        }
      }
      gemv_mma_kernel<T, BITS, false, XV8><<<grid, kWarps * 32, 0, stream()>>>(a);
    };
    auto go_x = [&](auto t_tag) {
      if (a.x_vec8) {
        go(t_tag, std::true_type{});
      } else {
        go(t_tag, std::false_type{});
      }
    };
    if (x.scalar_type() == at::kHalf) {
      go_x(__half{});
    } else {
      go_x(__nv_bfloat16{});
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  finalize(out, false);
}

}  // namespace weightshare::cuda
