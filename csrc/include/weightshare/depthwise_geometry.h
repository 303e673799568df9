#pragma once
// The arithmetic of the CUDA depthwise convolution (csrc/cuda/shared_conv_depthwise.cu), host-callable so that
// tests/native/depthwise_conv_check.cpp runs it against a direct convolution on the CPU: CI has no GPU.
//
// Depthwise: groups = C input channels, each group one input channel and M output channels (the multiplier):
// output channel o reads input channel o / M through its own R x S taps, which are the o-th packed row (R S
// indices in (r, s) order).
#include <cmath>
#include <cstdint>

#include "weightshare/macros.h"

namespace weightshare {

struct DepthwiseGeometry {
  int32_t C, H, W;  // input channels and extent
  int32_t M, O;     // channel multiplier, output channels C M
  int32_t R, S;     // taps
  int32_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int32_t Ho, Wo;
};

// The input channel output channel o reads.
WS_HD int32_t depthwise_input_channel(const DepthwiseGeometry& g, int32_t o) { return o / g.M; }

// Output (oh, ow) of one channel with taps w[R S] (w[r S + s]), reading x through at(ih, iw), which is called only
// inside the image (the padding contributes zeros), in (r, s) order with fp32 FMAs.
template <typename At>
WS_HD float depthwise_output(const DepthwiseGeometry& g, const float* w, int32_t oh, int32_t ow, At at) {
  float acc = 0.0f;
  const int32_t ih0 = oh * g.stride_h - g.pad_h, iw0 = ow * g.stride_w - g.pad_w;
  for (int32_t r = 0; r < g.R; ++r) {
    const int32_t ih = ih0 + r * g.dil_h;
    if (static_cast<uint32_t>(ih) >= static_cast<uint32_t>(g.H)) continue;
    for (int32_t s = 0; s < g.S; ++s) {
      const int32_t iw = iw0 + s * g.dil_w;
      if (static_cast<uint32_t>(iw) >= static_cast<uint32_t>(g.W)) continue;
      acc = fmaf(at(ih, iw), w[r * g.S + s], acc);
    }
  }
  return acc;
}

}  // namespace weightshare
