// Host run of the implicit-GEMM convolution's index arithmetic (csrc/cuda/shared_conv_implicit.cu through
// weightshare/implicit_conv.h): the weight's packed rows repacked into the GEMM's (r, s, c) order by
// repacked_word, every 16-byte chunk of every unit's x tile filled as load_conv_tile fills it (pixel_origin,
// conv_tap, tap_offset; -1 = zeros), then y = X W'^T summed over whole 128-index units, including the rows of the
// last block past the output pixels. Integer values, so the result must equal a direct convolution of the NHWC
// input with the [O, C, R, S] weight exactly. Also checks what the kernel's 16-byte copies assume: a chunk's 8
// positions are 8 consecutive elements of x (one tap, consecutive channels), its offset a multiple of 8 elements
// and inside x; and that a 1x1 layer whose channels fill whole units needs no repack (the kernel skips it there).
// Built and run by tests/test_lane_layout.py; prints "ok" or the first failures.
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "weightshare/implicit_conv.h"
#include "weightshare/packing.h"

using namespace weightshare;

static int failures = 0;

static void fail(const char* what, int bits, long a, long b) {
  if (failures++ < 10) std::printf("FAIL %s bits=%d (%ld, %ld)\n", what, bits, a, b);
}

struct Case {
  int N, C, H, W, O, R, S, sh, sw, ph, pw, dh, dw;
};

static void check(const Case& c, int bits, std::mt19937& gen) {
  ConvGeometry g{};
  g.H = c.H;
  g.W = c.W;
  g.C = c.C;
  g.R = c.R;
  g.S = c.S;
  g.stride_h = c.sh;
  g.stride_w = c.sw;
  g.pad_h = c.ph;
  g.pad_w = c.pw;
  g.dil_h = c.dh;
  g.dil_w = c.dw;
  g.Ho = (c.H + 2 * c.ph - c.dh * (c.R - 1) - 1) / c.sh + 1;
  g.Wo = (c.W + 2 * c.pw - c.dw * (c.S - 1) - 1) / c.sw + 1;
  g.K = c.R * c.S * c.C;
  const int64_t K = g.K, P = int64_t(c.N) * g.Ho * g.Wo;
  const int64_t units = (K + 127) / 128, Kp = 128 * units;
  const int64_t rows_of_x = (P + 127) / 128 * 128;  // whole blocks of the widest tile: rows past P included

  // the weight: indices [O, C, R, S], each row packed in that order; values small integers
  std::vector<uint8_t> idx(size_t(c.O) * K);
  for (auto& v : idx) v = static_cast<uint8_t>(gen() & ((1u << bits) - 1u));
  const int64_t row_bytes = packed_row_bytes(K, bits);
  std::vector<uint8_t> packed(size_t(c.O) * row_bytes);
  bool bad = false;
  for (int o = 0; o < c.O; ++o) {
    for (int64_t w = 0; w < row_bytes / 4; ++w) {
      const uint32_t word = pack_word(&idx[size_t(o) * K], K, bits, w, &bad);
      for (int b = 0; b < 4; ++b) packed[size_t(o) * row_bytes + 4 * w + b] = uint8_t(word >> (8 * b));
    }
  }
  std::vector<int64_t> values(size_t(1) << bits);
  for (auto& v : values) v = int64_t(gen() % 41) - 20;
  std::vector<int64_t> x(size_t(c.N) * c.H * c.W * c.C);  // NHWC
  for (auto& v : x) v = int64_t(gen() % 21) - 10;

  // repack as repack_kernel does, and read the GEMM's weight W'[o][k] back from it
  const int64_t row_words = Kp * bits / 32;
  std::vector<uint8_t> repacked(size_t(c.O) * row_words * 4);
  for (int o = 0; o < c.O; ++o) {
    for (int64_t w = 0; w < row_words; ++w) {
      const uint32_t word = repacked_word(g, &packed[size_t(o) * row_bytes], bits, Kp, w);
      for (int b = 0; b < 4; ++b) repacked[(size_t(o) * row_words + w) * 4 + b] = uint8_t(word >> (8 * b));
    }
  }
  if (c.R == 1 && c.S == 1 && c.C % 128 == 0) {  // the kernel uses the packed rows as they are
    for (size_t i = 0; i < packed.size(); ++i) {
      if (packed[i] != repacked[i]) fail("1x1 repack is not the identity", bits, long(i), 0);
    }
  }

  // X [rows_of_x, Kp] as the kernel's copies fill it
  std::vector<int64_t> X(size_t(rows_of_x) * Kp, 0);
  for (int64_t m = 0; m < rows_of_x; ++m) {
    const PixelOrigin origin = pixel_origin(g, m, P);
    for (int64_t u = 0; u < units; ++u) {
      for (int chunk = 0; chunk < 16; ++chunk) {
        const int32_t k0 = static_cast<int32_t>(u * 128 + 8 * chunk);
        const ConvTap tap = conv_tap(g, k0);
        const int64_t off = tap_offset(g, origin, tap);
        if (off < 0) continue;  // zero-filled
        if (m >= P) fail("a row past the pixels reads x", bits, long(m), long(k0));
        if (off % 8 != 0 || off + 8 > int64_t(x.size())) fail("chunk misaligned or outside x", bits, long(m), off);
        for (int j = 0; j < 8; ++j) {
          // the chunk's positions one by one must be consecutive elements: one tap, consecutive channels
          const int64_t oj = tap_offset(g, origin, conv_tap(g, k0 + j));
          if (oj != off + j) fail("chunk is not 8 consecutive elements", bits, long(m), long(k0 + j));
          X[size_t(m) * Kp + k0 + j] = x[size_t(off + j)];
        }
      }
    }
  }

  // y = X W'^T against the direct convolution
  for (int64_t m = 0; m < P; ++m) {
    const int64_t n = m / (int64_t(g.Ho) * g.Wo), rem = m % (int64_t(g.Ho) * g.Wo);
    const int oh = int(rem / g.Wo), ow = int(rem % g.Wo);
    for (int o = 0; o < c.O; ++o) {
      const uint8_t* wrow = &repacked[size_t(o) * row_words * 4];
      int64_t got = 0;
      for (int64_t k = 0; k < Kp; ++k) got += X[size_t(m) * Kp + k] * values[unpack_one(wrow, k, bits)];
      int64_t want = 0;
      for (int ci = 0; ci < c.C; ++ci) {
        for (int r = 0; r < c.R; ++r) {
          for (int s = 0; s < c.S; ++s) {
            const int ih = oh * c.sh - c.ph + r * c.dh, iw = ow * c.sw - c.pw + s * c.dw;
            if (ih < 0 || ih >= c.H || iw < 0 || iw >= c.W) continue;
            const int64_t xv = x[((size_t(n) * c.H + ih) * c.W + iw) * c.C + ci];
            want += xv * values[idx[size_t(o) * K + (int64_t(ci) * c.R + r) * c.S + s]];
          }
        }
      }
      if (got != want) fail("y != direct conv", bits, long(m), long(o));
    }
  }
}

int main() {
  std::mt19937 gen(7);
  const Case cases[] = {
      // N  C   H   W   O  R  S  sh sw ph pw dh dw
      {1, 64, 7, 7, 5, 3, 3, 1, 1, 1, 1, 1, 1},     // ResNet 3x3: K = 576, a partial last unit
      {2, 8, 5, 6, 3, 3, 3, 1, 1, 1, 1, 1, 1},      // K = 72 < 128: one partial unit; two images
      {1, 24, 9, 8, 4, 5, 5, 2, 2, 2, 2, 1, 1},     // 5x5, stride 2
      {1, 16, 10, 11, 3, 3, 3, 1, 1, 2, 2, 2, 2},   // dilation 2
      {1, 16, 9, 10, 3, 3, 3, 1, 1, 1, 2, 1, 2},    // dilation (1, 2), padding (1, 2)
      {2, 32, 6, 9, 2, 1, 3, 2, 1, 0, 1, 1, 1},     // 1x3 taps, stride (2, 1), padding (0, 1)
      {1, 128, 4, 4, 6, 1, 1, 1, 1, 0, 0, 1, 1},    // 1x1, whole units: no repack
      {3, 256, 3, 2, 2, 1, 1, 2, 2, 0, 0, 1, 1},    // 1x1 stride 2, three images
      {1, 128, 5, 5, 2, 3, 3, 2, 2, 1, 1, 1, 1},    // K = 1152: whole units at 3x3, stride 2
      {1, 40, 3, 3, 2, 3, 3, 1, 1, 0, 0, 1, 1},     // one output pixel, C not a power of two
  };
  for (const Case& c : cases) {
    for (int bits = 1; bits <= 8; ++bits) check(c, bits, gen);
  }
  if (failures == 0) std::printf("ok\n");
  return failures == 0 ? 0 : 1;
}
