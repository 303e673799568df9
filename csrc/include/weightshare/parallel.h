#pragma once
// CPU helpers: grouped parallel loops over flat element ranges.
#include <ATen/Parallel.h>

#include <algorithm>

#include "weightshare/checks.h"

namespace weightshare {

// Calls fn(group, begin, end) over flat element ranges that never cross a group boundary, in parallel with
// torch's intra-op thread pool (torch.set_num_threads). Each range has at least about `grain` elements where the
// data allows. Results must not depend on how ranges are split (the kernels are elementwise).
template <typename Fn>
void for_each_group_range(const Grouping& gr, int64_t grain, const Fn& fn) {
  at::parallel_for(0, gr.numel, grain, [&](int64_t begin, int64_t end) {
    int64_t pos = begin;
    while (pos < end) {
      const int64_t g = pos / gr.group_numel;
      const int64_t stop = std::min(end, (g + 1) * gr.group_numel);
      fn(g, pos, stop);
      pos = stop;
    }
  });
}

}  // namespace weightshare
