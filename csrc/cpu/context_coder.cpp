// Context-adaptive binary arithmetic coding of a layer's index matrix (ops context_encode / context_decode).
//
// Why: after pruning, most of a compressed file is the *positions* of the surviving weights, and those are not
// independent. Whole input columns die (MNIST's border pixels, unused input channels), whole units die, and
// survivors cluster along rows. The static rANS coder (python/weightshare/entropy.py) spends H(density) bits per
// weight whatever the neighbourhood; this coder predicts each weight's "is it the background symbol?" flag from
// what it has already seen around it and adapts its probabilities as it goes, so nothing but the symbols is
// stored (no tables). Measured on pruned LeNet-300-100 it needs ~20 % fewer bits for the positions.
//
// The model, for an index matrix [rows, cols] (rows = output units, cols = fan-in) with k symbols:
//   * background b = the most frequent symbol (lowest on ties), stored in the header;
//   * per position (row-major), the flag "symbol != b", coded with an adaptive binary model chosen by
//       - the flags of the two left neighbours and of the one above (0 outside the matrix),
//       - how dense this column was in the rows above, and this row in the columns to the left, each relative to
//         the density of everything coded so far (5 classes: nothing seen yet / none / below half / up to twice
//         / above twice);
//   * for a non-background symbol, its rank among the k-1 others, bit by bit (most significant first) down a
//     binary tree of adaptive models (one per tree node).
//   * optionally (the stream's mode byte, version 2), occupancy flags coded first: per column "holds any
//     non-background symbol" (mode bit 1), and per row the same (mode bit 0), each with an adaptive model chosen
//     by the previous column's / row's flag. An empty row is then skipped entirely (nothing coded or recorded: the
//     rows around it see each other as neighbours); a position in an empty column is not coded but recorded as
//     background; and in an occupied row whose flags so far are all background, the last position that can hold
//     a symbol is implied. Why: pruning kills whole units and inputs. In a 2-bit LeNet-5 fc1 (500 x 800, 266
//     dead units) the dead rows cost 548 of 6,226 bytes without row flags and about 60 with them. The encoder
//     codes every mode and keeps the shortest stream (ties: the lowest mode); mode 0 codes exactly what
//     version 1 did.
// Each model estimates P(0) as (zeros + 1/2) / (seen + 1) (Krichevsky-Trofimov) over its first kWindow symbols,
// then as an exponentially weighted average over about that many, in 16-bit fixed point.
//
// The arithmetic coder is a carry-propagating binary range coder: 32-bit range, 64-bit low with a pending byte
// and a count of pending 0xFF bytes for the carry. Encoder and decoder share every model update, so the stream is
// exactly the coded bits. Stream layout: [version = 2][b][mode][range-coder bytes] (version 1, still read:
// [1][b][range-coder bytes], mode 0). The decoder validates all of it: version, b < k, mode < 4, the coder's
// leading zero byte, every decoded rank < k - 1, an occupied row when no column is occupied, and that it consumed
// exactly the stream's bytes (a truncated or padded stream fails instead of decoding garbage).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <vector>

#include "weightshare/checks.h"

namespace weightshare {
namespace {

constexpr uint8_t kStreamVersion = 2;
constexpr int kRowFlags = 1, kColumnFlags = 2, kModes = 4;
constexpr int kWindow = 1024;           // KT counting for this many symbols, then a window of about as many
constexpr uint32_t kMinProb = 16;       // P(0) in [16, 65520] / 65536: a surprise costs at most 12 bits
constexpr uint32_t kTop = 1u << 24;     // renormalise when the range drops below 2^24
constexpr int kDensityClasses = 5;
constexpr int kFlagContexts = 8 * kDensityClasses * kDensityClasses;

struct BitModel {
  uint32_t p0 = 1u << 15;  // P(bit == 0) * 65536
  uint32_t seen = 0;

  void update(int bit) {
    const int32_t target = bit ? 0 : 65536;
    const int32_t divisor = static_cast<int32_t>(seen < kWindow ? seen + 2 : kWindow + 2);
    int32_t p = static_cast<int32_t>(p0) + (target - static_cast<int32_t>(p0)) / divisor;
    p = p < static_cast<int32_t>(kMinProb) ? kMinProb : p > 65536 - static_cast<int32_t>(kMinProb) ? 65536 - kMinProb : p;
    p0 = static_cast<uint32_t>(p);
    if (seen < kWindow) ++seen;
  }
};

class RangeEncoder {
 public:
  explicit RangeEncoder(std::vector<uint8_t>& out) : out_(out) {}

  void encode(BitModel& m, int bit) {
    const uint32_t bound = (range_ >> 16) * m.p0;
    if (bit) {
      low_ += bound;
      range_ -= bound;
    } else {
      range_ = bound;
    }
    m.update(bit);
    while (range_ < kTop) {
      range_ <<= 8;
      shift_low();
    }
  }

  void finish() {
    for (int i = 0; i < 5; ++i) shift_low();
  }

 private:
  // Emits the top byte of `low` once it can no longer change: either it is below 0xFF (a later carry stops in
  // it) or a carry just happened. A run of 0xFF bytes waits in `pending_` until then.
  void shift_low() {
    if (static_cast<uint32_t>(low_) < 0xFF000000u || (low_ >> 32) != 0) {
      const uint8_t carry = static_cast<uint8_t>(low_ >> 32);
      uint8_t byte = cache_;
      do {
        out_.push_back(static_cast<uint8_t>(byte + carry));
        byte = 0xFF;
      } while (--pending_ != 0);
      cache_ = static_cast<uint8_t>(low_ >> 24);
    }
    ++pending_;
    low_ = (low_ & 0x00FFFFFFu) << 8;
  }

  std::vector<uint8_t>& out_;
  uint64_t low_ = 0;
  uint32_t range_ = 0xFFFFFFFFu;
  uint8_t cache_ = 0;
  uint64_t pending_ = 1;
};

class RangeDecoder {
 public:
  RangeDecoder(const uint8_t* data, int64_t size) : data_(data), size_(size) {
    WS_CHECK_VALUE(size_ >= 5 && data_[0] == 0,
                      "weightshare: context_decode: stream is not a context-coded index stream (bad coder start)");
    pos_ = 1;
    for (int i = 0; i < 4; ++i) code_ = (code_ << 8) | next();
  }

  int decode(BitModel& m) {
    const uint32_t bound = (range_ >> 16) * m.p0;
    int bit;
    if (code_ < bound) {
      range_ = bound;
      bit = 0;
    } else {
      code_ -= bound;
      range_ -= bound;
      bit = 1;
    }
    m.update(bit);
    while (range_ < kTop) {
      range_ <<= 8;
      code_ = (code_ << 8) | next();
    }
    return bit;
  }

  // The encoder's flush makes the stream exactly as long as the decoder reads: anything else is corruption.
  void check_consumed_all() const {
    WS_CHECK_VALUE(pos_ == size_, "weightshare: context_decode: stream is ", size_ > pos_ ? "longer" : "shorter",
                      " than its coded symbols (", size_, " bytes, ", pos_, " used): corrupt or truncated");
  }

 private:
  uint32_t next() { return pos_ < size_ ? data_[pos_++] : (++pos_, 0u); }  // past the end: counted, checked later

  const uint8_t* data_;
  int64_t size_;
  int64_t pos_ = 0;
  uint32_t range_ = 0xFFFFFFFFu;
  uint32_t code_ = 0;
};

// Density class of `count` hits in `total` positions against the running density nnz / seen of all coded
// positions (compared in double: exact below 2^53 and correctly rounded above, identical in both directions).
inline int density_class(int64_t count, int64_t total, int64_t nnz, int64_t seen) {
  if (total == 0) return 0;
  if (count == 0) return 1;
  const double here = static_cast<double>(count) * static_cast<double>(seen);
  const double overall = static_cast<double>(nnz) * static_cast<double>(total);
  if (2.0 * here < overall) return 2;
  if (here <= 2.0 * overall) return 3;
  return 4;
}

// What the current row has shown so far.
struct RowState {
  int left1 = 0, left2 = 0;
  int64_t count = 0;
};

// The state both directions walk through, position by position: models, counts, the flags of the previous row.
struct ContextModel {
  ContextModel(int64_t cols, int k) : col_count(cols, 0), above(cols, 0) {
    depth = 0;
    while ((int64_t(1) << depth) < k - 1) ++depth;
    tree.resize(size_t(1) << depth);
  }

  // rows_before: the rows coded (not skipped) above this one
  BitModel& flag_model(int64_t rows_before, int64_t c, const RowState& row) {
    const int neighbours = row.left1 | (row.left2 << 1) | (above[c] << 2);
    const int column = density_class(col_count[c], rows_before, nnz, seen);
    const int in_row = density_class(row.count, c, nnz, seen);
    return flags[(neighbours * kDensityClasses + column) * kDensityClasses + in_row];
  }

  void record(int64_t c, int flag, RowState& row) {
    row.left2 = row.left1;
    row.left1 = flag;
    row.count += flag;
    col_count[c] += flag;
    above[c] = static_cast<uint8_t>(flag);
    nnz += flag;
    ++seen;
  }

  std::array<BitModel, kFlagContexts> flags{};
  std::array<BitModel, 2> row_occupied{}, column_occupied{};  // by the previous row's / column's flag
  std::vector<BitModel> tree;  // node i (1-based heap order) codes the next bit of a rank
  std::vector<int64_t> col_count;
  std::vector<uint8_t> above;
  int64_t nnz = 0, seen = 0;  // flags set / positions coded so far, over the whole matrix
  int depth;
};

// The most frequent symbol (lowest on ties), after checking in the same pass that every index is below k.
int most_frequent_below_k(const uint8_t* idx, int64_t rows, int64_t cols, int64_t k) {
  std::array<int64_t, 256> hist{};
  const int64_t n = rows * cols;
  for (int64_t i = 0; i < n; ++i) ++hist[idx[i]];
  for (int s = static_cast<int>(k); s < 256; ++s) {
    if (hist[s] == 0) continue;
    int64_t i = 0;  // an error path: find the first offender to name it
    while (idx[i] != s) ++i;
    WS_CHECK_VALUE(false, "weightshare: context_encode: indices[", i / cols, ", ", i % cols, "] = ", s,
                      " is not below k = ", k);
  }
  int best = 0;
  for (int s = 1; s < 256; ++s)
    if (hist[s] > hist[best]) best = s;
  return best;
}

// Which rows and columns hold a symbol other than the background, and the last occupied column.
struct Occupancy {
  std::vector<uint8_t> rows, cols;
  int64_t last_col = -1;
};

Occupancy occupancy(const uint8_t* idx, int64_t rows, int64_t cols, int background) {
  Occupancy o{std::vector<uint8_t>(rows, 0), std::vector<uint8_t>(cols, 0)};
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c)
      if (idx[r * cols + c] != background) o.rows[r] = o.cols[c] = 1;
  for (int64_t c = 0; c < cols; ++c)
    if (o.cols[c]) o.last_col = c;
  return o;
}

// One pass of the model over the matrix in `mode`, shared by the encoder and the decoder: `bit(model, value)`
// codes (encoder: value is the bit, returned) or decodes (decoder: value ignored) one binary decision, and
// `symbol(r, c, flag)` handles a position's symbol after its flag (encoder: codes the rank; decoder: decodes and
// stores it). The occupancy vectors are the encoder's truth, or filled in by the decoder as it goes.
template <typename Bit, typename Symbol>
void walk(int64_t rows, int64_t cols, int k, int mode, const uint8_t* truth, int background, Occupancy& occ,
          Bit&& bit, Symbol&& symbol) {
  ContextModel model(cols, k);
  if (mode & kColumnFlags) {
    int previous = 0;
    for (int64_t c = 0; c < cols; ++c) {
      previous = occ.cols[c] = static_cast<uint8_t>(bit(model.column_occupied[previous], occ.cols[c]));
      if (previous) occ.last_col = c;
    }
  } else {
    std::fill(occ.cols.begin(), occ.cols.end(), 1);
    occ.last_col = cols - 1;
  }
  int previous_row = 0;
  int64_t rows_before = 0;
  for (int64_t r = 0; r < rows; ++r) {
    if (mode & kRowFlags) {
      previous_row = occ.rows[r] = static_cast<uint8_t>(bit(model.row_occupied[previous_row], occ.rows[r]));
      if (!previous_row) continue;
      WS_CHECK_VALUE(occ.last_col >= 0, "weightshare: context_decode: an occupied row but no occupied column "
                        "(corrupt stream)");
    }
    RowState state;
    for (int64_t c = 0; c < cols; ++c) {
      int flag = 0;
      if (occ.cols[c]) {
        const bool implied = (mode & kRowFlags) && state.count == 0 && c == occ.last_col;
        const int truth_flag = truth ? truth[r * cols + c] != background : 0;
        flag = implied ? 1 : bit(model.flag_model(rows_before, c, state), truth_flag);
        if (flag) symbol(model, r, c);
      }
      model.record(c, flag, state);
    }
    ++rows_before;
  }
}

// Codes the rank of a non-background symbol down the tree.
template <typename Bit>
void code_rank(ContextModel& model, int rank, Bit&& bit) {
  for (int level = model.depth - 1, node = 1; level >= 0; --level) {
    const int b = (rank >> level) & 1;
    bit(model.tree[node], b);
    node = 2 * node + b;
  }
}

std::vector<uint8_t> encode_mode(const uint8_t* idx, int64_t rows, int64_t cols, int k, int background, int mode,
                                 const Occupancy& truth_occ) {
  std::vector<uint8_t> out = {kStreamVersion, static_cast<uint8_t>(background), static_cast<uint8_t>(mode)};
  out.reserve(3 + rows * cols / 8);
  RangeEncoder enc(out);
  Occupancy occ = truth_occ;
  auto bit = [&](BitModel& m, int b) {
    enc.encode(m, b);
    return b;
  };
  walk(rows, cols, k, mode, idx, background, occ, bit, [&](ContextModel& model, int64_t r, int64_t c) {
    const int s = idx[r * cols + c];
    code_rank(model, s < background ? s : s - 1, bit);
  });
  enc.finish();
  return out;
}

at::Tensor context_encode_cpu(const at::Tensor& indices, int64_t k) {
  check_context_encode(indices, k);
  const int64_t rows = indices.size(0), cols = indices.size(1);
  const uint8_t* idx = indices.data_ptr<uint8_t>();
  const int background = most_frequent_below_k(idx, rows, cols, k);
  const Occupancy occ = occupancy(idx, rows, cols, background);
  std::vector<uint8_t> best;
  for (int mode = 0; mode < kModes; ++mode) {  // every mode, the shortest kept (ties: the lowest mode)
    std::vector<uint8_t> out = encode_mode(idx, rows, cols, static_cast<int>(k), background, mode, occ);
    if (best.empty() || out.size() < best.size()) best = std::move(out);
  }
  at::Tensor stream = at::empty({static_cast<int64_t>(best.size())}, indices.options());
  std::copy(best.begin(), best.end(), stream.data_ptr<uint8_t>());
  return stream;
}

at::Tensor context_decode_cpu(const at::Tensor& stream, int64_t rows, int64_t cols, int64_t k) {
  check_context_decode(stream, rows, cols, k);
  const uint8_t* data = stream.data_ptr<uint8_t>();
  const int64_t size = stream.numel();
  WS_CHECK_VALUE(size >= 2 && (data[0] == 1 || data[0] == kStreamVersion),
                    "weightshare: context_decode: stream version ", size ? int(data[0]) : -1, " is not 1 or ",
                    int(kStreamVersion));
  const int background = data[1];
  WS_CHECK_VALUE(background < k, "weightshare: context_decode: background symbol ", background,
                    " is not below k = ", k);
  const int64_t head = data[0] == 1 ? 2 : 3;  // version 1 has no mode byte (mode 0)
  WS_CHECK_VALUE(size >= head, "weightshare: context_decode: stream is shorter than its header");
  const int mode = head == 3 ? data[2] : 0;
  WS_CHECK_VALUE(mode < kModes, "weightshare: context_decode: mode ", mode, " is not below ", kModes);
  at::Tensor indices = at::empty({rows, cols}, stream.options());
  uint8_t* idx = indices.data_ptr<uint8_t>();
  std::fill(idx, idx + rows * cols, static_cast<uint8_t>(background));
  RangeDecoder dec(data + head, size - head);
  Occupancy occ{std::vector<uint8_t>(rows, 0), std::vector<uint8_t>(cols, 0)};
  auto bit = [&](BitModel& m, int) { return dec.decode(m); };
  walk(rows, cols, static_cast<int>(k), mode, nullptr, background, occ, bit,
       [&](ContextModel& model, int64_t r, int64_t c) {
         int node = 1;
         for (int level = model.depth - 1; level >= 0; --level) node = 2 * node + dec.decode(model.tree[node]);
         const int rank = node - (1 << model.depth);
         WS_CHECK_VALUE(rank < k - 1, "weightshare: context_decode: decoded symbol rank ", rank,
                           " is not below k - 1 = ", k - 1, " (corrupt stream)");
         idx[r * cols + c] = static_cast<uint8_t>(rank < background ? rank : rank + 1);
       });
  dec.check_consumed_all();
  return indices;
}

}  // namespace

TORCH_LIBRARY_IMPL(weightshare, CPU, m) {
  m.impl("context_encode", &context_encode_cpu);
  m.impl("context_decode", &context_decode_cpu);
}

}  // namespace weightshare
