// shared_linear for many rows of x: decode a panel of W's rows into a workspace of x's dtype, multiply it with
// cuBLAS, next panel.
//
// Why: once x has more rows than a GEMV serves, the product is compute-bound and cuBLAS's tensor-core GEMMs are
// several times faster than our 64x64 tile kernels (measured on the H200: 0.11-0.28x of cuBLAS at 16-256 rows).
// Decoding costs ~2.5 bytes of traffic per weight (read the index, write the entry), and a panel sized to half the
// L2 is written and read back from L2, so the decode is a small fraction of the GEMM once x has tens of rows. This
// is the CPU batched path's design (csrc/cpu/shared_linear.cpp): only one panel of the dense weight ever exists.
// Numerics as the tile kernels: codebook values are rounded to x's dtype; products accumulate in fp32 (cuBLAS;
// fp32 x uses true fp32 unless the user allowed TF32 for matmuls, and 16-bit x follows torch's
// allow_fp16/bf16_reduced_precision_reduction); indices >= K decode to NaN. One difference from the GEMV paths: a
// bias of another dtype than x is rounded to x's dtype before cuBLAS adds it (the GEMVs add it in fp32), up to half
// an ulp of the bias in 16-bit outputs.
#include "shared_linear_panels.h"

#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <string_view>

#include "weightshare/cuda_linear.h"
#include "weightshare/cuda_utils.h"
#include "weightshare/dispatch.h"

namespace weightshare::cuda {
namespace {

// Four consecutive 32-bit words of output (16 bytes) from values v[0 .. 16/sizeof(T)).
template <typename T>
__device__ __forceinline__ uint4 pack16(const T* v) {
  if constexpr (sizeof(T) == 4) {
    return make_uint4(__float_as_uint(v[0]), __float_as_uint(v[1]), __float_as_uint(v[2]), __float_as_uint(v[3]));
  } else {
    uint32_t u[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) u[e] = uint32_t(bits_of(v[2 * e])) | (uint32_t(bits_of(v[2 * e + 1])) << 16);
    return make_uint4(u[0], u[1], u[2], u[3]);
  }
}

// Rows [r0, r0 + rows) of W into out [rows, kin], one 32-index chunk per thread (BITS words, one load when aligned).
// vec16: every output row starts 16-byte aligned, so whole chunks are written with 16-byte stores.
template <typename T, int BITS>
__global__ void __launch_bounds__(256) decode_panel_kernel(const PackedRows w, int64_t r0, int64_t rows,
                                                           T* __restrict__ out, bool vec16) {
  constexpr int TS = 1 << BITS;
  constexpr int kPer = 16 / int(sizeof(T));  // values per 16-byte store
  const int64_t chunks = (w.kin + 31) / 32;
  const int64_t total = rows * chunks;
  const float* table = static_cast<const float*>(w.table);
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < total; t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = t / chunks, ch = t - r * chunks, n = r0 + r;
    uint32_t words[BITS];
    load_words(w.packed + n * w.row_words, ch * BITS, w.row_words, w.row_align, words);
    const float* g = table + (n / w.rows_per_group) * TS;
    T* o = out + r * w.kin + ch * 32;
    const int64_t valid = w.kin - ch * 32;
    if (valid >= 32 && vec16) {
#pragma unroll
      for (int s = 0; s < 32 / kPer; ++s) {
        T v[kPer];
#pragma unroll
        for (int e = 0; e < kPer; ++e) v[e] = from_float<T>(__ldg(g + chunk_index<BITS>(words, s * kPer + e)));
        *reinterpret_cast<uint4*>(o + s * kPer) = pack16<T>(v);
      }
    } else {
#pragma unroll
      for (int j = 0; j < 32; ++j) {
        if (j < valid) o[j] = from_float<T>(__ldg(g + chunk_index<BITS>(words, j)));
      }
    }
  }
}

}  // namespace

bool panels_enabled() {
  const char* sw = std::getenv("WS_CUDA_LINEAR");
  return sw == nullptr || std::string_view(sw) != "tiles";
}

void linear_by_panels(const PackedRows& w, int bits, const at::Tensor& x2d, const std::optional<at::Tensor>& bias,
                      at::Tensor& y2d) {
  const int64_t N = w.N, kin = w.kin, es = x2d.element_size();
  // half the L2 (H200: 60 MB -> 30 MB, 1,920 rows of 8,192 fp16 values), at least 4 MB, whole 64-row blocks
  const int64_t l2 = device_attribute<cudaDevAttrL2CacheSize>(x2d.get_device());
  const int64_t budget = std::max<int64_t>(int64_t(4) << 20, l2 / 2);
  int64_t P = std::max<int64_t>(64, budget / (kin * es) / 64 * 64);
  P = std::min(P, N);
  at::Tensor panel = at::empty({P, kin}, x2d.options());
  const bool vec16 = (kin * es) % 16 == 0;
  const at::Tensor b = bias.has_value() ? bias->to(x2d.scalar_type()) : at::Tensor();
  for (int64_t r0 = 0; r0 < N; r0 += P) {
    const int64_t rows = std::min(P, N - r0);
    WS_DISPATCH_FLOAT(x2d.scalar_type(), "weightshare::shared_linear_panels", [&] {
      using T = native_t<scalar_t>;
      WS_DISPATCH_BITS(bits, BITS, [&] {
        decode_panel_kernel<T, BITS><<<blocks_for(rows * ((kin + 31) / 32)), 256, 0, stream()>>>(
            w, r0, rows, reinterpret_cast<T*>(panel.data_ptr<scalar_t>()), vec16);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
    // straight into y's columns [r0, r0 + rows): a row-major slice with row stride N is a matrix cuBLAS writes in
    // place (leading dimension N), so no panel of y is allocated and copied
    const at::Tensor pt = panel.narrow(0, 0, rows).t();
    at::Tensor ys = y2d.narrow(1, r0, rows);
    if (b.defined()) {
      at::addmm_out(ys, b.narrow(0, r0, rows), x2d, pt);
    } else {
      at::mm_out(ys, x2d, pt);
    }
  }
}

}  // namespace weightshare::cuda
