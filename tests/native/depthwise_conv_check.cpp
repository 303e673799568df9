// Host run of the CUDA depthwise convolution's arithmetic (csrc/cuda/shared_conv_depthwise.cu through
// weightshare/depthwise_geometry.h): every output of every channel computed by depthwise_output from the input
// channel depthwise_input_channel names, against a direct convolution over the zero-padded input. Integer values,
// so the results must be equal exactly. Also checks that `at` is only called inside the image. Built and run by
// tests/test_lane_layout.py; prints "ok" or the first failures.
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "weightshare/depthwise_geometry.h"

using namespace weightshare;

static int failures = 0;

static void fail(const char* what, long a, long b) {
  if (failures++ < 10) std::printf("FAIL %s (%ld, %ld)\n", what, a, b);
}

struct Case {
  int C, M, H, W, R, S, sh, sw, ph, pw, dh, dw;
};

static void check(const Case& c, std::mt19937& gen) {
  DepthwiseGeometry g{c.C, c.H, c.W, c.M, c.C * c.M, c.R, c.S, c.sh, c.sw, c.ph, c.pw, c.dh, c.dw, 0, 0};
  const int reach_h = c.dh * (c.R - 1) + 1, reach_w = c.dw * (c.S - 1) + 1;
  if (c.H + 2 * c.ph < reach_h || c.W + 2 * c.pw < reach_w) return;
  g.Ho = (c.H + 2 * c.ph - reach_h) / c.sh + 1;
  g.Wo = (c.W + 2 * c.pw - reach_w) / c.sw + 1;
  std::vector<float> x(size_t(c.C) * c.H * c.W), w(size_t(g.O) * c.R * c.S);
  for (auto& v : x) v = float(int(gen() % 21) - 10);
  for (auto& v : w) v = float(int(gen() % 15) - 7);
  for (int o = 0; o < g.O; ++o) {
    const int ci = depthwise_input_channel(g, o);
    if (ci != o / c.M) fail("input channel", o, ci);
    const float* plane = &x[size_t(ci) * c.H * c.W];
    for (int oh = 0; oh < g.Ho; ++oh) {
      for (int ow = 0; ow < g.Wo; ++ow) {
        const float got = depthwise_output(g, &w[size_t(o) * c.R * c.S], oh, ow, [&](int32_t ih, int32_t iw) {
          if (ih < 0 || ih >= c.H || iw < 0 || iw >= c.W) fail("read outside the image", ih, iw);
          return plane[size_t(ih) * c.W + iw];
        });
        double want = 0;
        for (int r = 0; r < c.R; ++r) {
          for (int s = 0; s < c.S; ++s) {
            const int ih = oh * c.sh - c.ph + r * c.dh, iw = ow * c.sw - c.pw + s * c.dw;
            const double xv = (ih < 0 || ih >= c.H || iw < 0 || iw >= c.W) ? 0.0 : plane[size_t(ih) * c.W + iw];
            want += xv * w[(size_t(o) * c.R + r) * c.S + s];
          }
        }
        if (double(got) != want) fail("output != direct conv", o, oh * g.Wo + ow);
      }
    }
  }
}

int main() {
  std::mt19937 gen(11);
  const Case cases[] = {
      // C  M  H   W   R  S  sh sw ph pw dh dw
      {8, 1, 15, 13, 3, 3, 1, 1, 1, 1, 1, 1},
      {8, 2, 9, 11, 3, 3, 1, 1, 0, 0, 1, 1},   // multiplier 2, no padding
      {4, 1, 12, 7, 5, 3, 2, 1, 2, 1, 1, 2},   // non-square taps, mixed stride and dilation
      {6, 1, 10, 10, 3, 3, 3, 3, 4, 4, 2, 2},  // padding beyond the kernel's reach
      {5, 3, 8, 20, 7, 7, 1, 2, 3, 0, 1, 1},
      {3, 1, 4, 4, 1, 1, 1, 1, 0, 0, 1, 1},    // 1x1
      {4, 1, 3, 3, 3, 3, 1, 1, 0, 0, 1, 1},    // one output pixel
      {24, 1, 5, 6, 3, 3, 1, 1, 1, 1, 3, 3},   // dilation past the input: no interior pixel
  };
  for (const Case& c : cases) check(c, gen);
  if (failures == 0) std::printf("ok\n");
  return failures == 0 ? 0 : 1;
}
