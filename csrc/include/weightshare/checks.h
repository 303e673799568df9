#pragma once
// One input check per op, shared by the CPU and CUDA implementations (compiled once, in common/checks.cpp).
// Each failure raises through WS_CHECK_* (message.h: TORCH_CHECK_* with the message built without ostreams),
// with a message naming the argument:
//   TypeError  (WS_CHECK_TYPE)  wrong dtype
//   ValueError (WS_CHECK_VALUE) wrong shape, size, range, empty, non-contiguous
//   RuntimeError (WS_CHECK)     device mismatch
#include <ATen/core/Tensor.h>

#include <optional>
#include <string>

#include "weightshare/message.h"

namespace weightshare {

// A weight tensor seen as `rows` rows (dim 0; 1 for a 1-D tensor) split into `groups` consecutive row blocks,
// each with its own codebook. Group g covers the flat elements [g * group_numel, (g + 1) * group_numel).
struct Grouping {
  int64_t numel;
  int64_t rows;
  int64_t groups;
  int64_t group_numel;
};

void check_bits(int64_t bits);
void check_pack(const at::Tensor& idx, int64_t bits);
void check_unpack(const at::Tensor& packed, int64_t bits, int64_t n);
Grouping check_assign(const at::Tensor& w, const at::Tensor& codebook);
Grouping check_kmeans_step(const at::Tensor& w, const at::Tensor& idx, int64_t k,
                           const std::optional<at::Tensor>& importance, int64_t groups);
Grouping check_loss_aware_assign(const at::Tensor& w, const std::optional<at::Tensor>& grad, const at::Tensor& hdiag,
                                 const at::Tensor& codebook, const std::optional<at::Tensor>& penalty);
void check_kmeans1d_optimal(const at::Tensor& values, const at::Tensor& weights, int64_t k);
// Context coding of an index matrix (CPU only: a sequential arithmetic coder for files, not a kernel).
void check_context_encode(const at::Tensor& indices, int64_t k);
void check_context_decode(const at::Tensor& stream, int64_t rows, int64_t cols, int64_t k);

// A packed weight matrix: `rows` rows of `cols` indices, codebook [groups, K] (K <= 2**bits).
struct PackedWeight {
  int64_t rows;
  int64_t cols;
  int64_t groups;
  int64_t K;
  int64_t row_bytes;
};
PackedWeight check_dequantize(const at::Tensor& packed, const at::Tensor& codebook, int64_t bits,
                              at::IntArrayRef shape);
enum class Activation { Float, Int8 };
// Returns the packed-weight description; x must be [..., in_features].
PackedWeight check_shared_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& codebook,
                                 int64_t bits, int64_t out_features, int64_t in_features,
                                 const std::optional<at::Tensor>& bias, c10::string_view activation,
                                 Activation* parsed);
PackedWeight check_shared_linear_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& packed,
                                          const at::Tensor& codebook, int64_t bits, int64_t out_features,
                                          int64_t in_features);

// Raised after a kernel reports a bad value it found in the data (NaN weight, index out of range, ...).
[[noreturn]] void fail_value(const std::string& message);

}  // namespace weightshare
