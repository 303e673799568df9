#pragma once
// cuda_emu's stand-in for <mma.h> (wmma): every lane of a warp holds the whole 16x16 tile and computes the whole
// product, so a fragment's element order (opaque to the kernels: they only load, fill, multiply and store) plays
// no part. fp32 accumulation in double, rounded once per mma_sync. A store writes each element from one lane (element
// e from lane e % 32), as the lanes of a real warp split the tile between them: two lanes writing the same bytes
// would be a race to ThreadSanitizer (the tsan variant), and reading back another lane's elements needs a barrier.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace nvcuda::wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

inline float emu_to_float(float v) { return v; }
inline float emu_to_float(__half v) { return __half2float(v); }
inline float emu_to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int rows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int cols = std::is_same_v<Use, matrix_a> ? K : N;
  static constexpr int num_elements = rows * cols;
  T x[rows * cols];
};

template <typename Use, int M, int N, int K, typename T, typename Layout>
inline void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const T* p, unsigned ldm) {
  using F = fragment<Use, M, N, K, T, Layout>;
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c)
      f.x[r * F::cols + c] = std::is_same_v<Layout, col_major> ? p[c * ldm + r] : p[r * ldm + c];
}

template <int M, int N, int K, typename T>
inline void fill_fragment(fragment<accumulator, M, N, K, T>& f, T v) {
  for (auto& e : f.x) e = v;
}

template <int M, int N, int K, typename T, typename TA, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, M, N, K, T>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
                     const fragment<matrix_b, M, N, K, TA, LB>& b, const fragment<accumulator, M, N, K, T>& c) {
  fragment<accumulator, M, N, K, T> out;
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      double s = c.x[i * N + j];
      for (int k = 0; k < K; ++k) s += double(emu_to_float(a.x[i * K + k])) * emu_to_float(b.x[k * N + j]);
      out.x[i * N + j] = static_cast<T>(s);
    }
  d = out;
}

template <int M, int N, int K, typename T>
inline void store_matrix_sync(T* p, const fragment<accumulator, M, N, K, T>& f, unsigned ldm, layout_t layout) {
  const int lane = ws_emu::linear_thread() % ws_emu::kWarp;
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      if ((i * N + j) % ws_emu::kWarp != lane) continue;
      (layout == mem_col_major ? p[j * ldm + i] : p[i * ldm + j]) = f.x[i * N + j];
    }
}
}  // namespace nvcuda::wmma
