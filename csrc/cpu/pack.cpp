// CPU pack/unpack: word-at-a-time packing and index-at-a-time unpacking over the layout in packing.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>

#include "weightshare/checks.h"
#include "weightshare/dispatch.h"
#include "weightshare/packing.h"

namespace weightshare {
namespace {

at::Tensor pack_cpu(const at::Tensor& idx, int64_t bits) {
  check_pack(idx, bits);
  const int64_t n = idx.size(-1);
  const int64_t rows = idx.numel() / n;
  const int64_t words = packed_row_words(n, static_cast<int>(bits));
  auto out_sizes = idx.sizes().vec();
  out_sizes.back() = words * 4;
  at::Tensor out = at::empty(out_sizes, idx.options());
  const uint8_t* src = idx.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  std::atomic<bool> bad{false};
  const int b = static_cast<int>(bits);
  at::parallel_for(0, rows * words, 16384, [&](int64_t begin, int64_t end) {
    bool local_bad = false;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t r = t / words, w = t % words;
      const uint32_t word = pack_word(src + r * n, n, b, w, &local_bad);
      uint8_t* p = dst + r * words * 4 + w * 4;  // little-endian byte order, whatever the host
      p[0] = word & 0xff;
      p[1] = (word >> 8) & 0xff;
      p[2] = (word >> 16) & 0xff;
      p[3] = word >> 24;
    }
    if (local_bad) bad = true;
  });
  if (bad) fail_value("idx holds a value >= 2**bits = " + std::to_string(1 << b) + "; it cannot be packed in " +
                      std::to_string(b) + " bits");
  return out;
}

at::Tensor unpack_cpu(const at::Tensor& packed, int64_t bits, int64_t n) {
  check_unpack(packed, bits, n);
  const int64_t row_bytes = packed.size(-1);
  const int64_t rows = packed.numel() / row_bytes;
  auto out_sizes = packed.sizes().vec();
  out_sizes.back() = n;
  at::Tensor out = at::empty(out_sizes, packed.options());
  const uint8_t* src = packed.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  const int b = static_cast<int>(bits);
  WS_DISPATCH_BITS(b, BITS, [&] {
    at::parallel_for(0, rows, std::max<int64_t>(1, 65536 / n), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const uint8_t* row = src + r * row_bytes;
        uint8_t* o = dst + r * n;
        for (int64_t i = 0; i < n; ++i) o[i] = static_cast<uint8_t>(unpack_one(row, i, BITS));
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(weightshare, CPU, m) {
  m.impl("pack", &pack_cpu);
  m.impl("unpack", &unpack_cpu);
}

}  // namespace weightshare
