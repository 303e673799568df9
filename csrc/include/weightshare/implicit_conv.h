#pragma once
// The index arithmetic of the implicit-GEMM convolution on the fused tensor-core GEMM (csrc/cuda/
// shared_conv_implicit.cu), host-callable so that tests/native/implicit_conv_check.cpp runs it against a direct
// convolution on the CPU: CI has no GPU.
//
// A dense (groups = 1) convolution of channels-last x [N, H, W, C] is the GEMM y [P, O] = X [P, K'] W'^T with
// P = N Ho Wo output pixels in (n, oh, ow) order (so y [P, O] is the output's channels-last layout) and K' = R S C
// reduction positions in (r, s, c) order: position k is channel c = k % C of tap (r, s) = (k / C / S, k / C % S).
// In that order 8 consecutive positions (C % 8 == 0) are 8 consecutive channels of one input pixel, 16 contiguous
// bytes, so the GEMM's x tile is filled by 16-byte cp.async copies straight from x (zero-filled where a tap falls
// in the padding); no im2col matrix is written. The weight's packed rows hold its indices in (c, r, s) order
// (weight_shape [O, C, R, S]); conv_source_index maps a K' position back, and the conv repacks the rows into
// K' order once per call (a read and write of the packed indices: a quarter of the fp16 weight's bytes at 4 bits),
// padded with index 0 to whole 128-position units, where x reads zeros.
#include <cstdint>

#include "weightshare/macros.h"
#include "weightshare/packing.h"

namespace weightshare {

struct ConvGeometry {
  int32_t H, W, C;  // input [N, H, W, C], channels-last, fewer than 2**31 elements
  int32_t R, S;     // kernel taps
  int32_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int32_t Ho, Wo;
  int32_t K;  // R S C: positions at or past it (the last unit's padding) read zeros
};

// Output pixel m's image (element offset of x[n]) and the input row and column its tap (0, 0) reads.
struct alignas(16) PixelOrigin {
  int32_t image, ih0, iw0, unused;  // 16 bytes: one shared-memory load
};

// A row past the P pixels gets an origin whose every tap falls outside the image: its x row reads zeros.
WS_HD PixelOrigin pixel_origin(const ConvGeometry& g, int64_t m, int64_t P) {
  if (m >= P) return PixelOrigin{0, -(1 << 30), -(1 << 30), 0};
  const int64_t per_image = int64_t(g.Ho) * g.Wo;
  const int64_t n = m / per_image, rem = m - n * per_image;
  const int32_t oh = static_cast<int32_t>(rem / g.Wo), ow = static_cast<int32_t>(rem - int64_t(oh) * g.Wo);
  return PixelOrigin{static_cast<int32_t>(n * g.H * g.W * g.C), oh * g.stride_h - g.pad_h, ow * g.stride_w - g.pad_w,
                     0};
}

// Reduction position k's tap: its offsets from a pixel's origin and its channel; `inside` false past K.
struct ConvTap {
  int32_t dh, dw, c;
  bool inside;
};

WS_HD ConvTap conv_tap(const ConvGeometry& g, int32_t k) {  // k >= 0; branch-free, unsigned divisions
  const uint32_t rs = static_cast<uint32_t>(k) / static_cast<uint32_t>(g.C);
  const uint32_t c = static_cast<uint32_t>(k) - rs * static_cast<uint32_t>(g.C);
  const uint32_t r = rs / static_cast<uint32_t>(g.S), s = rs - r * static_cast<uint32_t>(g.S);
  return ConvTap{static_cast<int32_t>(r) * g.dil_h, static_cast<int32_t>(s) * g.dil_w, static_cast<int32_t>(c),
                 k < g.K};
}

// The element offset in x of tap t of the pixel at origin o, or -1 where it reads zero (padding, or past K).
// Branch-free (the kernel's copies sit in its main loop): 32-bit unsigned arithmetic, which wraps harmlessly for a
// tap outside the image and is exact inside it (x has fewer than 2**31 elements).
WS_HD int64_t tap_offset(const ConvGeometry& g, const PixelOrigin& o, const ConvTap& t) {
  const uint32_t ih = static_cast<uint32_t>(o.ih0 + t.dh), iw = static_cast<uint32_t>(o.iw0 + t.dw);
  const bool inside = t.inside & (ih < static_cast<uint32_t>(g.H)) & (iw < static_cast<uint32_t>(g.W));
  const uint32_t offset = static_cast<uint32_t>(o.image) +
                          (ih * static_cast<uint32_t>(g.W) + iw) * static_cast<uint32_t>(g.C) +
                          static_cast<uint32_t>(t.c);
  return inside ? int64_t(offset) : int64_t(-1);
}

// Position k < K of K' order in the weight's packed row ((c, r, s) order: c R S + r S + s).
WS_HD int64_t conv_source_index(const ConvGeometry& g, int64_t k) {
  const int64_t rs = k / g.C, c = k - rs * g.C;
  return c * g.R * g.S + rs;
}

// Word w of a packed row in K' order, n = units * 128 indices, from `row`, the weight's packed row of K indices in
// (c, r, s) order: index 0 past K (x reads zeros there).
WS_HD uint32_t repacked_word(const ConvGeometry& g, const uint8_t* row, int bits, int64_t n, int64_t w) {
  bool bad = false;  // indices < 2**bits by construction
  return pack_word_of([&](int64_t k) { return k < g.K ? unpack_one(row, conv_source_index(g, k), bits) : 0u; }, n,
                      bits, w, &bad);
}

}  // namespace weightshare
