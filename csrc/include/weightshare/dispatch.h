#pragma once
// Turns runtime values into compile-time constants so kernels specialise (shifts, masks and loop counts fold).
#include <c10/util/Exception.h>

#include "weightshare/message.h"

// Calls __VA_ARGS__ with `constexpr int NAME` = bits (1..8).
#define WS_DISPATCH_BITS(bits, NAME, ...)                                                        \
  [&] {                                                                                          \
    switch (bits) {                                                                              \
      case 1: { constexpr int NAME = 1; return __VA_ARGS__(); }                                  \
      case 2: { constexpr int NAME = 2; return __VA_ARGS__(); }                                  \
      case 3: { constexpr int NAME = 3; return __VA_ARGS__(); }                                  \
      case 4: { constexpr int NAME = 4; return __VA_ARGS__(); }                                  \
      case 5: { constexpr int NAME = 5; return __VA_ARGS__(); }                                  \
      case 6: { constexpr int NAME = 6; return __VA_ARGS__(); }                                  \
      case 7: { constexpr int NAME = 7; return __VA_ARGS__(); }                                  \
      case 8: { constexpr int NAME = 8; return __VA_ARGS__(); }                                  \
      default: WS_CHECK_VALUE(false, "weightshare: bits must be in 1..8, got ", bits);        \
    }                                                                                            \
  }()

// Calls __VA_ARGS__ with `constexpr int NAME` = P, the power-of-two table size of a search table (1..256).
#define WS_DISPATCH_POW2(p, NAME, ...)                                                           \
  [&] {                                                                                          \
    switch (p) {                                                                                 \
      case 1: { constexpr int NAME = 1; return __VA_ARGS__(); }                                  \
      case 2: { constexpr int NAME = 2; return __VA_ARGS__(); }                                  \
      case 4: { constexpr int NAME = 4; return __VA_ARGS__(); }                                  \
      case 8: { constexpr int NAME = 8; return __VA_ARGS__(); }                                  \
      case 16: { constexpr int NAME = 16; return __VA_ARGS__(); }                                \
      case 32: { constexpr int NAME = 32; return __VA_ARGS__(); }                                \
      case 64: { constexpr int NAME = 64; return __VA_ARGS__(); }                                \
      case 128: { constexpr int NAME = 128; return __VA_ARGS__(); }                              \
      case 256: { constexpr int NAME = 256; return __VA_ARGS__(); }                              \
      default: WS_CHECK(false, "weightshare: internal error, table size ", p);                \
    }                                                                                            \
  }()

// The float dtypes the ops accept for weights and activations (double is rejected by the checks).
#include <ATen/Dispatch.h>
#define WS_DISPATCH_FLOAT(TYPE, NAME, ...)                       \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))
