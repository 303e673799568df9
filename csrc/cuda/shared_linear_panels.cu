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
#include "weightshare/packing.h"

namespace weightshare::cuda {
namespace {

constexpr int kDecodeWarps = 8;  // rows decoded at once per block

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

// Rows [r0, r0 + rows) of W into out [rows, kin]: a warp per row (grid-stride), its codebook table staged in shared
// memory, the row walked 256 indices at a time with lane l on indices [8 l, 8 l + 8) (LaneSpan), so the warp reads
// consecutive index words and writes one contiguous run of 512 (16-bit) or 1024 (fp32) bytes per span.
// vec16: every output row starts 16-byte aligned, so each lane writes its 8 values with 16-byte stores.
// The first form (a thread per 32-index chunk, table entries read through L1) wrote 64-byte strided runs and took
// 92 us for 8192x8192 4-bit on the H200 (2026-11-30), 1.7 TB/s of traffic.
template <typename T, int BITS>
__global__ void __launch_bounds__(kDecodeWarps * 32) decode_panel_kernel(const PackedRows w, int64_t r0,
                                                                          int64_t rows, T* __restrict__ out,
                                                                          bool vec16) {
  constexpr int TS = 1 << BITS;
  using Lane = LaneSpan<BITS>;
  constexpr int kAhead = 8 / Lane::kLoad;  // spans whose words are loaded before the first is decoded
  __shared__ float s_tab[kDecodeWarps][TS];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const float* table = static_cast<const float*>(w.table);
  const int64_t full = w.kin / Lane::kSpan;
  const int64_t lane_word = Lane::first_word(lane);
  const int shift = Lane::shift(lane);
  for (int64_t r = int64_t(blockIdx.x) * kDecodeWarps + warp; r < rows; r += int64_t(gridDim.x) * kDecodeWarps) {
    const int64_t n = r0 + r;
    const uint32_t* row = w.packed + n * w.row_words;
    __syncwarp();  // every lane is done with the previous row's table
    for (int j = lane; j < TS; j += 32) s_tab[warp][j] = table[(n / w.rows_per_group) * TS + j];
    __syncwarp();
    T* o = out + r * w.kin;
    for (int64_t sp = 0; sp < full; sp += kAhead) {
      uint32_t words[kAhead][Lane::kLoad];
#pragma unroll
      for (int t = 0; t < kAhead; ++t) {
        const int64_t q = (sp + t) * Lane::kSpanWords + lane_word;
#pragma unroll
        for (int i = 0; i < Lane::kLoad; ++i) {
          words[t][i] = sp + t < full && q + i < w.row_words ? __ldg(row + q + i) : 0u;
        }
      }
#pragma unroll
      for (int t = 0; t < kAhead; ++t) {
        if (sp + t >= full) break;
        uint32_t v[Lane::kWords];
        Lane::align(words[t], shift, v);
        T vals[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) vals[e] = from_float<T>(s_tab[warp][chunk_index<BITS>(v, e)]);
        T* dst = o + (sp + t) * Lane::kSpan + 8 * lane;
        if (vec16) {
#pragma unroll
          for (int h = 0; h < 8 * int(sizeof(T)) / 16; ++h) {
            reinterpret_cast<uint4*>(dst)[h] = pack16<T>(vals + h * (16 / int(sizeof(T))));
          }
        } else {
#pragma unroll
          for (int e = 0; e < 8; ++e) dst[e] = vals[e];
        }
      }
    }
    // the last, partial span, index by index (the padding bits past kin decode to index 0 and are not written)
    for (int64_t k = full * Lane::kSpan + lane; k < w.kin; k += 32) {
      o[k] = from_float<T>(s_tab[warp][unpack_one(reinterpret_cast<const uint8_t*>(row), k, BITS)]);
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
        const int blocks = static_cast<int>(std::min<int64_t>(ceil_div(rows, kDecodeWarps), 65535));
        decode_panel_kernel<T, BITS><<<blocks, kDecodeWarps * 32, 0, stream()>>>(
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
