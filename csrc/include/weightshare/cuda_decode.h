#pragma once
// Device-side helpers of the CUDA shared-weight kernels (dequantize.cu, shared_linear.cu): decoding the packed
// layout of packing.h, scalar conversions, and the int8 quantisation rule of reference.quantize_int8_symmetric.
//
// The unit of decoding is a *chunk*: 32 consecutive indices of a row. A chunk holds exactly 32*BITS bits, so it
// starts on a 32-bit word boundary and covers BITS whole words whatever BITS is (3, 5, 6, 7 included). With BITS
// a compile-time constant and the index within the chunk unrolled, every word select, shift and mask folds.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace weightshare::cuda {

// c10's storage types -> CUDA's native types (same bits; the kernels use the intrinsics of the native ones).
template <typename T> struct Native { using type = T; };
template <> struct Native<c10::Half> { using type = __half; };
template <> struct Native<c10::BFloat16> { using type = __nv_bfloat16; };
template <typename T> using native_t = typename Native<T>::type;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// Round to nearest even, as torch's .to(dtype).
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

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
// (1 where that is not > 0, which includes a NaN max), q = clamp(round_half_even(t / scale), -127, 127). The
// divisions are the correctly rounded ones whatever the compiler flags.

// max that propagates NaN, as torch.amax does (fmaxf would drop it).
__device__ __forceinline__ float nan_max(float a, float b) { return (a > b || a != a) ? a : b; }

__device__ __forceinline__ float int8_scale(float amax) {
  const float s = __fdiv_rn(amax, 127.0f);
  return s > 0.0f ? s : 1.0f;
}

// A NaN input gives 0 (the reference's float->int64 cast of NaN is undefined).
__device__ __forceinline__ int quantize_int8(float v, float scale) {
  const int q = __float2int_rn(__fdiv_rn(v, scale));
  return q < -127 ? -127 : (q > 127 ? 127 : q);
}

// Four int8 values (each in the low byte of an int) -> one dp4a operand, lowest k in the lowest byte.
__device__ __forceinline__ int pack4_s8(int a, int b, int c, int d) {
  return static_cast<int>(__byte_perm(__byte_perm(a, b, 0x0040), __byte_perm(c, d, 0x0040), 0x5410));
}

}  // namespace weightshare::cuda
