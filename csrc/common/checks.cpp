#include "weightshare/checks.h"

#include <c10/util/Exception.h>

#include "weightshare/packing.h"
#include "weightshare/search_table.h"

namespace weightshare {
namespace {

bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

void check_device(const at::Tensor& t, const char* name) {
  WS_CHECK(t.device().is_cpu() || t.device().is_cuda(), "weightshare: ", name,
              " must be on a CPU or CUDA device, got ", t.device());
}

void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  WS_CHECK(t.device() == ref.device(), "weightshare: ", name, " is on ", t.device(), " but ", ref_name,
              " is on ", ref.device(), "; all inputs must be on the same device");
}

void check_dense(const at::Tensor& t, const char* name) {
  check_device(t, name);
  WS_CHECK_VALUE(t.numel() > 0, "weightshare: ", name, " is empty (shape ", shape_str(t.sizes()), ")");
  WS_CHECK_VALUE(t.is_contiguous(), "weightshare: ", name, " must be contiguous (call .contiguous())");
  WS_CHECK_VALUE(!t.is_complex(), "weightshare: ", name, " must be real");
}

void check_float(const at::Tensor& t, const char* name) {
  WS_CHECK_TYPE(is_float_type(t.scalar_type()), "weightshare: ", name,
                   " must be float32, float16 or bfloat16, got ", t.scalar_type());
  check_dense(t, name);
}

void check_uint8(const at::Tensor& t, const char* name) {
  WS_CHECK_TYPE(t.scalar_type() == at::kByte, "weightshare: ", name, " must be uint8, got ", t.scalar_type());
  check_dense(t, name);
}

void check_like(const at::Tensor& t, const char* name, const at::Tensor& w) {
  check_float(t, name);
  check_same_device(t, name, w, "w");
  WS_CHECK_VALUE(t.sizes() == w.sizes(), "weightshare: ", name, " must have the shape of w ", shape_str(w.sizes()),
                    ", got ", shape_str(t.sizes()));
}

int64_t rows_of(const at::Tensor& w) { return w.dim() >= 2 ? w.size(0) : 1; }

Grouping grouping(const at::Tensor& w, int64_t groups, const char* what) {
  const int64_t rows = rows_of(w);
  WS_CHECK_VALUE(groups >= 1 && rows % groups == 0, "weightshare: ", what, " has ", groups,
                    " groups, which must divide the ", rows, " rows of w (dim 0); use 1 (per layer) or ", rows,
                    " (per output row)");
  return Grouping{w.numel(), rows, groups, w.numel() / groups};
}

void check_codebook(const at::Tensor& codebook, const at::Tensor& w) {
  check_float(codebook, "codebook");
  check_same_device(codebook, "codebook", w, "w");
  WS_CHECK_VALUE(codebook.dim() == 2, "weightshare: codebook must be 2-D [G, K], got shape ",
                    shape_str(codebook.sizes()));
  WS_CHECK_VALUE(codebook.size(1) >= 1 && codebook.size(1) <= kMaxCodebook, "weightshare: codebook has K=",
                    codebook.size(1), " entries; K must be in 1..", kMaxCodebook, " (indices are uint8)");
}

}  // namespace

void fail_value(const std::string& message) { WS_CHECK_VALUE(false, "weightshare: ", message); }

void check_bits(int64_t bits) {
  WS_CHECK_VALUE(bits >= kMinBits && bits <= kMaxBits, "weightshare: bits must be in ", kMinBits, "..",
                    kMaxBits, ", got ", bits);
}

void check_pack(const at::Tensor& idx, int64_t bits) {
  check_bits(bits);
  check_uint8(idx, "idx");
  WS_CHECK_VALUE(idx.dim() >= 1, "weightshare: idx must have at least one dimension");
}

void check_unpack(const at::Tensor& packed, int64_t bits, int64_t n) {
  check_bits(bits);
  check_uint8(packed, "packed");
  WS_CHECK_VALUE(packed.dim() >= 1, "weightshare: packed must have at least one dimension");
  WS_CHECK_VALUE(n >= 1 && n <= (int64_t(1) << 40), "weightshare: n (indices per row) must be in 1..2**40, got ",
                    n);
  const int64_t expect = packed_row_bytes(n, static_cast<int>(bits));
  WS_CHECK_VALUE(packed.size(-1) == expect, "weightshare: packed rows of ", n, " indices at ", bits,
                    " bits must hold ", expect, " bytes, got last dimension ", packed.size(-1));
}

Grouping check_assign(const at::Tensor& w, const at::Tensor& codebook) {
  check_float(w, "w");
  check_codebook(codebook, w);
  return grouping(w, codebook.size(0), "codebook");
}

Grouping check_kmeans_step(const at::Tensor& w, const at::Tensor& idx, int64_t k,
                           const std::optional<at::Tensor>& importance, int64_t groups) {
  check_float(w, "w");
  check_uint8(idx, "idx");
  check_same_device(idx, "idx", w, "w");
  WS_CHECK_VALUE(idx.sizes() == w.sizes(), "weightshare: idx must have the shape of w ", shape_str(w.sizes()),
                    ", got ", shape_str(idx.sizes()));
  WS_CHECK_VALUE(k >= 1 && k <= kMaxCodebook, "weightshare: k must be in 1..", kMaxCodebook, ", got ", k);
  if (importance.has_value()) check_like(*importance, "importance", w);
  return grouping(w, groups, "groups");
}

Grouping check_loss_aware_assign(const at::Tensor& w, const std::optional<at::Tensor>& grad, const at::Tensor& hdiag,
                                 const at::Tensor& codebook, const std::optional<at::Tensor>& penalty) {
  check_float(w, "w");
  if (grad.has_value()) check_like(*grad, "grad", w);
  check_like(hdiag, "hdiag", w);
  check_codebook(codebook, w);
  if (penalty.has_value()) {
    check_float(*penalty, "penalty");
    check_same_device(*penalty, "penalty", w, "w");
    WS_CHECK_VALUE(penalty->sizes() == codebook.sizes(), "weightshare: penalty must have the shape of codebook ",
                      shape_str(codebook.sizes()), ", got ", shape_str(penalty->sizes()));
  }
  return grouping(w, codebook.size(0), "codebook");
}

void check_kmeans1d_optimal(const at::Tensor& values, const at::Tensor& weights, int64_t k) {
  WS_CHECK_TYPE(values.scalar_type() == at::kDouble, "weightshare: values must be float64, got ",
                   values.scalar_type());
  WS_CHECK_TYPE(weights.scalar_type() == at::kDouble, "weightshare: weights must be float64, got ",
                   weights.scalar_type());
  check_dense(values, "values");
  check_dense(weights, "weights");
  WS_CHECK(values.device().is_cpu() && weights.device().is_cpu(),
              "weightshare: kmeans1d_optimal runs on the CPU (a sequential dynamic programme); values and weights "
              "must be CPU tensors");
  WS_CHECK_VALUE(values.dim() == 1 && weights.dim() == 1 && values.numel() == weights.numel(),
                    "weightshare: values and weights must be 1-D of equal length, got ", shape_str(values.sizes()),
                    " and ", shape_str(weights.sizes()));
  WS_CHECK_VALUE(k >= 1 && k <= kMaxCodebook, "weightshare: k must be in 1..", kMaxCodebook, ", got ", k);
}

void check_context_encode(const at::Tensor& indices, int64_t k) {
  check_uint8(indices, "indices");
  WS_CHECK(indices.device().is_cpu(), "weightshare: context_encode runs on the CPU (a sequential arithmetic "
              "coder for files); indices must be a CPU tensor, got ", indices.device());
  WS_CHECK_VALUE(indices.dim() == 2, "weightshare: indices must be 2-D [rows, cols], got shape ",
                    shape_str(indices.sizes()));
  WS_CHECK_VALUE(indices.is_contiguous(), "weightshare: indices must be contiguous (call .contiguous())");
  WS_CHECK_VALUE(k >= 1 && k <= kMaxCodebook, "weightshare: k must be in 1..", kMaxCodebook, ", got ", k);
}

void check_context_decode(const at::Tensor& stream, int64_t rows, int64_t cols, int64_t k) {
  check_uint8(stream, "stream");
  WS_CHECK(stream.device().is_cpu(), "weightshare: context_decode runs on the CPU (a sequential arithmetic "
              "coder for files); stream must be a CPU tensor, got ", stream.device());
  WS_CHECK_VALUE(stream.dim() == 1, "weightshare: stream must be 1-D, got shape ", shape_str(stream.sizes()));
  WS_CHECK_VALUE(stream.is_contiguous(), "weightshare: stream must be contiguous (call .contiguous())");
  WS_CHECK_VALUE(rows >= 0 && cols >= 0 && (cols == 0 || rows <= (int64_t(1) << 40) / cols),
                    "weightshare: rows and cols must be >= 0 with rows * cols <= 2**40, got ", rows, " and ", cols);
  WS_CHECK_VALUE(k >= 1 && k <= kMaxCodebook, "weightshare: k must be in 1..", kMaxCodebook, ", got ", k);
}

namespace {

PackedWeight check_packed_weight(const at::Tensor& packed, const at::Tensor& codebook, int64_t bits, int64_t rows,
                                 int64_t cols) {
  check_bits(bits);
  check_uint8(packed, "packed");
  check_float(codebook, "codebook");
  check_same_device(codebook, "codebook", packed, "packed");
  WS_CHECK_VALUE(codebook.dim() == 2, "weightshare: codebook must be 2-D [G, K], got shape ",
                    shape_str(codebook.sizes()));
  const int64_t K = codebook.size(1);
  WS_CHECK_VALUE(K >= 1 && K <= (int64_t(1) << bits), "weightshare: codebook has K=", K,
                    " entries, more than 2**bits = ", int64_t(1) << bits, " (bits=", bits, ")");
  WS_CHECK_VALUE(rows >= 1 && cols >= 1 && cols <= (int64_t(1) << 40), "weightshare: the weight must have "
                    "1..2**40 columns and at least one row, got ", rows, " x ", cols);
  const int64_t row_bytes = packed_row_bytes(cols, static_cast<int>(bits));
  WS_CHECK_VALUE(packed.dim() == 2 && packed.size(0) == rows && packed.size(1) == row_bytes,
                    "weightshare: packed must be [", rows, ", ", row_bytes, "] for ", rows, " rows of ", cols,
                    " indices at ", bits, " bits, got ", shape_str(packed.sizes()));
  WS_CHECK_VALUE(rows % codebook.size(0) == 0, "weightshare: codebook has ", codebook.size(0),
                    " groups, which must divide the ", rows, " rows");
  return PackedWeight{rows, cols, codebook.size(0), K, row_bytes};
}

}  // namespace

std::string shape_str(at::IntArrayRef shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i > 0) out += ", ";
    out += std::to_string(shape[i]);
  }
  return out + "]";
}

PackedWeight check_dequantize(const at::Tensor& packed, const at::Tensor& codebook, int64_t bits,
                              at::IntArrayRef shape) {
  WS_CHECK_VALUE(!shape.empty(), "weightshare: shape must have at least one dimension");
  int64_t numel = 1;
  for (int64_t s : shape) {
    WS_CHECK_VALUE(s >= 1, "weightshare: shape must be positive, got ", shape_str(shape));
    WS_CHECK_VALUE(numel <= (int64_t(1) << 40) / s, "weightshare: shape ", shape_str(shape), " is too large");
    numel *= s;
  }
  const int64_t rows = shape[0];
  return check_packed_weight(packed, codebook, bits, rows, numel / rows);
}

PackedWeight check_shared_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& codebook,
                                 int64_t bits, int64_t out_features, int64_t in_features,
                                 const std::optional<at::Tensor>& bias, c10::string_view activation,
                                 Activation* parsed) {
  check_float(x, "x");
  check_same_device(packed, "packed", x, "x");
  WS_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == in_features, "weightshare: x must be [..., in_features=",
                    in_features, "], got ", shape_str(x.sizes()));
  const PackedWeight pw = check_packed_weight(packed, codebook, bits, out_features, in_features);
  if (bias.has_value()) {
    check_float(*bias, "bias");
    check_same_device(*bias, "bias", x, "x");
    WS_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == out_features, "weightshare: bias must be [",
                      out_features, "], got ", shape_str(bias->sizes()));
  }
  if (activation == "float") {
    *parsed = Activation::Float;
  } else if (activation == "int8") {
    *parsed = Activation::Int8;
    // each int32 accumulator lane sums in_features/16 products of at most 255 * 127 (the kernels' VNNI layout)
    WS_CHECK_VALUE(in_features <= 131072, "weightshare: activation=\"int8\" supports in_features <= 131072 "
                      "(int32 accumulators), got ", in_features);
  } else {
    WS_CHECK_VALUE(false, "weightshare: activation must be \"float\" or \"int8\", got \"", activation, "\"");
  }
  return pw;
}

PackedWeight check_shared_linear_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& packed,
                                          const at::Tensor& codebook, int64_t bits, int64_t out_features,
                                          int64_t in_features) {
  Activation unused;
  const PackedWeight pw =
      check_shared_linear(x, packed, codebook, bits, out_features, in_features, std::nullopt, "float", &unused);
  check_float(grad_out, "grad_out");
  check_same_device(grad_out, "grad_out", x, "x");
  WS_CHECK_VALUE(grad_out.dim() == x.dim() && grad_out.size(-1) == out_features &&
                        grad_out.numel() / out_features == x.numel() / in_features,
                    "weightshare: grad_out must be [..., out_features=", out_features, "] matching x ",
                    shape_str(x.sizes()), ", got ", shape_str(grad_out.sizes()));
  return pw;
}

}  // namespace weightshare
