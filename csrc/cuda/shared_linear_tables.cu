// The per-group decode tables of shared_linear's CUDA kernels (shared_linear_tables.h says which), and for int8
// activations the codebook's int8 grid, scale and zero point, computed on the GPU so a call never synchronises.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include "weightshare/cuda_decode.h"
#include "weightshare/cuda_linear.h"
#include "weightshare/cuda_utils.h"
#include "weightshare/dispatch.h"
#include "weightshare/packing.h"
#include "shared_linear_tables.h"

namespace weightshare::cuda {
namespace {

// The int8 zero points' index frequencies (reference.int8_sample_rows: whole rows spread evenly over the layer,
// about 8192 indices, the first 2**20 columns of each), as the integer weights of reference.int8_zero_weights:
// w[k] = round(2**14 * count[k] / total) (half up) for k < K, total counting indices < K only. One block.
// Each thread takes whole 32-index chunks (BITS words, loaded together before any is counted). The first form read
// index by index (a dependent global load before each shared atomic) and took 14 us of an int8 call at batch 1
// (8192 x 8192, H200, 2026-11-30: one sampled row, 32 byte loads each followed by an atomic per thread); this
// form is compiled, not yet run.
constexpr int64_t kSampleTarget = 8192, kSampleMaxCols = int64_t{1} << 20;

template <int BITS>
__global__ void __launch_bounds__(256) zero_weights_kernel(const uint8_t* __restrict__ packed, int64_t row_bytes,
                                                           int64_t rows, int64_t n, int64_t cols, int K,
                                                           int* __restrict__ weights) {
  __shared__ unsigned int hist[256];
  __shared__ long long total;
  for (int k = threadIdx.x; k < 256; k += blockDim.x) hist[k] = 0;
  __syncthreads();
  const int64_t chunks = (cols + 31) / 32, row_words = row_bytes / 4;
  for (int64_t c = threadIdx.x; c < n * chunks; c += blockDim.x) {
    const int64_t i = c / chunks, ch = c - i * chunks;
    const uint32_t* row = reinterpret_cast<const uint32_t*>(packed + i * rows / n * row_bytes);
    uint32_t w[BITS];
    load_words(row, ch * BITS, row_words, 4, w);  // words past the row read 0; indices past cols are not counted
    const int64_t valid = cols - ch * 32;
#pragma unroll
    for (int j = 0; j < 32; ++j) {
      if (j < valid) atomicAdd(&hist[chunk_index<BITS>(w, j)], 1u);
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    total = 0;
    for (int k = 0; k < K; ++k) total += hist[k];
  }
  __syncthreads();
  for (int k = threadIdx.x; k < 256; k += blockDim.x)
    weights[k] = k < K && total > 0 ? static_cast<int>((hist[k] * (2LL << 14) + total) / (2 * total)) : 0;
}

// The affine grid's phase on one step (reference.quantize_int8_codebook), one candidate per lane: lane j tries
// p = j < 16 ? j : j - 32 (the reference's order) on the warp's sub-grid positions a (lane k holds entry k < K,
// K <= 16) and the warp keeps the first minimum of the residuals' weighted variance F = W * sum w d^2 - (sum w d)^2
// (exact: |S1| < 2**19, S2 < 2**23, the products in int64). Returns the phase, *best its F (warp-uniform).
__device__ __forceinline__ int affine_phase(int a, int K, const int* __restrict__ weights, int lane,
                                            long long* best) {
  const int p = lane < 16 ? lane : lane - 32;
  int W = 0, S1 = 0, S2 = 0;
  for (int k = 0; k < K; ++k) {
    const int ak = __shfl_sync(0xffffffffu, a, k), w = weights[k];
    const int d = ((ak - p + 16) & 31) - 16;
    W += w;
    S1 += w * d;
    S2 += w * d * d;
  }
  long long F = static_cast<long long>(W) * S2 - static_cast<long long>(S1) * S1;
  int j = lane;
  for (int off = 16; off > 0; off >>= 1) {
    const long long F2 = __shfl_xor_sync(0xffffffffu, F, off);
    const int j2 = __shfl_xor_sync(0xffffffffu, j, off);
    if (F2 < F || (F2 == F && j2 < j)) {
      F = F2;
      j = j2;
    }
  }
  *best = F;
  return j < 16 ? j : j - 32;
}

static_assert(kInt8AffinePhases == 32, "affine_phase gives each phase a lane of a warp");

// The sub-grid position of v on step s: rint(32 * (v / s)).
__device__ __forceinline__ int affine_position(float v, float s) {
  return __float2int_rn(__fmul_rn(__fdiv_rn(v, s), 32.0f));
}

// Per-group tables over all 2**bits indices, so the hot loops never compare an index with K. float: the codebook
// in fp32, NaN past K (dequantize's rule for bad indices). int8: reference.quantize_int8_codebook (a 7-bit affine
// grid for K <= 16, its step and phase searched where `search` (a layer-wide codebook), symmetric int8 above; the
// kernels read the signed values q), 0 past K, plus the per-group scale and zero point. One warp per group.
template <typename C>
__global__ void prepare_tables_kernel(const C* __restrict__ cb, int64_t G, int K, int ts, float* tab, int8_t* tabq,
                                      float* scale, const int* __restrict__ weights, float* zero, bool search) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = (int64_t(gridDim.x) * blockDim.x) >> 5;
  for (int64_t g = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) >> 5; g < G; g += warps) {
    const C* c = cb + g * K;
    if (tabq == nullptr) {
      for (int j = lane; j < ts; j += 32) tab[g * ts + j] = j < K ? to_float(c[j]) : __uint_as_float(0x7fc00000u);
      continue;
    }
    const bool affine = K <= kInt8AffineMaxK;
    float s;
    int q_affine = 0;  // this lane's entry on the affine grid (lane < K)
    if (affine) {  // one entry per lane (K <= 16)
      const float v = lane < K ? to_float(c[lane]) : 0.0f;
      const bool finite = __all_sync(0xffffffffu, isfinite(v));
      float lo = v, hi = v;
      for (int off = 16; off > 0; off >>= 1) {
        lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, off));
        hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, off));
      }
      s = int8_affine_scale(lo, hi, finite, 0);
      if (finite) {  // warp-uniform, as every decision below
        int phase = 0;
        if (search) {  // the first minimum of fp64(s * s) * F over the steps, each at its best phase
          double best = __longlong_as_double(0x7ff0000000000000LL);  // +inf
          for (int t = 0; t < kInt8AffineSteps; ++t) {
            const float st = int8_affine_scale(lo, hi, true, t);
            long long F = 0;
            const int p = affine_phase(affine_position(v, st), K, weights, lane, &F);
            const double obj = __dmul_rn(__dmul_rn(static_cast<double>(st), static_cast<double>(st)),
                                         static_cast<double>(F));
            if (obj < best) {
              best = obj;
              s = st;
              phase = p;
            }
          }
        }
        q_affine = lane < K ? (affine_position(v, s) - phase + 16) >> 5 : 0;  // arithmetic shift: floor
        int qmin = min(q_affine, 0);
        for (int off = 16; off > 0; off >>= 1) qmin = min(qmin, __shfl_xor_sync(0xffffffffu, qmin, off));
        const int offset = min(-qmin, 127);
        q_affine = min(max(q_affine, -offset), 127 - offset);
      }
    } else {
      float amax = 0.0f;
      for (int j = lane; j < K; j += 32) amax = nan_max(amax, fabsf(to_float(c[j])));
      for (int off = 16; off > 0; off >>= 1) amax = nan_max(amax, __shfl_xor_sync(0xffffffffu, amax, off));
      s = int8_scale(amax);
    }
    // zero point (reference.int8_zero_points): residuals on the grid of 2**(e - 15), weighted by the index
    // frequencies as integers (zero_weights_kernel); the sum is an exact integer
    int e = 0;
    frexpf(s, &e);  // s in [2**(e-1), 2**e)
    const int a = min(max(15 - e, -100), 100);
    const float up_a = ldexpf(1.0f, a), up_b = ldexpf(1.0f, 15 - e - a);  // exact scalings
    int sum = 0;
    for (int j = lane; j < ts; j += 32) {
      // j < K <= 16 on the affine grid means j == lane: this lane's entry
      const int q = j >= K || !isfinite(s) ? 0 : affine ? q_affine : quantize_int8(to_float(c[j]), s);
      tabq[g * ts + j] = static_cast<int8_t>(q);
      if (j < K && isfinite(s)) {
        const float r = __fmaf_rn(-static_cast<float>(q), s, to_float(c[j]));
        sum += weights[j] * __float2int_rn(__fmul_rn(__fmul_rn(r, up_a), up_b));
      }
    }
    for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    if (lane == 0) {
      scale[g] = s;
      zero[g] = !isfinite(s) ? __int_as_float(0x7fc00000)
                             : __double2float_rn(__dmul_rn(static_cast<double>(sum), ldexp(1.0, e - 29)));
    }
  }
}

}  // namespace

Prepared prepare(const at::Tensor& packed, const at::Tensor& codebook, int bits, const PackedWeight& pw,
                 Tables kind) {
  Prepared p;
  p.packed = reinterpret_cast<uintptr_t>(packed.data_ptr()) % 4 == 0 ? packed : packed.clone();
  const uint8_t* base = p.packed.data_ptr<uint8_t>();
  p.rows = PackedRows{reinterpret_cast<const uint32_t*>(base), pw.row_bytes / 4, row_alignment(base, pw.row_bytes),
                      pw.rows, pw.cols, pw.rows / pw.groups, nullptr, static_cast<int>(pw.K), nullptr,
                      FloatKind::Float};
  if (kind == Tables::None) {  // read in its own dtype (contiguous: check_shared_linear; the caller holds it)
    p.rows.codebook = codebook.data_ptr();
    p.rows.codebook_kind = out_kind(codebook.scalar_type());
    return p;
  }
  const bool int8 = kind == Tables::Int8;
  const int ts = 1 << bits;
  p.table = at::empty({pw.groups, ts}, codebook.options().dtype(int8 ? at::kChar : at::kFloat));
  p.rows.table = p.table.data_ptr();
  at::Tensor weights;
  if (int8) {
    p.scale = at::empty({pw.groups}, codebook.options().dtype(at::kFloat));
    p.zero = at::empty({pw.groups}, codebook.options().dtype(at::kFloat));
    weights = at::empty({256}, codebook.options().dtype(at::kInt));
    const int64_t cols = std::min(pw.cols, kSampleMaxCols);
    const int64_t n = std::min(pw.rows, std::max<int64_t>(1, (kSampleTarget + cols - 1) / cols));
    WS_DISPATCH_BITS(bits, BITS, [&] {
      zero_weights_kernel<BITS><<<1, 256, 0, cuda::stream()>>>(p.packed.data_ptr<uint8_t>(), pw.row_bytes, pw.rows, n,
                                                               cols, static_cast<int>(pw.K), weights.data_ptr<int>());
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  WS_DISPATCH_FLOAT(codebook.scalar_type(), "weightshare::shared_linear_tables", [&] {
    using C = native_t<scalar_t>;
    prepare_tables_kernel<C><<<cuda::blocks_for(pw.groups * 32), cuda::kThreads, 0, cuda::stream()>>>(
        reinterpret_cast<const C*>(codebook.data_ptr<scalar_t>()), pw.groups, static_cast<int>(pw.K), ts,
        int8 ? nullptr : p.table.data_ptr<float>(), int8 ? p.table.data_ptr<int8_t>() : nullptr,
        int8 ? p.scale.data_ptr<float>() : nullptr,
        int8 ? weights.data_ptr<int>() : nullptr,
        int8 ? p.zero.data_ptr<float>() : nullptr,
        /*search=*/pw.groups == 1);  // the grid's step and phase, for a layer-wide codebook
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return p;
}

}  // namespace weightshare::cuda
