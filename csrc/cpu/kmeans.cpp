// CPU k-means kernels: the Lloyd statistics of an assignment (kmeans_step) and the exact weighted 1-D k-means
// by dynamic programming (kmeans1d_optimal).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "weightshare/checks.h"
#include "weightshare/dispatch.h"

namespace weightshare {
namespace {

// Fixed-size chunks, reduced in a fixed order: the float64 sums are bit-identical for any thread count.
constexpr int64_t kChunk = 16384;

template <typename T>
bool accumulate_chunk(const T* w, const uint8_t* idx, const float* h, int64_t n, int k, double* out /* [3, k] */) {
  // Two interleaved table sets break the store-to-load dependency when neighbouring weights share an entry.
  std::vector<double> acc(6 * static_cast<size_t>(k), 0.0);
  double* set[2] = {acc.data(), acc.data() + 3 * k};
  bool bad = false;
  for (int64_t i = 0; i < n; ++i) {
    const unsigned j = idx[i];
    bad |= j >= static_cast<unsigned>(k);
    const unsigned js = j < static_cast<unsigned>(k) ? j : 0;
    const double x = static_cast<double>(static_cast<float>(w[i]));
    const double hi = h ? static_cast<double>(h[i]) : 1.0;
    double* s = set[i & 1];
    const double hx = hi * x;
    s[js] += hx;
    s[k + js] += hi;
    s[2 * k + js] += hx * x;
  }
  for (int j = 0; j < 3 * k; ++j) out[j] = set[0][j] + set[1][j];
  return bad;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kmeans_step_cpu(const at::Tensor& w, const at::Tensor& idx, int64_t k,
                                                               const std::optional<at::Tensor>& importance,
                                                               int64_t groups) {
  const Grouping gr = check_kmeans_step(w, idx, k, importance, groups);
  const int K = static_cast<int>(k);
  const int64_t G = gr.groups, S = gr.group_numel;
  const int64_t chunks = (S + kChunk - 1) / kChunk;  // per group
  at::Tensor stats = at::empty({G, chunks, 3, K}, w.options().dtype(at::kDouble));
  // importance is read as fp32 whatever w's dtype (as the reference reads it; fp16 would overflow above 65504)
  at::Tensor h = importance.has_value() ? importance->to(at::kFloat).contiguous() : at::Tensor();
  double* st = stats.data_ptr<double>();
  const uint8_t* ix = idx.data_ptr<uint8_t>();
  std::atomic<bool> bad{false};
  WS_DISPATCH_FLOAT(w.scalar_type(), "weightshare::kmeans_step", [&] {
    const scalar_t* x = w.data_ptr<scalar_t>();
    const float* hx = h.defined() ? h.data_ptr<float>() : nullptr;
    at::parallel_for(0, G * chunks, 1, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const int64_t g = t / chunks, c = t % chunks;
        const int64_t start = g * S + c * kChunk;
        const int64_t n = std::min(kChunk, S - c * kChunk);
        if (accumulate_chunk(x + start, ix + start, hx ? hx + start : nullptr, n, K, st + t * 3 * K)) bad = true;
      }
    });
  });
  if (bad) fail_value("idx holds a value >= k = " + std::to_string(k));
  // [G, chunks, 3, K] -> three [G, K], summing the chunks in order (no reduction whose order depends on threads).
  // Three separate tensors: the schema promises outputs that do not alias.
  const auto opts = w.options().dtype(at::kDouble);
  at::Tensor out[3] = {at::zeros({G, K}, opts), at::zeros({G, K}, opts), at::zeros({G, K}, opts)};
  double* dst[3] = {out[0].data_ptr<double>(), out[1].data_ptr<double>(), out[2].data_ptr<double>()};
  at::parallel_for(0, G, 64, [&](int64_t b, int64_t e) {
    for (int64_t g = b; g < e; ++g)
      for (int64_t c = 0; c < chunks; ++c)
        for (int q = 0; q < 3; ++q)
          for (int j = 0; j < K; ++j) dst[q][g * K + j] += st[((g * chunks + c) * 3 + q) * K + j];
  });
  return {out[0], out[1], out[2]};
}

// ---------------------------------------------------------------------------------------------------------------
// Exact weighted 1-D k-means. Over sorted distinct values x_0 < ... < x_{n-1} with weights w_i >= 0, clusters are
// contiguous runs; D_m[j] = min_{i<=j} D_{m-1}[i-1] + cost(i, j) with cost the weighted squared error of run i..j
// from prefix sums. The optimal split point is monotone in j, so each layer is solved by divide and conquer in
// O(n log n): O(k n log n) in all, with O(k n) int32 of back-pointers.

struct Prefix {
  std::vector<double> W, S, Q;  // prefix sums of w, w*x, w*x^2 (x centred on the weighted mean)
  double cost(int64_t i, int64_t j) const {  // inclusive run i..j
    const double wt = W[j + 1] - W[i];
    if (wt <= 0) return 0.0;
    const double s = S[j + 1] - S[i];
    const double c = (Q[j + 1] - Q[i]) - s * s / wt;
    return c > 0 ? c : 0.0;  // rounding can make a zero-error run slightly negative
  }
};

void solve_layer(const Prefix& pre, const std::vector<double>& prev, std::vector<double>& cur, int32_t* arg,
                 int64_t jlo, int64_t jhi, int64_t ilo, int64_t ihi) {
  // cur[j] for j in [jlo, jhi], with the optimal start i of the last run known to lie in [ilo, ihi]
  if (jlo > jhi) return;
  const int64_t j = (jlo + jhi) / 2;
  double best = std::numeric_limits<double>::infinity();
  int64_t best_i = ilo;
  for (int64_t i = ilo; i <= std::min(j, ihi); ++i) {
    const double v = prev[i - 1] + pre.cost(i, j);
    if (v < best) {
      best = v;
      best_i = i;
    }
  }
  cur[j] = best;
  arg[j] = static_cast<int32_t>(best_i);
  solve_layer(pre, prev, cur, arg, jlo, j - 1, ilo, best_i);
  solve_layer(pre, prev, cur, arg, j + 1, jhi, best_i, ihi);
}

std::tuple<at::Tensor, at::Tensor> kmeans1d_optimal_cpu(const at::Tensor& values, const at::Tensor& weights,
                                                        int64_t k) {
  check_kmeans1d_optimal(values, weights, k);
  const int64_t n = values.numel();
  const double* x = values.data_ptr<double>();
  const double* w = weights.data_ptr<double>();
  double wsum = 0, xsum = 0;
  for (int64_t i = 0; i < n; ++i) {
    WS_CHECK_VALUE(std::isfinite(x[i]), "weightshare: values must be finite");
    WS_CHECK_VALUE(std::isfinite(w[i]) && w[i] >= 0, "weightshare: weights must be finite and >= 0");
    WS_CHECK_VALUE(i == 0 || x[i] > x[i - 1], "weightshare: values must be sorted ascending and distinct");
    wsum += w[i];
    xsum += w[i] * x[i];
  }
  const int64_t m = std::min<int64_t>(k, n);
  WS_CHECK_VALUE(m * n <= (int64_t(1) << 31), "weightshare: kmeans1d_optimal needs k*n <= 2**31 back-pointers (",
                    m, " x ", n, "); histogram the values first");
  const double shift = wsum > 0 ? xsum / wsum : x[0];
  Prefix pre;
  pre.W.assign(n + 1, 0.0);
  pre.S.assign(n + 1, 0.0);
  pre.Q.assign(n + 1, 0.0);
  for (int64_t i = 0; i < n; ++i) {
    const double xc = x[i] - shift;
    pre.W[i + 1] = pre.W[i] + w[i];
    pre.S[i + 1] = pre.S[i] + w[i] * xc;
    pre.Q[i + 1] = pre.Q[i] + w[i] * xc * xc;
  }
  std::vector<int32_t> arg(static_cast<size_t>(m * n), 0);
  std::vector<double> prev(n), cur(n);
  for (int64_t j = 0; j < n; ++j) prev[j] = pre.cost(0, j);
  for (int64_t layer = 1; layer < m; ++layer) {
    // with layer+1 runs, run ends j >= layer; the last run starts at i >= layer
    std::fill(cur.begin(), cur.end(), std::numeric_limits<double>::infinity());
    solve_layer(pre, prev, cur, arg.data() + layer * n, layer, n - 1, layer, n - 1);
    std::swap(prev, cur);
  }
  // walk back the run starts of the m-run optimum ending at n-1
  at::Tensor centroids = at::empty({m}, values.options());
  double* c = centroids.data_ptr<double>();
  int64_t end = n - 1;
  for (int64_t layer = m - 1; layer >= 0; --layer) {
    const int64_t start = layer == 0 ? 0 : arg[layer * n + end];
    const double wt = pre.W[end + 1] - pre.W[start];
    double mean;
    if (wt > 0) {
      mean = (pre.S[end + 1] - pre.S[start]) / wt + shift;
    } else {  // a run of zero total weight: any point in it is optimal; take its middle value
      mean = x[(start + end) / 2];
    }
    c[layer] = mean;
    end = start - 1;
  }
  at::Tensor cost = at::scalar_tensor(prev[n - 1], values.options());
  return {centroids, cost};
}

}  // namespace

TORCH_LIBRARY_IMPL(weightshare, CPU, m) {
  m.impl("kmeans_step", &kmeans_step_cpu);
  m.impl("kmeans1d_optimal", &kmeans1d_optimal_cpu);
}

}  // namespace weightshare
