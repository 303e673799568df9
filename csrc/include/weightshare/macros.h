#pragma once
// Host/device qualifiers shared by the headers that both the C++ and the CUDA kernels include.
#if defined(__CUDACC__)
#define WS_HD __host__ __device__ __forceinline__
#else
#define WS_HD inline
#endif
