// Host run of one block of the fused tensor-core GEMMs (csrc/cuda/shared_linear_gemm_mma.cu and its wgmma form,
// shared_linear_gemm_wgmma.cu) through their layout
// (fused_gemm_layout.h): the staging of packed indices into codes, the replicated tables, the swizzled x tile, each
// lane's ldmatrix addresses and A-fragment decode, with ldmatrix and mma.m16n8k16 emulated as the PTX ISA defines
// them, and the epilogue's (row, column) of every accumulator. Values are small integers, so the block's result
// must equal x W^T exactly. Also checks the bank-conflict claims: every lane's table loads in its own bank, a warp's
// code loads in distinct banks, each ldmatrix matrix's 8 rows in distinct 16-byte bank groups. Built and run by
// tests/test_lane_layout.py; prints "ok" or the first failures.
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "weightshare/fused_gemm_layout.h"

using namespace weightshare;

static int failures = 0;

static int current_tm = 0;  // the layout's TM under check, for the messages

static void fail(const char* what, int bits, int nt, long a, long b) {
  if (failures++ < 10) std::printf("FAIL %s bits=%d nt=%d tm=%d (%ld, %ld)\n", what, bits, nt, current_tm, a, b);
}

// The 16-bit halves of a register as the (small, non-negative) integers the test gives its values.
static int64_t lo(uint32_t r) { return r & 0xffffu; }
static int64_t hi(uint32_t r) { return r >> 16; }

// N rows of kin random indices (idx, row-major) and their packing (packing.h: a little-endian bit stream per row).
static void random_weight(int N, int kin, int bits, std::mt19937& gen, std::vector<uint32_t>& idx,
                          std::vector<uint32_t>& packed) {
  const int row_words = kin * bits / 32;
  idx.assign(size_t(N) * kin, 0u);
  packed.assign(size_t(N) * row_words, 0u);
  for (int n = 0; n < N; ++n) {
    for (int k = 0; k < kin; ++k) {
      const uint32_t v = gen() & ((1u << bits) - 1u);
      idx[size_t(n) * kin + k] = v;
      for (int b = 0; b < bits; ++b) {
        const int64_t bit = int64_t(k) * bits + b;
        if ((v >> b) & 1u) packed[size_t(n) * row_words + bit / 32] |= 1u << (bit % 32);
      }
    }
  }
}

// Unit u's code buffer as the block's threads stage it (every (row, quarter) item of layout L, its code words
// stored where the warps read them), packed holding N rows of row_words words; `written` counts the stores per word.
template <typename L, int BITS>
static std::vector<uint32_t> staged_codes(const std::vector<uint32_t>& packed, int row_words, int u, int N, int nt,
                                          std::vector<int>& written) {
  std::vector<uint32_t> codes(L::kCodeBufferWords, 0xdeadbeefu);
  written.assign(L::kCodeBufferWords, 0);
  for (int tid = 0; tid < L::kThreads; ++tid) {
    for (int v = 0; v < L::kItems; ++v) {
      const int row = L::item_row(tid, v), q = L::item_quarter(tid, v);
      if (row < 0 || row >= N || q < 0 || q > 3) {
        fail("staging item outside the block", BITS, nt, row, q);
        continue;
      }
      uint32_t out[8 * L::kCodeWords];
      L::quarter_codes(&packed[size_t(row) * row_words + u * 4 * BITS + q * BITS], row, out);
      const int at = L::code_word(row, 2 * q, 0);
      if (at % 4 != 0) fail("16-byte code stores", BITS, nt, row, q);
      for (int e = 0; e < 8 * L::kCodeWords; ++e) {
        codes[at + e] = out[e];
        written[at + e]++;
      }
    }
  }
  return codes;
}

template <int BITS, int NT, bool ROWS = false, int TM = 0>
static void check(std::mt19937& gen) {
  using L = FusedGemmLayout<BITS, NT, ROWS, TM>;
  current_tm = TM;
  constexpr int kUnits = 2, kin = kUnits * L::kUnitK, N = L::kBlockOut, M = L::kBlockBatch;
  constexpr int row_words = kin * BITS / 32;
  std::vector<uint32_t> idx, packed;
  random_weight(N, kin, BITS, gen, idx, packed);
  // codebook values: one table (ROWS: one per row, as the kernel stages them, row r's entry e at halfword
  // r 2**BITS + e)
  std::vector<uint16_t> values(size_t(ROWS ? N : 1) << BITS);
  for (auto& v : values) v = static_cast<uint16_t>(1 + gen() % 1000);
  auto value = [&](int n, uint32_t e) { return values[(size_t(ROWS ? n : 0) << BITS) + e]; };
  std::vector<uint16_t> x(size_t(M) * kin);
  for (auto& v : x) v = static_cast<uint16_t>(gen() % 1000);

  std::vector<uint32_t> tab(L::kTableWords);
  if constexpr (ROWS) {
    std::memcpy(tab.data(), values.data(), values.size() * 2);  // little-endian halfwords, as shared memory
  } else {
    for (int i = 0; i < L::kTableWords; ++i) tab[i] = L::table_word(values.data(), i >> 5);
  }

  std::vector<int64_t> acc(size_t(L::kWarps) * 32 * L::kTilesM * NT * 4, 0);
  auto acc_at = [&](int warp, int lane, int i, int j, int r) -> int64_t& {
    return acc[(((size_t(warp) * 32 + lane) * L::kTilesM + i) * NT + j) * 4 + r];
  };
  for (int u = 0; u < kUnits; ++u) {
    // staging: every (row, quarter) item once, its code words where the warps read them
    std::vector<int> written;
    const std::vector<uint32_t> codes = staged_codes<L, BITS>(packed, row_words, u, N, NT, written);
    for (int row = 0; row < N; ++row) {
      for (int s = 0; s < L::kSteps; ++s) {
        for (int t = 0; t < 4; ++t) {
          for (int e = 0; e < L::kCodeWords; ++e) {
            if (written[L::code_word(row, s, t) + e] != 1) fail("code staged once", BITS, NT, row, s);
          }
        }
      }
    }
    // the x tile: every chunk of the unit in its swizzled slot, slots a permutation
    std::vector<uint16_t> xs(size_t(M) * 128, 0);
    std::vector<int> slot_used(size_t(M) * 16, 0);
    for (int c = 0; c < L::kXChunks; ++c) {
      const int row = c >> 4, chunk = c & 15, slot = L::x_chunk_slot(row, chunk);
      slot_used[slot]++;
      for (int e = 0; e < 8; ++e) xs[size_t(slot) * 8 + e] = x[size_t(row) * kin + u * 128 + 8 * chunk + e];
    }
    for (int sl = 0; sl < M * 16; ++sl) {
      if (slot_used[sl] != 1) fail("x slots a permutation", BITS, NT, sl, slot_used[sl]);
    }

    for (int warp = 0; warp < L::kWarps; ++warp) {
      const int wo = warp % L::kWarpsOut, wb = warp / L::kWarpsOut;
      for (int s = 0; s < L::kSteps; ++s) {
        // B: ldmatrix.x4 per pair of 8-row tiles. Lane 8 mi + r hands row r of matrix mi; lane l receives word l % 4
        // of row l / 4 of matrix mi in register mi.
        std::vector<uint32_t> b(size_t(32) * NT * 2);
        for (int jj = 0; jj < NT / 2; ++jj) {
          int slot_of[32];
          for (int l = 0; l < 32; ++l) slot_of[l] = L::ldmatrix_slot(l, wb, jj, s);
          for (int mi = 0; mi < 4; ++mi) {
            int groups = 0;
            for (int r = 0; r < 8; ++r) groups |= 1 << (slot_of[8 * mi + r] & 7);
            if (groups != 0xff) fail("ldmatrix rows in 8 bank groups", BITS, NT, jj, mi);
            for (int l = 0; l < 32; ++l) {
              const uint16_t* rowdata = &xs[size_t(slot_of[8 * mi + l / 4]) * 8];
              const uint32_t reg = rowdata[2 * (l % 4)] | (uint32_t(rowdata[2 * (l % 4) + 1]) << 16);
              const int tile = 2 * jj + (mi >> 1), half = mi & 1;
              b[(size_t(l) * NT + tile) * 2 + half] = reg;
            }
          }
        }
        for (int i = 0; i < L::kTilesM; ++i) {
          // A: each lane's code loads and table lookups
          uint32_t a[32][4];
          uint32_t code_banks = 0;  // bit per bank (4-byte loads) or per half warp's bank pair (8-byte loads)
          for (int l = 0; l < 32; ++l) {
            const int g = l >> 2, t = l & 3, row = wo * L::kWarpOut + 16 * i + g;
            uint32_t c0[L::kCodeWords], c1[L::kCodeWords];
            for (int e = 0; e < L::kCodeWords; ++e) {
              c0[e] = codes[L::code_word(row, s, t) + e];
              c1[e] = codes[L::code_word(row + 8, s, t) + e];
            }
            if (L::kCodeWords == 1) {
              code_banks |= 1u << (L::code_word(row, s, t) % 32);
            } else {  // a half warp's 16 loads of 8 bytes go together: lanes 0-15 bits 0-15, lanes 16-31 bits 16-31
              code_banks |= 1u << ((l >> 4) * 16 + (L::code_word(row, s, t) / 2) % 16);
            }
            auto lds = [&](uint32_t offset) -> uint32_t {
              if constexpr (ROWS) {  // a 2-byte load of the row's table (which row: the code's, checked by y below)
                if (offset % 2 != 0 || offset / 4 >= uint32_t(L::kTableWords)) fail("16-bit table load", BITS, NT, l,
                                                                                      offset);
                return (tab[(offset / 4) % L::kTableWords] >> (8 * (offset % 4))) & 0xffffu;
              }
              if (offset % 4 != 0 || (offset >> 2) % 32 != uint32_t(l)) fail("table load in the lane's bank", BITS,
                                                                                NT, l, offset);
              return tab[(offset >> 2) % L::kTableWords];
            };
            L::decode_a(c0, c1, lds, a[l]);
          }
          if (code_banks != 0xffffffffu) fail("code loads without bank conflicts", BITS, NT, i, s);
          // mma.m16n8k16 per x tile, fragments as the PTX ISA lays them out
          int64_t A[16][16];
          for (int l = 0; l < 32; ++l) {
            const int g = l >> 2, t = l & 3;
            A[g][2 * t] = lo(a[l][0]);
            A[g][2 * t + 1] = hi(a[l][0]);
            A[g + 8][2 * t] = lo(a[l][1]);
            A[g + 8][2 * t + 1] = hi(a[l][1]);
            A[g][2 * t + 8] = lo(a[l][2]);
            A[g][2 * t + 9] = hi(a[l][2]);
            A[g + 8][2 * t + 8] = lo(a[l][3]);
            A[g + 8][2 * t + 9] = hi(a[l][3]);
          }
          for (int j = 0; j < NT; ++j) {
            int64_t B[16][8];
            for (int l = 0; l < 32; ++l) {
              const int g = l >> 2, t = l & 3;
              const uint32_t b0 = b[(size_t(l) * NT + j) * 2], b1 = b[(size_t(l) * NT + j) * 2 + 1];
              B[2 * t][g] = lo(b0);
              B[2 * t + 1][g] = hi(b0);
              B[2 * t + 8][g] = lo(b1);
              B[2 * t + 9][g] = hi(b1);
            }
            for (int l = 0; l < 32; ++l) {
              const int g = l >> 2, t = l & 3;
              for (int r = 0; r < 4; ++r) {
                const int row = g + (r >= 2 ? 8 : 0), col = 2 * t + (r & 1);
                int64_t sum = 0;
                for (int k = 0; k < 16; ++k) sum += A[row][k] * B[k][col];
                acc_at(warp, l, i, j, r) += sum;
              }
            }
          }
        }
      }
    }
  }
  // the epilogue's element of every accumulator, against x W^T
  std::vector<int> seen(size_t(M) * N, 0);
  for (int warp = 0; warp < L::kWarps; ++warp) {
    const int wo = warp % L::kWarpsOut, wb = warp / L::kWarpsOut;
    for (int l = 0; l < 32; ++l) {
      const int g = l >> 2, t = l & 3;
      for (int i = 0; i < L::kTilesM; ++i) {
        for (int j = 0; j < NT; ++j) {
          for (int r = 0; r < 4; ++r) {
            const int n = wo * L::kWarpOut + 16 * i + g + (r >= 2 ? 8 : 0);
            const int m = wb * L::kWarpBatch + 8 * j + 2 * t + (r & 1);
            seen[size_t(m) * N + n]++;
            int64_t want = 0;
            for (int k = 0; k < kin; ++k) want += int64_t(x[size_t(m) * kin + k]) * value(n, idx[size_t(n) * kin + k]);
            if (acc_at(warp, l, i, j, r) != want) fail(ROWS ? "y = x W^T (ROWS)" : "y = x W^T", BITS, NT, m, n);
          }
        }
      }
    }
  }
  for (size_t e = 0; e < seen.size(); ++e) {
    if (seen[e] != 1) fail("every output once", BITS, NT, long(e), seen[e]);
  }
  if (L::kSmemBytes + 2 * (1 << BITS) > 227 * 1024) fail("shared memory within an H100/H200 block", BITS, NT, 0, 0);
}

// The wgmma form (shared_linear_gemm_wgmma.cu): the same codes and A fragments (FusedGemmLayout<BITS, 8>), x placed
// by WgmmaTileLayout<NB> and read back as wgmma does through its descriptor (K-major, 128-byte swizzle: rows of 128
// bytes, 8-row atoms `kAtomStride` apart, and the 16-byte chunk bits [4, 7) of an address XORed with its row bits
// [7, 10) inside an atom that starts 1024-byte aligned), D of m64nNk16 distributed as the PTX ISA lays it out
// (warp w of the warpgroup rows 16 w + g / +8, d[4 j + 2 h + e] at column 8 j + 2t + e), and the kernel's epilogue.
template <int BITS, int NB>
static void check_wgmma(std::mt19937& gen) {
  current_tm = 0;
  using L = FusedGemmLayout<BITS, 8>;
  using X = WgmmaLayoutFor<BITS, NB>;
  if (L::kBlockOut != X::kBlockOut) fail("wgmma block rows = the code layout's", BITS, NB, X::kBlockOut, L::kBlockOut);
  constexpr int kUnits = 2, kin = kUnits * L::kUnitK, N = L::kBlockOut, M = NB;
  constexpr int row_words = kin * BITS / 32;
  std::vector<uint32_t> idx, packed;
  random_weight(N, kin, BITS, gen, idx, packed);
  std::vector<uint16_t> values(1 << BITS);
  for (auto& v : values) v = static_cast<uint16_t>(1 + gen() % 1000);
  std::vector<uint16_t> x(size_t(M) * kin);
  for (auto& v : x) v = static_cast<uint16_t>(gen() % 1000);
  std::vector<uint32_t> tab(L::kTableWords);
  for (int i = 0; i < L::kTableWords; ++i) tab[i] = L::table_word(values.data(), i >> 5);

  std::vector<int64_t> D(size_t(N) * M, 0);  // D[block row][row of x], as the tensor cores accumulate it
  for (int u = 0; u < kUnits; ++u) {
    std::vector<int> written;
    const std::vector<uint32_t> codes = staged_codes<L, BITS>(packed, row_words, u, N, NB, written);
    std::vector<uint16_t> stage(X::kStageBytes / 2, 0);
    std::vector<int> covered(X::kStageBytes / 16, 0);
    for (int c = 0; c < X::kChunks; ++c) {
      const int row = c >> 4, chunk = c & 15, at = X::chunk_byte(row, chunk);
      if (at % 16 != 0) fail("wgmma x chunk 16-byte aligned", BITS, NB, row, chunk);
      covered[at / 16]++;
      for (int e = 0; e < 8; ++e) stage[at / 2 + e] = x[size_t(row) * kin + u * 128 + 8 * chunk + e];
    }
    for (size_t i = 0; i < covered.size(); ++i) {
      if (covered[i] != 1) fail("wgmma x stage covered once", BITS, NB, long(i), covered[i]);
    }
    for (int wg = 0; wg < 2; ++wg) {
      for (int i = 0; i < X::kTiles; ++i) {
        for (int s = 0; s < L::kSteps; ++s) {
          // B (16 x NB) through the descriptor
          std::vector<int64_t> B(size_t(16) * NB);
          for (int n = 0; n < NB; ++n) {
            for (int k = 0; k < 16; ++k) {
              const int logical = X::step_start(s) + (n >> 3) * X::kAtomStride + (n & 7) * 128 + 2 * k;
              const int physical = logical ^ (((logical >> 7) & 7) << 4);
              B[size_t(k) * NB + n] = stage[physical / 2];
            }
          }
          // A (64 x 16): warp j's 16 rows from its lanes' decoded registers
          int64_t A[64][16];
          for (int j = 0; j < 4; ++j) {
            for (int l = 0; l < 32; ++l) {
              const int g = l >> 2, t = l & 3, row = X::block_row(wg, i, j, g, 0);
              uint32_t c0[L::kCodeWords], c1[L::kCodeWords];
              for (int e = 0; e < L::kCodeWords; ++e) {
                c0[e] = codes[L::code_word(row, s, t) + e];
                c1[e] = codes[L::code_word(X::block_row(wg, i, j, g, 1), s, t) + e];
              }
              uint32_t a[4];
              L::decode_a(c0, c1, [&](uint32_t offset) -> uint32_t {
                if ((offset >> 2) % 32 != uint32_t(l)) fail("wgmma table load in the lane's bank", BITS, NB, l, offset);
                return tab[(offset >> 2) % L::kTableWords];
              }, a);
              A[16 * j + g][2 * t] = lo(a[0]);
              A[16 * j + g][2 * t + 1] = hi(a[0]);
              A[16 * j + g + 8][2 * t] = lo(a[1]);
              A[16 * j + g + 8][2 * t + 1] = hi(a[1]);
              A[16 * j + g][2 * t + 8] = lo(a[2]);
              A[16 * j + g][2 * t + 9] = hi(a[2]);
              A[16 * j + g + 8][2 * t + 8] = lo(a[3]);
              A[16 * j + g + 8][2 * t + 9] = hi(a[3]);
            }
          }
          for (int r = 0; r < 64; ++r) {
            for (int n = 0; n < NB; ++n) {
              int64_t sum = 0;
              for (int k = 0; k < 16; ++k) sum += A[r][k] * B[size_t(k) * NB + n];
              D[size_t(64 * X::kTiles * wg + 64 * i + r) * M + n] += sum;  // tile rows: block rows from 64 (T wg + i)
            }
          }
        }
      }
    }
  }
  // D's registers per thread (PTX), mapped back by the kernel's epilogue, against x W^T
  std::vector<int> seen(size_t(M) * N, 0);
  for (int wg = 0; wg < 2; ++wg) {
    for (int i = 0; i < X::kTiles; ++i) {
      for (int j = 0; j < 4; ++j) {
        for (int l = 0; l < 32; ++l) {
          const int g = l >> 2, t = l & 3;
          for (int reg = 0; reg < NB / 2; ++reg) {
            const int jj = reg / 4, h = (reg / 2) % 2, e = reg % 2;
            const int tile_row = 64 * X::kTiles * wg + 64 * i + 16 * j + g + 8 * h;                      // PTX
            const int64_t value = D[size_t(tile_row) * M + 8 * jj + 2 * t + e];
            const int n = X::block_row(wg, i, j, g, h), m = 8 * jj + 2 * t + e;                           // kernel
            seen[size_t(m) * N + n]++;
            int64_t want = 0;
            for (int k = 0; k < kin; ++k) want += int64_t(x[size_t(m) * kin + k]) * values[idx[size_t(n) * kin + k]];
            if (value != want) fail("wgmma y = x W^T", BITS, NB, m, n);
          }
        }
      }
    }
  }
  for (size_t e = 0; e < seen.size(); ++e) {
    if (seen[e] != 1) fail("wgmma every output once", BITS, NB, long(e), seen[e]);
  }
}

template <int BITS>
static void check_widths(std::mt19937& gen) {
  check<BITS, 2>(gen);
  check<BITS, 4>(gen);
  check<BITS, 8>(gen);
  check<BITS, 2, true>(gen);
  check<BITS, 8, true>(gen);
  check<BITS, 2, false, 1>(gen);  // the smaller blocks of the implicit-GEMM conv: 64 output rows
  check<BITS, 8, false, 1>(gen);
  if constexpr (BITS <= 4) check<BITS, 4, false, 2>(gen);  // 128 rows (pair codes' default is 256)
  check_wgmma<BITS, 64>(gen);
  check_wgmma<BITS, 128>(gen);
}

int main() {
  std::mt19937 gen(1234);
  check_widths<1>(gen);
  check_widths<2>(gen);
  check_widths<3>(gen);
  check_widths<4>(gen);
  check_widths<5>(gen);
  check_widths<6>(gen);
  check_widths<7>(gen);
  check_widths<8>(gen);
  std::printf(failures == 0 ? "ok\n" : "%d failures\n", failures);
  return failures == 0 ? 0 : 1;
}
