"""Reliability of the CPU ops (issue "Reliability and security"): thread safety, determinism across thread counts,
edge cases called through torch.ops.weightshare.* directly, and a planted-fault check that the comparisons used
here can fail at all.

Edge-case behaviour documented (measured on the CPU kernels, then pinned by the tests below):
* zero-size tensors: every op raises ValueError naming the empty argument ("x is empty", "shape must be
  positive", ...); nothing returns an empty result.
* strided inputs (a transposed view, a slice with step 2): every op raises ValueError "... must be contiguous".
* packed buffers (and idx / w) that start 1 byte into a larger tensor, i.e. not 4-byte aligned: handled, with
  results bit-identical to an aligned copy and to weightshare.reference.
* bits 0 and 9: ValueError "bits must be in 1..8"; a codebook with more than 2**bits entries: ValueError.
* NaN / Inf: see the docstring of each test in the NaN/Inf section.
* sizes beyond 2**31 elements: dequantize / shared_linear / kmeans_step reject them before allocating; unpack's
  size check overflows int64 (xfail test below).
"""
import os
import threading

import pytest
import torch
from torch import nn

import weightshare as ws
from weightshare import reference
from weightshare.nn import SharedLinear

from conftest import requires_native

pytestmark = requires_native
W = torch.ops.weightshare
NAN, INF = float("nan"), float("inf")


# ----------------------------------------------------------------------------------------------- helpers


def _bits_of(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a tensor, so NaN payloads and -0.0 count and NaN == NaN at the same position."""
    t = t.detach().contiguous()
    if t.is_floating_point():
        return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])
    return t


def assert_bit_identical(a, b, what: str = "") -> None:
    """Same structure, dtypes, shapes and bits (tensors or tuples of tensors). The one comparison used for every
    'exactly the same result' claim in this file (test_planted_fault_is_detected checks it is not vacuous)."""
    if isinstance(a, (tuple, list)):
        assert isinstance(b, (tuple, list)) and len(a) == len(b), f"{what}: structure differs"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bit_identical(x, y, f"{what}[{i}]")
        return
    assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"
    assert torch.equal(_bits_of(a), _bits_of(b)), f"{what}: values differ at {(_bits_of(a) != _bits_of(b)).sum()} places"


def packed_problem(out_f: int, in_f: int, bits: int, k: int, seed: int = 0):
    """Random indices < k, their packed rows and an ascending codebook [1, k]."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, k, (out_f, in_f), dtype=torch.uint8, generator=gen)
    codebook = torch.sort(torch.randn(1, k, generator=gen)).values
    return idx, W.pack(idx, bits), codebook


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def small_model(seed: int = 0) -> nn.Module:
    """A two-layer MLP whose Linear layers are replaced by SharedLinear.from_dense with k-means assignments."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(96, 128), nn.ReLU(), nn.Linear(128, 10)).eval()
    for i in (0, 2):
        r = ws.kmeans(model[i].weight.detach(), 16)
        model[i] = SharedLinear.from_dense(model[i], r.codebook, r.idx)
    return model


# ----------------------------------------------------------------------------------------------- concurrency


def test_eight_threads_give_the_single_threaded_results():
    """8 Python threads x 50 iterations of shared_linear (float GEMV and panel, int8 row and blocked kernels), assign, shared_conv2d (each of
    its CPU kernels) and a compressed model's forward, all on the same input tensors and the same module, must reproduce the single-threaded
    results bit for bit (no shared scratch state, no races in lazily built tables)."""
    idx, packed, codebook = packed_problem(64, 96, 4, 16)
    gen = torch.Generator().manual_seed(1)
    x1, x8, x64 = (torch.randn(m, 96, generator=gen) for m in (1, 8, 64))
    w = torch.randn(64, 96, generator=gen)
    model = small_model()
    xc, xs = torch.randn(1, 16, 20, 20, generator=gen), torch.randn(1, 16, 8, 8, generator=gen)
    ccb = torch.randn(1, 16, generator=gen)
    cpacked = ws.ops.pack(torch.randint(0, 16, (16, 144), generator=gen, dtype=torch.uint8), 4)
    ppacked = ws.ops.pack(torch.randint(0, 16, (16, 16), generator=gen, dtype=torch.uint8), 4)
    dpacked = ws.ops.pack(torch.randint(0, 16, (16, 9), generator=gen, dtype=torch.uint8), 4)
    calls = {
        "linear_float_b1": lambda: W.shared_linear(x1, packed, codebook, 4, 64, 96, None, "float"),
        "linear_float_b64": lambda: W.shared_linear(x64, packed, codebook, 4, 64, 96, None, "float"),
        "linear_int8": lambda: W.shared_linear(x64, packed, codebook, 4, 64, 96, None, "int8"),  # blocked
        "linear_int8_b8": lambda: W.shared_linear(x8, packed, codebook, 4, 64, 96, None, "int8"),  # row kernel
        "assign": lambda: W.assign(w, codebook),
        "model": lambda: model(x64),
        # the conv kernels' reused per-thread buffers: Winograd (3x3, 100 tiles), direct (1x1), depthwise
        "conv_winograd": lambda: W.shared_conv2d(xc, cpacked, ccb, 4, [16, 16, 3, 3], None, [1, 1], [1, 1], [1, 1],
                                                 1),
        # one small image (16 tiles): the fused Winograd form, its per-thread transformed weights
        "conv_winograd_fused": lambda: W.shared_conv2d(xs, cpacked, ccb, 4, [16, 16, 3, 3], None, [1, 1], [1, 1],
                                                       [1, 1], 1),
        "conv_direct_1x1": lambda: W.shared_conv2d(xc, ppacked, ccb, 4, [16, 16, 1, 1], None, [1, 1], [0, 0],
                                                   [1, 1], 1),
        "conv_depthwise": lambda: W.shared_conv2d(xc, dpacked, ccb, 4, [16, 1, 3, 3], None, [1, 1], [1, 1], [1, 1],
                                                  16),
    }
    with torch.no_grad():
        expected = {name: call() for name, call in calls.items()}
        start = threading.Barrier(8)
        failures = []

        def worker(t: int) -> None:
            start.wait()  # all threads hit the ops at once
            try:
                for i in range(50):
                    name = list(calls)[(t + i) % len(calls)]  # threads interleave different ops
                    assert_bit_identical(calls[name](), expected[name], name)
            except BaseException as exc:  # collected: an assertion in a thread would otherwise be lost
                failures.append(f"thread {t}: {exc!r}")

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=120)
    assert not any(th.is_alive() for th in threads), "a worker thread hung"
    assert not failures, failures


# ----------------------------------------------------------------------------------------------- determinism


def _determinism_cases():
    gen = torch.Generator().manual_seed(2)
    idx, packed, codebook = packed_problem(256, 1000, 4, 16, seed=3)
    w = torch.randn(256, 1000, generator=gen)
    grad, hdiag = torch.randn(256, 1000, generator=gen), torch.rand(256, 1000, generator=gen)
    imp = torch.rand(256, 1000, generator=gen)
    x = {b: torch.randn(b, 1000, generator=gen) for b in (1, 3, 64)}
    bias = torch.randn(256, generator=gen)
    return {
        "assign": lambda: W.assign(w, codebook),
        "loss_aware_assign": lambda: W.loss_aware_assign(w, grad, hdiag, codebook, None),
        "kmeans_step": lambda: W.kmeans_step(w, idx, 16, imp, 4),
        "shared_linear_gemv_b1": lambda: W.shared_linear(x[1], packed, codebook, 4, 256, 1000, bias, "float"),
        "shared_linear_gemv_b3": lambda: W.shared_linear(x[3], packed, codebook, 4, 256, 1000, bias, "float"),
        "shared_linear_panel_b64": lambda: W.shared_linear(x[64], packed, codebook, 4, 256, 1000, bias, "float"),
        "shared_linear_int8": lambda: W.shared_linear(x[64], packed, codebook, 4, 256, 1000, bias, "int8"),
        "shared_linear_backward_codebook": lambda: W.shared_linear_backward(x[64][:, :256].contiguous(), x[64],
                                                                            packed, codebook, 4, 256, 1000, False,
                                                                            True)[1],
        "dequantize": lambda: W.dequantize(packed, codebook, 4, [256, 1000]),
        "pack": lambda: W.pack(idx, 4),
        "unpack": lambda: W.unpack(packed, 4, 1000),
    }


DETERMINISM = _determinism_cases()


@pytest.mark.parametrize("op", sorted(DETERMINISM))
def test_one_and_two_threads_are_bit_identical(op, restore_threads):
    """Every CPU kernel gives the same bits with 1 and 2 intra-op threads (the per-thread split of rows or
    reductions must not change any rounding). That includes shared_linear's batched path (batch > 4), whose blocked
    kernel sums each output over K in a fixed order whatever the split; only without AVX2 (WS_CPU_SIMD=scalar) does
    it fall back to the decoded panel times at::mm, whose blocking may depend on the thread count (torch's own
    x @ w.T differed between 1 and 2 threads on the Intel Xeon), and there the two must agree to fp32 rounding. The
    codebook gradient likewise starts from at::mm's dL/dW; its per-entry sums go in fixed row chunks."""
    torch.set_num_threads(1)
    one = DETERMINISM[op]()
    torch.set_num_threads(2)
    two = DETERMINISM[op]()
    if ("panel" in op and os.environ.get("WS_CPU_SIMD") == "scalar") or "backward" in op:
        torch.testing.assert_close(two, one, rtol=1e-5, atol=1e-5 * float(one.abs().max()))
    else:
        assert_bit_identical(one, two, op)


def _kmeans_model(seed: int) -> nn.Module:
    torch.manual_seed(0)  # the same dense weights every time; only the k-means run repeats
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    assignments = {name: ws.kmeans(m.weight.detach(), 8, init="kmeans++", seed=seed)
                   for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    ws.replace_layers(model, assignments)
    return model


def test_kmeans_with_a_seed_and_save_are_byte_reproducible(tmp_path):
    """ws.kmeans (seeded kmeans++) twice, and ws.save of one model twice, give byte-identical files."""
    a, b = _kmeans_model(seed=7), _kmeans_model(seed=7)
    ws.save(a, tmp_path / "a.ws", metadata={"run": 1})
    ws.save(b, tmp_path / "b.ws", metadata={"run": 1})
    ws.save(a, tmp_path / "a2.ws", metadata={"run": 1})
    first = (tmp_path / "a.ws").read_bytes()
    assert first == (tmp_path / "b.ws").read_bytes(), "same seed, different k-means result"
    assert first == (tmp_path / "a2.ws").read_bytes(), "same model saved twice, different bytes"


# ----------------------------------------------------------------------------------------------- edge cases


def u8(*shape, hi=16, seed=0):
    return torch.randint(0, hi, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def f32(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


CB = torch.linspace(-2, 2, 16).reshape(1, 16)
PACKED = W.pack(u8(8, 16), 4)  # [8, 8]
X = f32(3, 16)

# name -> (call, exception, message fragment). Calls go straight to torch.ops.weightshare (the C++ checks).
REJECTED = {
    # zero-size tensors: refused with the argument named, never an empty or garbage result
    "pack_zero_rows": (lambda: W.pack(u8(0, 8), 4), ValueError, "idx is empty"),
    "pack_zero_cols": (lambda: W.pack(u8(4, 0), 4), ValueError, "idx is empty"),
    "unpack_zero_rows": (lambda: W.unpack(u8(0, 4), 4, 8), ValueError, "packed is empty"),
    "assign_zero": (lambda: W.assign(f32(0, 16), CB), ValueError, "w is empty"),
    "assign_empty_codebook": (lambda: W.assign(f32(8, 16), torch.zeros(1, 0)), ValueError, "codebook is empty"),
    "kmeans_step_zero": (lambda: W.kmeans_step(f32(0, 4), u8(0, 4), 4, None, 1), ValueError, "w is empty"),
    "loss_aware_zero": (lambda: W.loss_aware_assign(f32(0, 4), None, f32(0, 4), CB, None), ValueError, "w is empty"),
    "dequantize_zero_rows": (lambda: W.dequantize(u8(0, 8), CB, 4, [0, 16]), ValueError, "must be positive"),
    "dequantize_zero_cols": (lambda: W.dequantize(u8(8, 0), CB, 4, [8, 0]), ValueError, "must be positive"),
    "linear_zero_batch": (lambda: W.shared_linear(f32(0, 16), PACKED, CB, 4, 8, 16, None, "float"), ValueError,
                          "x is empty"),
    "linear_int8_zero_batch": (lambda: W.shared_linear(f32(0, 16), PACKED, CB, 4, 8, 16, None, "int8"),
                               ValueError, "x is empty"),
    "linear_zero_in": (lambda: W.shared_linear(f32(3, 0), u8(8, 0), CB, 4, 8, 0, None, "float"), ValueError,
                       "x is empty"),
    "kmeans1d_zero": (lambda: W.kmeans1d_optimal(torch.zeros(0, dtype=torch.float64),
                                                 torch.zeros(0, dtype=torch.float64), 2), ValueError,
                      "values is empty"),
    # strided views: a transposed view and a step-2 slice of each tensor argument
    "assign_w_transposed": (lambda: W.assign(f32(16, 8).t(), CB), ValueError, "w must be contiguous"),
    "assign_w_step2": (lambda: W.assign(f32(8, 32)[:, ::2], CB), ValueError, "w must be contiguous"),
    "assign_codebook_step2": (lambda: W.assign(f32(8, 16), f32(1, 32)[:, ::2]), ValueError,
                              "codebook must be contiguous"),
    "pack_transposed": (lambda: W.pack(u8(16, 8).t(), 4), ValueError, "idx must be contiguous"),
    "unpack_step2": (lambda: W.unpack(u8(8, 16, hi=255)[:, ::2], 4, 16), ValueError, "packed must be contiguous"),
    "kmeans_step_idx_transposed": (lambda: W.kmeans_step(f32(8, 16), u8(16, 8).t(), 16, None, 1), ValueError,
                                   "idx must be contiguous"),
    "loss_aware_hdiag_step2": (lambda: W.loss_aware_assign(f32(8, 16), None, f32(8, 32)[:, ::2], CB, None),
                               ValueError, "hdiag must be contiguous"),
    "dequantize_packed_step2": (lambda: W.dequantize(u8(8, 16, hi=255)[:, ::2], CB, 4, [8, 16]), ValueError,
                                "packed must be contiguous"),
    "linear_x_transposed": (lambda: W.shared_linear(f32(16, 3).t(), PACKED, CB, 4, 8, 16, None, "float"),
                            ValueError, "x must be contiguous"),
    "linear_int8_x_step2": (lambda: W.shared_linear(f32(3, 32)[:, ::2], PACKED, CB, 4, 8, 16, None, "int8"),
                            ValueError, "x must be contiguous"),
    "linear_packed_step2": (lambda: W.shared_linear(X, u8(8, 16, hi=255)[:, ::2], CB, 4, 8, 16, None, "float"),
                            ValueError, "packed must be contiguous"),
    "linear_bias_step2": (lambda: W.shared_linear(X, PACKED, CB, 4, 8, 16, f32(16)[::2], "float"), ValueError,
                          "bias must be contiguous"),
    # bits outside 1..8 and codebooks larger than 2**bits
    **{f"{op}_bits_{b}": (call, ValueError, "bits must be in 1..8") for b in (0, 9) for op, call in {
        "dequantize": lambda b=b: W.dequantize(PACKED, CB, b, [8, 16]),
        "linear_float": lambda b=b: W.shared_linear(X, PACKED, CB, b, 8, 16, None, "float"),
        "linear_int8": lambda b=b: W.shared_linear(X, PACKED, CB, b, 8, 16, None, "int8"),
        "linear_backward": lambda b=b: W.shared_linear_backward(torch.ones(3, 8), X, PACKED, CB, b, 8, 16, True,
                                                                True),
        "conv2d": lambda b=b: W.shared_conv2d(f32(1, 1, 4, 4), PACKED, CB, b, [8, 1, 4, 4], None, [1, 1], [0, 0],
                                              [1, 1], 1),
    }.items()},
    "dequantize_codebook_32_at_4_bits": (lambda: W.dequantize(PACKED, f32(1, 32), 4, [8, 16]), ValueError,
                                         "more than 2\\*\\*bits"),
    "linear_codebook_32_at_4_bits": (lambda: W.shared_linear(X, PACKED, f32(1, 32), 4, 8, 16, None, "float"),
                                     ValueError, "more than 2\\*\\*bits"),
    "linear_int8_codebook_32_at_4_bits": (lambda: W.shared_linear(X, PACKED, f32(1, 32), 4, 8, 16, None, "int8"),
                                          ValueError, "more than 2\\*\\*bits"),
    "conv2d_codebook_32_at_4_bits": (lambda: W.shared_conv2d(f32(1, 1, 4, 4), PACKED, f32(1, 32), 4, [8, 1, 4, 4],
                                                             None, [1, 1], [0, 0], [1, 1], 1), ValueError,
                                     "more than 2\\*\\*bits"),
    "assign_codebook_257": (lambda: W.assign(f32(8, 16), f32(1, 257)), ValueError, "K must be in 1..256"),
    # sizes past 2**31 elements, refused from the arguments alone (nothing of that size is allocated)
    "dequantize_shape_2_41": (lambda: W.dequantize(u8(1, 4), CB, 4, [1, 2**20, 2**21]), ValueError, "too large"),
    "dequantize_rows_2_41": (lambda: W.dequantize(u8(1, 4), CB, 4, [2**41, 1]), ValueError, "too large"),
    "dequantize_product_wraps_int64": (lambda: W.dequantize(u8(1, 4), CB, 4, [1, 2**32, 2**32, 8]), ValueError,
                                       "too large"),
    "linear_out_features_2_40": (lambda: W.shared_linear(X, PACKED, CB, 4, 2**40, 16, None, "float"), ValueError,
                                 "packed must be"),
    "linear_in_features_2_40": (lambda: W.shared_linear(X, PACKED, CB, 4, 8, 2**40, None, "float"), ValueError,
                                "x must be"),
    "kmeans_step_k_2_40": (lambda: W.kmeans_step(f32(8, 16), u8(8, 16), 2**40, None, 1), ValueError,
                           "k must be in 1..256"),
}


@pytest.mark.parametrize("case", sorted(REJECTED))
def test_edge_case_is_refused_with_a_clear_error(case):
    call, exc, match = REJECTED[case]
    with pytest.raises(exc, match=match):
        call()


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """t's bytes in a uint8 view that starts 1 byte into a larger buffer (contiguous, right shape)."""
    assert t.dtype == torch.uint8
    buffer = torch.zeros(t.numel() + 1, dtype=torch.uint8)
    buffer[1:] = t.reshape(-1)
    view = buffer[1:].view(t.shape)
    assert view.is_contiguous() and view.data_ptr() % 4 == 1
    return view


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_misaligned_packed_buffers_give_the_reference_results(bits):
    """Packed rows (and uint8 indices) starting 1 byte past an aligned address are read correctly: unpack and
    dequantize equal the reference, shared_linear equals the same call on an aligned copy (all batch paths)."""
    out_f, in_f, k = 40, 300, min(16, 1 << bits)
    idx, packed, codebook = packed_problem(out_f, in_f, bits, k, seed=bits)
    odd = _misaligned(packed)
    assert_bit_identical(W.unpack(odd, bits, in_f), reference.unpack(packed, bits, in_f), "unpack")
    assert_bit_identical(W.pack(_misaligned(idx), bits), packed, "pack")
    assert_bit_identical(W.dequantize(odd, codebook, bits, [out_f, in_f]),
                         reference.dequantize(packed, codebook, bits, [out_f, in_f]), "dequantize")
    for batch in (1, 3, 64):
        x = f32(batch, in_f, seed=batch)
        for activation in ("float", "int8"):
            aligned = W.shared_linear(x, packed, codebook, bits, out_f, in_f, None, activation)
            assert_bit_identical(W.shared_linear(x, odd, codebook, bits, out_f, in_f, None, activation), aligned,
                                 f"shared_linear {activation} batch {batch}")
            ref = reference.shared_linear(x, packed, codebook, bits, out_f, in_f, None, activation)
            if activation == "int8":  # documented bit-exact to its definition
                assert_bit_identical(aligned, ref, "int8 vs reference")
            else:  # fp32 accumulation in a different order: equal up to rounding
                torch.testing.assert_close(aligned, ref, rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------------------------- NaN / Inf


def _with(t: torch.Tensor, flat_index: int, value: float) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[flat_index] = value
    return t


def test_assign_nan_weights_raise_and_inf_weights_go_to_the_extremes():
    """assign: a NaN weight raises ValueError ("w contains NaN"); +Inf goes to the largest entry and -Inf to the
    smallest; a NaN or Inf codebook entry raises ValueError."""
    w = f32(8, 16)
    with pytest.raises(ValueError, match="w contains NaN"):
        W.assign(_with(w, 5, NAN), CB)
    idx = W.assign(_with(_with(w, 0, INF), 1, -INF), CB)
    assert idx.view(-1)[0] == 15 and idx.view(-1)[1] == 0
    for bad in (NAN, INF, -INF):
        with pytest.raises(ValueError, match="codebook contains NaN or Inf"):
            W.assign(w, _with(CB, 3, bad))


def test_loss_aware_assign_refuses_non_finite_inputs_but_takes_inf_penalties():
    """loss_aware_assign: NaN/Inf in w, grad or hdiag raise; NaN/Inf codebook entries raise; a NaN or -Inf penalty
    raises; +Inf penalties forbid entries (all forbidden: every weight gets index 0)."""
    w, h = f32(8, 16), torch.ones(8, 16)
    for args in [(_with(w, 0, NAN), None, h), (w, _with(w, 0, INF), h), (w, None, _with(h, 0, NAN))]:
        with pytest.raises(ValueError, match="contains NaN or Inf"):
            W.loss_aware_assign(*args, CB, None)
    with pytest.raises(ValueError, match="codebook contains NaN or Inf"):
        W.loss_aware_assign(w, None, h, _with(CB, 0, INF), None)
    for bad in (NAN, -INF):
        with pytest.raises(ValueError, match="penalty contains NaN or -Inf"):
            W.loss_aware_assign(w, None, h, CB, _with(torch.zeros(1, 16), 0, bad))
    forbid_top = torch.zeros(1, 16)
    forbid_top[0, 15] = INF
    assert int(W.loss_aware_assign(w * 100, None, h, CB, forbid_top).max()) < 15
    assert int(W.loss_aware_assign(w, None, h, CB, torch.full((1, 16), INF)).max()) == 0


def test_kmeans_step_propagates_a_nan_weight_into_its_entry_only():
    """kmeans_step does not validate values: a NaN weight makes the sums of its own entry NaN (the counts stay
    exact) and leaves every other entry's statistics unchanged."""
    w, idx = f32(8, 16), u8(8, 16)
    clean = W.kmeans_step(w, idx, 16, None, 1)
    sums, counts, sq = W.kmeans_step(_with(w, 0, NAN), idx, 16, None, 1)
    j = int(idx[0, 0])
    assert sums[0, j].isnan() and sq[0, j].isnan()
    assert_bit_identical(counts, clean[1], "counts")
    others = [i for i in range(16) if i != j]
    assert_bit_identical(sums[:, others], clean[0][:, others], "other sums")


def test_dequantize_and_float_shared_linear_propagate_nan_and_inf():
    """dequantize copies NaN/Inf codebook entries into the weight; shared_linear "float" propagates NaN/Inf from
    activations and codebooks like a dense matmul: the NaN/Inf positions equal the reference's, in every batch
    path (GEMV 1 and 3, panel 64)."""
    idx, packed, codebook = packed_problem(8, 16, 4, 16)
    j = int(idx[0, 0])
    deq = W.dequantize(packed, _with(codebook, j, NAN), 4, [8, 16])
    assert torch.equal(deq.isnan(), idx == j)
    for batch in (1, 3, 64):
        x = f32(batch, 16, seed=batch)
        for xx, cb in [(_with(x, 0, NAN), codebook), (_with(x, 0, INF), codebook), (x, _with(codebook, j, NAN)),
                       (x, _with(codebook, j, INF))]:
            y = W.shared_linear(xx, packed, cb, 4, 8, 16, None, "float")
            ref = reference.shared_linear(xx, packed, cb, 4, 8, 16, None, "float")
            assert torch.equal(y.isnan(), ref.isnan()) and torch.equal(y.isinf(), ref.isinf())
            assert y.isnan().any() or y.isinf().any()


def test_int8_shared_linear_propagates_non_finite_values():
    """shared_linear "int8": a row of x holding NaN or Inf comes out all NaN (its int8 scale is NaN), every other
    row exactly as without it; a NaN codebook entry makes its group's outputs NaN. Same as the float path, where
    non-finite values propagate, instead of finite garbage (found by this suite, then fixed)."""
    idx, packed, codebook = packed_problem(8, 16, 4, 16)
    for bad in (NAN, INF):
        for batch in (1, 3, 64):
            x = f32(batch, 16, seed=batch)
            y = W.shared_linear(_with(x, 0, bad), packed, codebook, 4, 8, 16, None, "int8")
            assert y[0].isnan().all()
            assert_bit_identical(y[1:], W.shared_linear(x, packed, codebook, 4, 8, 16, None, "int8")[1:], "other rows")
    assert W.shared_linear(f32(2, 16), packed, _with(codebook, 3, NAN), 4, 8, 16, None, "int8").isnan().all()


def test_unpack_rejects_an_n_whose_row_size_would_overflow():
    # n * bits used to wrap around in int64 (UBSan: packing.h signed overflow); now bounded before multiplying
    with pytest.raises(ValueError, match="n \\(indices per row\\) must be in 1..2\\*\\*40"):
        W.unpack(torch.zeros(1, 16, dtype=torch.uint8), 8, 2**62 + 16)


# ----------------------------------------------------------------------------------------------- planted fault


def test_planted_fault_is_detected(monkeypatch):
    """The comparisons above are not vacuous: reference.dequantize patched to corrupt one element by one ulp (and,
    separately, one NaN payload bit) makes assert_bit_identical fail, while the unpatched reference passes."""
    idx, packed, codebook = packed_problem(40, 300, 4, 16)
    kernel = W.dequantize(packed, codebook, 4, [40, 300])
    assert_bit_identical(kernel, reference.dequantize(packed, codebook, 4, [40, 300]))  # the honest baseline

    original = reference.dequantize

    def corrupted(*args):
        out = original(*args)
        out.view(-1)[1234] = torch.nextafter(out.view(-1)[1234], torch.tensor(INF))
        return out

    monkeypatch.setattr(reference, "dequantize", corrupted)
    with pytest.raises(AssertionError, match="values differ at 1 places"):
        assert_bit_identical(kernel, reference.dequantize(packed, codebook, 4, [40, 300]))
    # also within NaN: two NaNs with different payloads are different bits
    a = torch.tensor([NAN])
    b = a.view(torch.int32).add(1).view(torch.float32)
    assert b.isnan().all()
    with pytest.raises(AssertionError):
        assert_bit_identical(a, b)
    with pytest.raises(AssertionError, match="structure differs"):
        assert_bit_identical((kernel,), (kernel, kernel))
