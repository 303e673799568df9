// shared_conv2d on tensor cores as an implicit GEMM: the fused mma.sync GEMM of shared_linear
// (fused_gemm_mma_body.h) with the output pixels as its rows of x, each 16-byte chunk of x copied by cp.async from
// the input pixel and channels its tap reads (implicit_conv.h). Neither the dense weight nor an im2col matrix is
// ever written: the weight stays packed indices decoded into A fragments in registers, as in the linear layers.
//
// Why: decode + cuDNN (csrc/common/shared_conv.cpp) ran 0.49-0.90x cuDNN fp16 on the H200 (2026-11-30); it can
// never reach parity, as it runs cuDNN's whole convolution after writing the fp16 weight. Here the weight traffic
// is the packed indices (a quarter of the fp16 bytes at 4 bits), read once per block of pixels.
//
// The one extra pass: the packed rows hold the indices in the weight's (c, r, s) order, and the GEMM needs them in
// its reduction order (r, s, c), where 8 consecutive positions are 8 channels of one pixel. repack_kernel writes
// that order (padded with index 0 to whole 128-index units, where x reads zeros), a read and a write of the packed
// bytes; 1x1 convs whose channels fill whole units use the packed rows as they are.
//
// Status: written and compiled for sm_90a (2026-12-01); the index arithmetic checked on the host
// (tests/native/implicit_conv_check.cpp), the GEMM's layout as shared_linear's (fused_gemm_layout_check.cpp, the
// TM layouts included). Not yet run on a GPU, so no call takes it unless asked (shared_conv_cuda.h).
#include "shared_conv_cuda.h"

#include <ATen/ops/empty.h>

#include "weightshare/cuda_linear.h"
#include "weightshare/dispatch.h"
#include "weightshare/implicit_conv.h"
#include "weightshare/packing.h"
#include "fused_gemm_mma_body.h"
#include "fused_gemm_staging.h"

namespace weightshare::cuda {
namespace {

// grid: as gemm_mma_kernel's (launch_fused), rows of x = output pixels; TM: blocks of 64 TM output channels, or
// 0 for the default 256 (<= 4 bits) / 128 (FusedGemmLayout).
template <typename T, int BITS, int NT, int TM>
__global__ void __launch_bounds__(FusedGemmLayout<BITS, NT, false, TM>::kThreads, 1) conv_mma_kernel(
    const FusedArgs a) {
  // kStages was chosen without the pixel origins: they must still fit an H100/H200 block with the static table
  static_assert(fused_mma_smem_bytes<BITS, NT, false, true, TM>() + 2 * (1 << BITS) <= 227 * 1024, "shared memory");
  fused_gemm_mma<T, BITS, NT, false, true, TM>(a);
}

// The packed rows (src: `rows` rows of src_row_bytes, (c, r, s) order) in the GEMM's order (repacked_word): dst rows
// of dst_row_words words = units * 128 indices.
template <int BITS>
__global__ void repack_kernel(const uint8_t* src, int64_t src_row_bytes, uint32_t* dst, int64_t dst_row_words,
                              int64_t rows, const ConvGeometry g) {
  const int64_t total = rows * dst_row_words, n = dst_row_words * 32 / BITS;
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < total; t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t o = t / dst_row_words;
    dst[t] = repacked_word(g, src + o * src_row_bytes, BITS, n, t - o * dst_row_words);
  }
}

// The widths the op promises fast; the others keep decode + cuDNN (66 kernels instead of 120).
constexpr bool conv_bits_instantiated(int64_t bits) { return bits == 2 || bits == 3 || bits == 4 || bits == 8; }

// Blocks of output channels: the default (256 at <= 4 bits, 128 above) where a layer fills them, else 64 or 128
// (TM 1 or 2), so that a 64-channel layer does not compute 192 rows for nothing.
int conv_tiles_m(int64_t bits, int64_t out_channels) {
  if (out_channels <= 64) return 1;
  return bits <= 4 && out_channels <= 128 ? 2 : 0;
}
constexpr int64_t conv_block_out(int64_t bits, int tm) { return tm != 0 ? 64 * tm : (bits <= 4 ? 256 : 128); }

// Calls f.template operator()<BITS, NT, TM>() for run-time bits (conv_bits_instantiated), 8-row tile count and
// tiles of W per warp (conv_tiles_m).
template <typename F>
void dispatch_conv(int64_t bits, int nt, int tm, F&& f) {
  auto tiles = [&]<int BITS, int TM>() {
    if (nt == 2) {
      f.template operator()<BITS, 2, TM>();
    } else if (nt == 4) {
      f.template operator()<BITS, 4, TM>();
    } else {
      f.template operator()<BITS, 8, TM>();
    }
  };
  auto blocks = [&]<int BITS>() {
    if (tm == 1) {
      tiles.template operator()<BITS, 1>();
      return;
    }
    if constexpr (BITS <= 4) {  // 128-row blocks are the default above 4 bits
      if (tm == 2) {
        tiles.template operator()<BITS, 2>();
        return;
      }
    }
    tiles.template operator()<BITS, 0>();
  };
  switch (bits) {
    case 2: blocks.template operator()<2>(); break;
    case 3: blocks.template operator()<3>(); break;
    case 4: blocks.template operator()<4>(); break;
    default: blocks.template operator()<8>(); break;
  }
}

bool conv_compiled() {
  static const bool ok = has_sm80_code(reinterpret_cast<const void*>(conv_mma_kernel<__half, 4, 8, 0>));
  return ok;
}

}  // namespace

at::Tensor implicit_conv2d(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& codebook, int64_t bits,
                           at::IntArrayRef weight_shape, const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  if (!conv_kernel_asked("implicit") || groups != 1 || x.dim() != 4 || x.numel() == 0 ||
      !conv_bits_instantiated(bits)) {
    return {};
  }
  if (x.scalar_type() != at::kHalf && x.scalar_type() != at::kBFloat16) return {};
  // channels-last as at::conv2d sees it (so y's layout is the one it, and the fake kernel, give)
  const at::MemoryFormat last = at::MemoryFormat::ChannelsLast;
  if (x.suggest_memory_format() != last || !x.is_contiguous(last) || reinterpret_cast<uintptr_t>(x.data_ptr()) % 16) {
    return {};
  }
  ConvShape cs{};
  if (!conv_shape(x, weight_shape, bias, stride, padding, dilation, cs)) return {};
  const int64_t batch = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t O = weight_shape[0], R = weight_shape[2], S = weight_shape[3];
  const int64_t K = R * S * C, Ho = cs.Ho, Wo = cs.Wo, P = batch * Ho * Wo;
  if (C % 8 != 0 || x.numel() > INT32_MAX || K > INT32_MAX - 128) return {};
  const ConvGeometry g{static_cast<int32_t>(H), static_cast<int32_t>(W), static_cast<int32_t>(C),
                       static_cast<int32_t>(R), static_cast<int32_t>(S), cs.stride_h, cs.stride_w, cs.pad_h,
                       cs.pad_w, cs.dil_h, cs.dil_w, static_cast<int32_t>(Ho), static_cast<int32_t>(Wo),
                       static_cast<int32_t>(K)};
  const int64_t rows_per_group = O / codebook.size(0);
  const int tm = conv_tiles_m(bits, O);
  const int64_t block_out = conv_block_out(bits, tm);
  if (!one_codebook_per_block(O, rows_per_group, block_out)) return {};
  const c10::cuda::CUDAGuard guard(x.device());  // before conv_compiled, which asks the current device
  const int device = x.get_device();
  if (device_attribute<cudaDevAttrComputeCapabilityMajor>(device) < 8 || !conv_compiled()) return {};
  const int nt = tiles_n_for(P);
  int smem = 0;
  dispatch_conv(bits, nt, tm, [&]<int BITS, int NT, int TM>() {  // dynamic + the body's static `values`
    smem = fused_mma_smem_bytes<BITS, NT, false, true, TM>() + int(sizeof(uint16_t)) * (1 << BITS);
  });
  if (smem > device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>(device)) return {};
  if (ceil_div(O, block_out) * ceil_div(P, 16 * nt) > INT32_MAX) return {};

  const int b = static_cast<int>(bits);
  const int64_t units = ceil_div(K, 128), row_words = units * 4 * b;  // 128 indices of b bits = 4 b words
  const int64_t src_row_bytes = packed_row_bytes(K, b);
  at::Tensor rows = packed.contiguous();
  if (R != 1 || S != 1 || C % 128 != 0 || reinterpret_cast<uintptr_t>(rows.data_ptr()) % 16 != 0) {
    at::Tensor repacked = at::empty({O, row_words * 4}, packed.options());
    WS_DISPATCH_BITS(b, BITS, [&] {
      repack_kernel<BITS><<<blocks_for(O * row_words), kThreads, 0, stream()>>>(
          rows.data_ptr<uint8_t>(), src_row_bytes, reinterpret_cast<uint32_t*>(repacked.data_ptr<uint8_t>()),
          row_words, O, g);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    rows = repacked;
  }
  const at::Tensor cb = codebook.contiguous();
  PackedRows w{reinterpret_cast<const uint32_t*>(rows.data_ptr<uint8_t>()), row_words, 16, O, units * 128,
               rows_per_group, nullptr, static_cast<int>(cb.size(1)), cb.data_ptr(), out_kind(cb.scalar_type())};

  // [P, O] in memory: the output's channels-last layout. Allocated as such, not as a permuted view of an NHWC
  // tensor: a view output makes autograd forbid an in-place op on it (conv + ReLU(inplace=True) in training).
  at::Tensor y = at::empty({batch, O, Ho, Wo}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  Epilogue e = make_epilogue(y, P, O);
  const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  e.bias = bc.defined() ? bc.data_ptr() : nullptr;
  e.bias_kind = bc.defined() ? out_kind(bc.scalar_type()) : OutKind::Float;
  e.rows_per_group = rows_per_group;
  const int sms = sm_count(device);
  dispatch_conv(bits, nt, tm, [&]<int BITS, int NT, int TM>() {
    using L = FusedGemmLayout<BITS, NT, false, TM>;
    static_assert(L::kBlockOut == conv_block_out(BITS, TM), "the host's codebook check sees the kernel's blocks");
    constexpr int kSmem = fused_mma_smem_bytes<BITS, NT, false, true, TM>();
    if (x.scalar_type() == at::kHalf) {
      launch_fused<conv_mma_kernel<__half, BITS, NT, TM>>(w, x, e, L::kThreads, kSmem, L::kBlockOut, L::kBlockBatch,
                                                          sms, g);
    } else {
      launch_fused<conv_mma_kernel<__nv_bfloat16, BITS, NT, TM>>(w, x, e, L::kThreads, kSmem, L::kBlockOut,
                                                                 L::kBlockBatch, sms, g);
    }
  });
  return y;
}

}  // namespace weightshare::cuda
