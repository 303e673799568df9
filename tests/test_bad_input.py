"""Table-driven bad input for every op, called through torch.ops.weightshare.* so the C++ checks are what is tested.

Each case: the op, a builder of its arguments on a device, the exception type and a fragment of the message
(which must name the offending argument)."""
import pytest
import torch

import weightshare  # noqa: F401  (registers the ops)

from conftest import DEVICES, requires_native

pytestmark = requires_native
W = torch.ops.weightshare


def f32(*s, d="cpu"):
    return torch.randn(*s, device=d)


def u8(*s, hi=4, d="cpu"):
    return torch.randint(0, hi, s, dtype=torch.uint8, device=d)


CASES = {
    # pack / unpack
    "pack_bits_0": (W.pack, lambda d: (u8(4, 8, d=d), 0), ValueError, "bits must be in 1..8"),
    "pack_bits_9": (W.pack, lambda d: (u8(4, 8, d=d), 9), ValueError, "bits must be in 1..8"),
    "pack_wrong_dtype": (W.pack, lambda d: (u8(4, 8, d=d).int(), 4), TypeError, "idx must be uint8"),
    "pack_empty": (W.pack, lambda d: (u8(0, 8, d=d), 4), ValueError, "idx is empty"),
    "pack_noncontiguous": (W.pack, lambda d: (u8(8, 4, d=d).t(), 4), ValueError, "idx must be contiguous"),
    "pack_index_too_big": (W.pack, lambda d: (u8(4, 8, hi=200, d=d), 2), ValueError, "idx holds a value >= 2\\*\\*bits"),
    "unpack_wrong_row_bytes": (W.unpack, lambda d: (u8(4, 5, d=d), 4, 8), ValueError, "must hold 4 bytes"),
    "unpack_n_zero": (W.unpack, lambda d: (u8(4, 4, d=d), 4, 0), ValueError, "n \\(indices per row\\) must be in 1..2"),
    "unpack_bits_9": (W.unpack, lambda d: (u8(4, 4, d=d), 9, 4), ValueError, "bits must be in 1..8"),
    "unpack_wrong_dtype": (W.unpack, lambda d: (f32(4, 4, d=d), 4, 8), TypeError, "packed must be uint8"),
    # assign
    "assign_int_weights": (W.assign, lambda d: (u8(4, 4, d=d), f32(1, 4, d=d)), TypeError, "w must be float32"),
    "assign_double_weights": (W.assign, lambda d: (f32(4, 4, d=d).double(), f32(1, 4, d=d)), TypeError, "w must be float32"),
    "assign_empty": (W.assign, lambda d: (f32(0, 4, d=d), f32(1, 4, d=d)), ValueError, "w is empty"),
    "assign_noncontiguous": (W.assign, lambda d: (f32(4, 6, d=d)[:, ::2], f32(1, 4, d=d)), ValueError, "w must be contiguous"),
    "assign_codebook_1d": (W.assign, lambda d: (f32(4, 4, d=d), f32(4, d=d)), ValueError, r"codebook must be 2-D \[G, K\], got shape \[4\]"),
    "assign_codebook_too_big": (W.assign, lambda d: (f32(4, 4, d=d), f32(1, 257, d=d)), ValueError, "K must be in 1..256"),
    "assign_groups_mismatch": (W.assign, lambda d: (f32(4, 4, d=d), f32(3, 4, d=d)), ValueError, "must divide the 4 rows"),
    "assign_codebook_dtype": (W.assign, lambda d: (f32(4, 4, d=d), u8(1, 4, d=d)), TypeError, "codebook must be float32"),
    "assign_nan": (W.assign, lambda d: (torch.full((4, 4), float("nan"), device=d), f32(1, 4, d=d)), ValueError, "w contains NaN"),
    # kmeans_step
    "kstep_shape": (W.kmeans_step, lambda d: (f32(4, 4, d=d), u8(4, 5, d=d), 4), ValueError, "idx must have the shape of w"),
    "kstep_idx_dtype": (W.kmeans_step, lambda d: (f32(4, 4, d=d), u8(4, 4, d=d).long(), 4), TypeError, "idx must be uint8"),
    "kstep_k_0": (W.kmeans_step, lambda d: (f32(4, 4, d=d), u8(4, 4, d=d), 0), ValueError, "k must be in 1..256"),
    "kstep_k_big": (W.kmeans_step, lambda d: (f32(4, 4, d=d), u8(4, 4, d=d), 300), ValueError, "k must be in 1..256"),
    "kstep_idx_range": (W.kmeans_step, lambda d: (f32(4, 4, d=d), u8(4, 4, hi=9, d=d) + 8, 8), ValueError, "idx holds a value >= k"),
    "kstep_importance_shape": (W.kmeans_step, lambda d: (f32(4, 4, d=d), u8(4, 4, d=d), 4, f32(4, d=d)), ValueError, "importance must have the shape of w"),
    "kstep_groups": (W.kmeans_step, lambda d: (f32(4, 4, d=d), u8(4, 4, d=d), 4, None, 3), ValueError, "groups"),
    # loss_aware_assign
    "la_hdiag_shape": (W.loss_aware_assign, lambda d: (f32(4, 4, d=d), None, f32(4, 3, d=d), f32(1, 4, d=d)), ValueError, "hdiag must have the shape of w"),
    "la_grad_dtype": (W.loss_aware_assign, lambda d: (f32(4, 4, d=d), u8(4, 4, d=d), f32(4, 4, d=d), f32(1, 4, d=d)), TypeError, "grad must be float32"),
    "la_penalty_shape": (W.loss_aware_assign, lambda d: (f32(4, 4, d=d), None, f32(4, 4, d=d), f32(1, 4, d=d), f32(1, 3, d=d)), ValueError, "penalty must have the shape of codebook"),
    "la_inf_weight": (W.loss_aware_assign, lambda d: (torch.full((4, 4), float("inf"), device=d), None, f32(4, 4, d=d), f32(1, 4, d=d)), ValueError, "contains NaN or Inf"),
    "la_codebook_nan": (W.loss_aware_assign, lambda d: (f32(4, 4, d=d), None, f32(4, 4, d=d), torch.full((1, 4), float("nan"), device=d)), ValueError, "codebook contains NaN"),
    # messages that print tensor shapes (formatted by shape_str; streaming IntArrayRef crashed on one machine)
    "dequant_packed_shape": (W.dequantize, lambda d: (u8(4, 3, d=d), f32(1, 16, d=d), 4, [4, 8]), ValueError, r"packed must be \[4, 4\] .* got \[4, 3\]"),
    "dequant_shape_negative": (W.dequantize, lambda d: (u8(4, 4, d=d), f32(1, 16, d=d), 4, [4, -8]), ValueError, r"shape must be positive, got \[4, -8\]"),
    "sl_packed_shape": (W.shared_linear, lambda d: (f32(2, 8, d=d), u8(4, 3, d=d), f32(1, 16, d=d), 4, 4, 8), ValueError, r"got \[4, 3\]"),
    "sl_x_shape": (W.shared_linear, lambda d: (f32(2, 7, d=d), u8(4, 4, d=d), f32(1, 16, d=d), 4, 4, 8), ValueError, r"in_features=8\], got \[2, 7\]"),
    "conv_weight_shape_3d": (W.shared_conv2d, lambda d: (f32(1, 2, 5, 5, d=d), u8(4, 9, d=d), f32(1, 16, d=d), 4, [4, 2, 9], None, [1, 1], [0, 0], [1, 1], 1), ValueError, r"weight_shape must be .* got \[4, 2, 9\]"),
    "conv_x_2d": (W.shared_conv2d, lambda d: (f32(2, 5, d=d), u8(4, 9, d=d), f32(1, 16, d=d), 4, [4, 2, 3, 3], None, [1, 1], [0, 0], [1, 1], 1), ValueError, r"got \[2, 5\]"),
    "sq_shapes": (W.sq_grad_accum, lambda d: (f32(4, 3, d=d), f32(5, 2, d=d)), ValueError, r"x \[4, 3\] and grad_out \[5, 2\]"),
    # kmeans1d_optimal (CPU op)
    "k1d_float32": (W.kmeans1d_optimal, lambda d: (f32(5), f32(5), 2), TypeError, "values must be float64"),
    "k1d_length": (W.kmeans1d_optimal, lambda d: (f32(5).double().sort().values, f32(4).double().abs(), 2), ValueError, "equal length"),
    # context_encode / context_decode (CPU ops: the file format's coder)
    "ctx_enc_dtype": (W.context_encode, lambda d: (u8(4, 8).int(), 4), TypeError, "indices must be uint8"),
    "ctx_enc_1d": (W.context_encode, lambda d: (u8(8), 4), ValueError, "indices must be 2-D"),
    "ctx_enc_k": (W.context_encode, lambda d: (u8(4, 8), 0), ValueError, "k must be in 1..256"),
    "ctx_enc_index_not_below_k": (W.context_encode, lambda d: (u8(4, 8, hi=9) + 8, 8), ValueError, "is not below k = 8"),
    "ctx_enc_noncontiguous": (W.context_encode, lambda d: (u8(8, 4).t(), 4), ValueError, "indices must be contiguous"),
    "ctx_dec_dtype": (W.context_decode, lambda d: (f32(16), 4, 4, 4), TypeError, "stream must be uint8"),
    "ctx_dec_rows": (W.context_decode, lambda d: (u8(16), -1, 4, 4), ValueError, "rows and cols must be >= 0"),
    "ctx_dec_huge": (W.context_decode, lambda d: (u8(16), 1 << 30, 1 << 20, 4), ValueError, "rows \\* cols <= 2"),
    "ctx_dec_version": (W.context_decode, lambda d: (u8(16) + 7, 4, 4, 4), ValueError, "stream version"),
    "ctx_dec_background": (W.context_decode, lambda d: (torch.tensor([1, 9, 0, 0, 0, 0, 0], dtype=torch.uint8), 4, 4, 4), ValueError, "background symbol 9"),
    "ctx_dec_truncated": (W.context_decode, lambda d: (torch.tensor([1, 0, 0, 1], dtype=torch.uint8), 4, 4, 4), ValueError, "not a context-coded"),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input(case, device):
    op, build, exc, match = CASES[case]
    with pytest.raises(exc, match=match):
        op(*build(device))


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a GPU and the CUDA kernels")
@pytest.mark.parametrize("which", ["codebook", "importance"])
def test_device_mismatch(which):
    w = f32(4, 4, d="cuda")
    if which == "codebook":
        with pytest.raises(RuntimeError, match="codebook is on cpu but w is on cuda"):
            W.assign(w, f32(1, 4))
    else:
        with pytest.raises(RuntimeError, match="importance is on cpu but w is on cuda"):
            W.kmeans_step(w, u8(4, 4, d="cuda"), 4, f32(4, 4))


def test_cuda_tensor_without_cuda_kernels_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    # no GPU here: creating a CUDA tensor itself fails clearly; the op is never reached with garbage
    with pytest.raises((RuntimeError, AssertionError)):
        W.assign(torch.zeros(4, device="cuda"), torch.zeros(1, 2, device="cuda"))


def test_too_many_elements_for_kmeans1d_is_rejected():
    # k * n beyond 2**31 back-pointers is refused before any allocation
    n = (1 << 24) + 1
    x = torch.arange(n, dtype=torch.float64)
    with pytest.raises(ValueError, match="histogram the values first"):
        W.kmeans1d_optimal(x, torch.ones_like(x), 256)
