"""shared_linear / dequantize / shared_linear_backward against the reference, on every dtype, width and path (the int8
activation path: test_shared_linear_int8.py; the CUDA kernels one by one: test_shared_linear_cuda.py)."""
import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import weightshare as ws
from weightshare import reference

from conftest import DEVICES, FLOAT_DTYPES, on, requires_native

pytestmark = requires_native

TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-2, 2e-2), torch.bfloat16: (5e-2, 5e-2)}


def make_weight(out_f, in_f, bits, groups, gen, k=None):
    k = k or (1 << bits)
    idx = torch.randint(0, k, (out_f, in_f), generator=gen, dtype=torch.uint8)
    return ws.ops.pack(idx, bits), torch.randn(groups, k, generator=gen) * 0.1, idx


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("shape", [(17, 33), (64, 256), (5, 1030)])
@pytest.mark.parametrize("per_row", [False, True])
def test_dequantize(bits, shape, per_row, path, gen):
    packed, cb, idx = make_weight(*shape, bits, shape[0] if per_row else 1, gen)
    got = on(path, ws.ops.dequantize, packed, cb, bits, shape)
    want = cb[torch.arange(shape[0])[:, None] // (shape[0] // cb.shape[0]), idx.long()]
    assert torch.equal(got, want)
    assert torch.equal(got, reference.dequantize(packed, cb, bits, shape))


def test_dequantize_conv_shape_and_nan_for_unused_entries(device, gen):
    packed, _, idx = make_weight(8, 3 * 3 * 3, 3, 1, gen)
    cb = torch.randn(1, 5)  # K=5 < 2**3: indices 5..7 are not valid entries
    w = ws.ops.dequantize(packed.to(device), cb.to(device), 3, (8, 3, 3, 3)).cpu()
    assert w.shape == (8, 3, 3, 3)
    assert torch.equal(torch.isnan(w).reshape(8, -1), idx >= 5)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("groups", [1, 9])
def test_dequantize_wide_rows_nan_for_unused_entries(bits, groups, path, gen):
    """Rows wide enough for the SIMD decoders (AVX-512 6-8-bit byte planes: 64 columns a block, 200 = 3 x 64 + 8;
    AVX2 register tables up to 4 bits: 8 columns a step), codebooks shorter than 2**bits: every index past K decodes
    to NaN, the others to their entry, bit for bit."""
    k = (1 << bits) - 3
    idx = torch.randint(0, 1 << bits, (9, 200), generator=gen, dtype=torch.uint8)
    cb = torch.randn(groups, k, generator=gen)
    w = on(path, ws.ops.dequantize, ws.ops.pack(idx, bits), cb, bits, (9, 200))
    assert torch.equal(torch.isnan(w), idx >= k)
    rows = torch.arange(9)[:, None] // (9 // groups)
    valid = idx < k
    assert torch.equal(w[valid], cb[rows.expand(9, 200)[valid], idx.long()[valid]])


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("M", [1, 3, 4, 5, 8, 9, 64])  # CPU: the GEMV, once per 4 rows up to 8, blocked above
@pytest.mark.parametrize("per_row", [False, True])
def test_float_matches_reference(bits, M, per_row, simd, device, gen):
    out_f, in_f = 48, 200  # in_f not a multiple of 16: SIMD blocks + scalar tail
    packed, cb, _ = make_weight(out_f, in_f, bits, out_f if per_row else 1, gen)
    x = torch.randn(M, in_f, generator=gen)
    bias = torch.randn(out_f, generator=gen)
    args = (x, packed, cb, bits, out_f, in_f, bias)
    got = ws.ops.shared_linear(*[a.to(device) if isinstance(a, torch.Tensor) else a for a in args]).cpu()
    torch.testing.assert_close(got, reference.shared_linear(*args), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("M", [1, 2, 4])
@pytest.mark.parametrize("groups", [1, 6])
def test_gemv_wide_rows(bits, M, groups, path, gen):
    """The GEMV paths over rows wide enough for several SIMD steps of every width and a tail (1100 = 4 x 256 + 76
    at 1 bit, 17 x 64 + 12 at 4 bits; the AVX2 6-8-bit path's 8-byte loads stop short of the row end), one or
    several codebooks, one codebook with fewer entries than 2**bits; the int8 path bit-exact on the same rows."""
    out_f, in_f = 18, 1100
    k = max(2, (1 << bits) - 1) if groups == 1 else None
    packed, cb, _ = make_weight(out_f, in_f, bits, groups, gen, k=k)
    x = torch.randn(M, in_f, generator=gen)
    got = on(path, ws.ops.shared_linear, x, packed, cb, bits, out_f, in_f)
    torch.testing.assert_close(got, reference.shared_linear(x, packed, cb, bits, out_f, in_f), rtol=1e-5, atol=1e-5)
    assert torch.equal(on(path, ws.ops.shared_linear, x, packed, cb, bits, out_f, in_f, None, "int8"),
                       reference.shared_linear(x, packed, cb, bits, out_f, in_f, None, "int8"))


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("in_f", [100, 300, 784, 1100])
def test_gemv_row_tails_read_no_padding(bits, in_f, simd, gen):
    """The GEMVs finish a row's partial last block with masked lookups: the padding bits past in_features read as
    index 0, so codebook entry 0 is made +inf and used by no weight; any padding lane that reached the sum would
    turn it into inf or NaN. Row widths as in LeNet-300-100 / LeNet-5 (tails of 4 to 63 weights after 16-, 64- and
    256-weight blocks)."""
    out_f, k = 7, 1 << bits
    idx = torch.randint(1, k, (out_f, in_f), generator=gen, dtype=torch.uint8)
    packed = ws.ops.pack(idx, bits)
    cb = torch.randn(1, k, generator=gen) * 0.1
    cb[0, 0] = float("inf")
    for M in (1, 3):
        x = torch.randn(M, in_f, generator=gen)
        got = ws.ops.shared_linear(x, packed, cb, bits, out_f, in_f)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, reference.shared_linear(x, packed, cb, bits, out_f, in_f), rtol=1e-5,
                                   atol=1e-5)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("in_f", [100, 300, 784, 1100])
def test_gemv_padded_last_step_adds_zeros(bits, in_f, simd, gen):
    """With a finite codebook the AVX2 4-bit GEMV runs a row's tail as one more vector step: its indices past the
    row's end (the next row's bytes, or for the last rows zeros from a copy, never bytes past the tensor) meet x
    padded with zeros. Codebook entry 0, which no weight uses, is 1e20 (finite): a junk index meeting anything but a
    zero would show. Every width and SIMD path, against the reference."""
    out_f, k = 7, 1 << bits
    idx = torch.randint(1, k, (out_f, in_f), generator=gen, dtype=torch.uint8)
    packed = ws.ops.pack(idx, bits)
    cb = torch.randn(1, k, generator=gen) * 0.1
    cb[0, 0] = 1e20
    for M in (1, 3):
        x = torch.randn(M, in_f, generator=gen)
        torch.testing.assert_close(ws.ops.shared_linear(x, packed, cb, bits, out_f, in_f),
                                   reference.shared_linear(x, packed, cb, bits, out_f, in_f), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [6, 7, 8])
@pytest.mark.parametrize("M", [1, 2, 3, 4])
@pytest.mark.parametrize("in_f", [8, 300, 1100])
@pytest.mark.parametrize("groups", [1, 6])
def test_avx2_gemv_lookup_forms_agree(bits, M, in_f, groups, monkeypatch, gen):
    """The AVX2 GEMV's 6-8-bit lookups by gathers and by scalar loads (WS_CPU_LOOKUP8; unset, whichever ran faster
    on this core) give the same bits, equal to the reference; an index past a short codebook gives NaN in both
    (one codebook of 2**bits - 5 entries). Rows of one 8-index step, and of many with tails."""
    monkeypatch.setenv("WS_CPU_SIMD", "avx2")
    out_f, n = 12, 1 << bits
    k = n - 5 if groups == 1 else n
    idx = torch.randint(0, n, (out_f, in_f), generator=gen, dtype=torch.uint8)
    if k < n and in_f > 8:  # rows with no index past the codebook too: the NaN must stay in its own rows
        idx[::2] %= k
    packed, cb = ws.ops.pack(idx, bits), torch.randn(groups, k, generator=gen) * 0.1
    x = torch.randn(M, in_f, generator=gen)
    got = {}
    for form in ("gather", "scalar", None):
        if form is None:
            monkeypatch.delenv("WS_CPU_LOOKUP8")
        else:
            monkeypatch.setenv("WS_CPU_LOOKUP8", form)
        got[form] = ws.ops.shared_linear(x, packed, cb, bits, out_f, in_f).view(torch.int32)
    assert torch.equal(got["gather"], got["scalar"]) and torch.equal(got["gather"], got[None])
    y = got["gather"].view(torch.float32)
    rows_bad = (idx.long() >= k).any(dim=1)  # a row's outputs are NaN if and only if one of its indices is past the codebook
    assert torch.equal(torch.isnan(y), rows_bad.expand(M, out_f))
    want = reference.shared_linear(x, packed, cb, bits, out_f, in_f)
    torch.testing.assert_close(y[:, ~rows_bad], want[:, ~rows_bad], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [1, 3, 4, 8])
@pytest.mark.parametrize("M", [9, 37, 300])
@pytest.mark.parametrize("groups", [1, 3])
def test_batched_blocked_kernel(bits, M, groups, simd, monkeypatch, gen):
    """The CPU batched path (shared_linear_blocked.cpp) where its blocking shows: several K chunks of 256 with a
    scalar decode tail (600 = 2 x 256 + 88), output features not a multiple of the register block and codebook
    groups that straddle blocks (21 rows, 7 per group), a batch beyond one 256-column pass and not a multiple of the
    vector width. Against the reference, and against the decode + ATen GEMM path it replaced."""
    out_f, in_f = 21, 600
    packed, cb, _ = make_weight(out_f, in_f, bits, groups, gen)
    x = torch.randn(M, in_f, generator=gen)
    bias = torch.randn(out_f, generator=gen)
    got = ws.ops.shared_linear(x, packed, cb, bits, out_f, in_f, bias)
    torch.testing.assert_close(got, reference.shared_linear(x, packed, cb, bits, out_f, in_f, bias),
                               rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("WS_CPU_LINEAR", "aten")
    torch.testing.assert_close(got, ws.ops.shared_linear(x, packed, cb, bits, out_f, in_f, bias),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_dtypes_and_leading_dims(dtype, with_bias, device, gen):
    # a bias in the model's dtype too (the CUDA epilogue reads a 16-bit bias as such, with no conversion kernel)
    packed, cb, _ = make_weight(40, 96, 4, 1, gen)
    x = torch.randn(2, 3, 96, generator=gen).to(dtype)
    b = (torch.randn(40, generator=gen) * 3).to(dtype) if with_bias else None
    y = ws.ops.shared_linear(x.to(device), packed.to(device), cb.to(dtype).to(device), 4, 40, 96,
                             None if b is None else b.to(device)).cpu()
    assert y.dtype == dtype and y.shape == (2, 3, 40)
    w = ws.ops.dequantize(packed, cb, 4, (40, 96))
    want = F.linear(x.float(), w.to(dtype).float(), None if b is None else b.float())
    torch.testing.assert_close(y.float(), want, rtol=TOL[dtype][0], atol=TOL[dtype][1])


def test_identity_gives_the_dequantised_weight(simd, device, gen):
    # FLUTE's check: x = I selects the weight's columns exactly (one product with 1.0, the rest zeros)
    for M in (4, 64):  # GEMV and batched paths
        packed, cb, _ = make_weight(M, M, 3, 1, gen)
        y = ws.ops.shared_linear(torch.eye(M).to(device), packed.to(device), cb.to(device), 3, M, M).cpu()
        assert torch.equal(y, ws.ops.dequantize(packed, cb, 3, (M, M)).T)


@pytest.mark.parametrize("M", [1, 6])
@pytest.mark.parametrize("per_row", [False, True])
def test_autograd_matches_dense(M, per_row, device, gen):
    out_f, in_f, bits = 20, 50, 3
    packed, cb, _ = make_weight(out_f, in_f, bits, out_f if per_row else 1, gen)
    x = torch.randn(M, in_f, generator=gen, dtype=torch.float32)
    bias = torch.randn(out_f, generator=gen)
    xs, cs, bs = (t.clone().to(device).requires_grad_() for t in (x, cb, bias))
    y = ws.ops.shared_linear(xs, packed.to(device), cs, bits, out_f, in_f, bs)
    g = torch.randn_like(y)
    y.backward(g)
    xr, cr, br = (t.clone().requires_grad_() for t in (x, cb, bias))
    yr = reference.shared_linear(xr, packed, cr, bits, out_f, in_f, br)  # differentiable through indexing
    yr.backward(g.cpu())
    torch.testing.assert_close(xs.grad.cpu(), xr.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cs.grad.cpu(), cr.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(bs.grad.cpu(), br.grad)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("out_f,in_f", [(24, 37), (24, 300), (70, 130)])
@pytest.mark.parametrize("groups,fewer", [(1, False), (2, False), (1, True)])
def test_backward_every_width(bits, out_f, in_f, groups, fewer, simd, gen):
    """Both gradients on every CPU path. grad_x (shared_linear_grad_x.cpp): column blocks of 64 (AVX-512) or 24
    (AVX2) with a partial last one, 70 rows = a 64-row tile and a 6-row one, 5 rows of x = a 4-row register tile and a
    1-row one. dL/dcodebook (codebook_grad.cpp): the AVX-512 per-entry masked sums up to 4 bits and the scalar loop,
    rows with a partial last 16-block, a codebook per half of the rows, and codebooks of fewer than 2**bits entries
    whose unused indices (present in the weight) credit nothing. Against the reference (dequantised W, index_add)."""
    M = 5
    k = max(1, (1 << bits) - 1) if fewer else 1 << bits
    idx = torch.randint(0, 1 << bits, (out_f, in_f), generator=gen, dtype=torch.uint8)
    packed, cb = ws.ops.pack(idx, bits), torch.randn(groups, k, generator=gen)
    if fewer:
        idx = idx.clamp(max=k - 1)  # grad_x needs valid entries (an index >= K decodes to NaN)
        packed_x = ws.ops.pack(idx, bits)
    else:
        packed_x = packed
    x, g = torch.randn(M, in_f, generator=gen), torch.randn(M, out_f, generator=gen)
    _, gc = torch.ops.weightshare.shared_linear_backward(g, x, packed, cb, bits, out_f, in_f, False, True)
    _, want_c = reference.shared_linear_backward(g, x, packed, cb, bits, out_f, in_f, False, True)
    torch.testing.assert_close(gc, want_c, rtol=1e-4, atol=1e-4)  # the reference sums in fp32
    gx, gc2 = torch.ops.weightshare.shared_linear_backward(g, x, packed_x, cb, bits, out_f, in_f, True, True)
    want_x, want_c2 = reference.shared_linear_backward(g, x, packed_x, cb, bits, out_f, in_f, True, True)
    torch.testing.assert_close(gx, want_x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gc2, want_c2, rtol=1e-4, atol=1e-4)


def test_codebook_gradient_of_rows_past_the_tile_buffer(gen):
    """Rows of over 2**20 features: the fused codebook gradient's per-thread buffer would pass 64 MiB, so the
    decoded-panel path takes the call. Against the reference."""
    out_f, in_f, M = 2, (1 << 20) + 3, 2
    idx = torch.randint(0, 16, (out_f, in_f), generator=gen, dtype=torch.uint8)
    packed, cb = ws.ops.pack(idx, 4), torch.randn(1, 16, generator=gen)
    x, g = torch.randn(M, in_f, generator=gen), torch.randn(M, out_f, generator=gen)
    gx, gc = torch.ops.weightshare.shared_linear_backward(g, x, packed, cb, 4, out_f, in_f, True, True)
    want_x, want_c = reference.shared_linear_backward(g, x, packed, cb, 4, out_f, in_f, True, True)
    torch.testing.assert_close(gx, want_x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gc, want_c, rtol=1e-3, atol=1e-2)  # the reference sums 2**20 terms in fp32


@pytest.mark.filterwarnings("ignore:Input #.* requires gradient and is not a double precision")  # fp32 on purpose
def test_gradcheck_float64_reference_agrees(gen):
    # the backward op against finite differences of the forward (fp32: loose, but catches wrong formulas)
    packed, cb, _ = make_weight(6, 10, 2, 1, gen)
    x = torch.randn(3, 10, generator=gen, requires_grad=True)
    c = cb.clone().requires_grad_()
    torch.autograd.gradcheck(lambda a, b: ws.ops.shared_linear(a, packed, b, 2, 6, 10), (x, c), eps=1e-2,
                             atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("activation", ["float", "int8"])
def test_opcheck(activation, device, gen):
    packed, cb, _ = make_weight(16, 40, 4, 16, gen)
    x = torch.randn(3, 40, generator=gen)
    args = (x.to(device), packed.to(device), cb.to(device), 4, 16, 40, torch.randn(16).to(device), activation)
    opcheck(torch.ops.weightshare.shared_linear.default, args)
    if activation == "float":
        xg = x.to(device).requires_grad_()
        opcheck(torch.ops.weightshare.shared_linear.default, (xg,) + args[1:])
        opcheck(torch.ops.weightshare.shared_linear_backward.default,
                (torch.randn(3, 16).to(device), args[0], args[1], args[2], 4, 16, 40, True, True))
    opcheck(torch.ops.weightshare.dequantize.default, (packed.to(device), cb.to(device), 4, [16, 40]))


def test_torch_compile_fullgraph(gen):
    packed, cb, _ = make_weight(16, 40, 4, 1, gen)
    x = torch.randn(2, 40, generator=gen)

    @torch.compile(fullgraph=True, backend="eager")
    def f(a):
        return torch.relu(ws.ops.shared_linear(a, packed, cb, 4, 16, 40))

    torch.testing.assert_close(f(x), torch.relu(ws.ops.shared_linear(x, packed, cb, 4, 16, 40)))


@pytest.mark.parametrize("case,exc,match", [
    ("codebook_too_big", ValueError, "more than 2\\*\\*bits"),
    ("packed_shape", ValueError, "packed must be \\[16, 20\\]"),
    ("x_features", ValueError, "x must be \\[..., in_features=40\\]"),
    ("activation", ValueError, "activation must be"),
    ("bias_shape", ValueError, "bias must be \\[16\\]"),
    ("x_dtype", TypeError, "x must be float32"),
    ("groups", ValueError, "must divide the 16 rows"),
])
def test_bad_input(case, exc, match, device, gen):
    packed, cb, _ = make_weight(16, 40, 4, 1, gen)
    a = dict(x=torch.randn(2, 40), packed=packed, codebook=cb, bits=4, out_features=16, in_features=40, bias=None,
             activation="float")
    if case == "codebook_too_big":
        a["codebook"] = torch.randn(1, 17)
    elif case == "packed_shape":
        a["packed"] = torch.zeros(16, 24, dtype=torch.uint8)
    elif case == "x_features":
        a["x"] = torch.randn(2, 41)
    elif case == "activation":
        a["activation"] = "int4"
    elif case == "bias_shape":
        a["bias"] = torch.randn(15)
    elif case == "x_dtype":
        a["x"] = torch.randn(2, 40).double()
    elif case == "groups":
        a["codebook"] = torch.randn(3, 16)
    a = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in a.items()}
    with pytest.raises(exc, match=match):
        torch.ops.weightshare.shared_linear(**a)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("groups", [1, 3])
def test_double_backward_matches_the_dense_layer(groups, device):
    """Second derivatives through shared_linear (a Hessian-vector product of a compressed layer w.r.t. its input and
    its codebook) equal those of F.linear with the weight gathered differentiably from the codebook."""
    torch.manual_seed(0)
    out_f, in_f, bits = 6, 10, 3
    idx = torch.randint(0, 8, (out_f, in_f), dtype=torch.uint8)
    packed = ws.ops.pack(idx, bits)
    cb0, x0 = torch.randn(groups, 8), torch.randn(2, 5, in_f)
    v, u = torch.randn(2, 5, in_f), torch.randn(groups, 8)
    idx, packed, cb0, x0, v, u = (t.to(device) for t in (idx, packed, cb0, x0, v, u))

    def second_derivatives(layer):
        x, cb = x0.clone().requires_grad_(True), cb0.clone().requires_grad_(True)
        loss = layer(x, cb).sin().sum()
        gx, gc = torch.autograd.grad(loss, [x, cb], create_graph=True)
        return torch.autograd.grad((gx * v).sum() + (gc * u).sum(), [x, cb])

    rows = torch.arange(out_f, device=device) // (out_f // groups)
    ours = second_derivatives(lambda x, cb: torch.ops.weightshare.shared_linear(x, packed, cb, bits, out_f, in_f))
    dense = second_derivatives(lambda x, cb: torch.nn.functional.linear(x, cb[rows[:, None], idx.long()]))
    for a, b in zip(ours, dense):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("path", ["default", "mma", "tiles"])
def test_thin_long_layers_split_k(bits, path, device, monkeypatch, gen):
    """Layers with few output rows and long rows, where the CUDA kernels split K over several blocks and sum the
    partials in a finalize kernel (the shapes elsewhere, in_f <= 300 or thousands of rows, never split): the SIMT
    GEMV (fp32 x, 1 and 5 rows; fp16 1 row; int8 1 and 11 rows), the tensor-core GEMV (fp16 3, bf16 5 rows), the
    tile kernel (40 rows, fp32, fp16 and int8). int8 is bit-exact; the float paths match the reference at their
    dtype's precision."""
    if device == "cpu" and path != "default":
        pytest.skip("WS_CUDA_GEMV / WS_CUDA_LINEAR choose CUDA kernels only")
    if path == "mma":
        monkeypatch.setenv("WS_CUDA_GEMV", "mma")
    if path == "tiles":
        monkeypatch.setenv("WS_CUDA_LINEAR", "tiles")
    out_f, in_f = 40, 8192
    packed, cb, _ = make_weight(out_f, in_f, bits, 1, gen)
    bias = torch.randn(out_f, generator=gen)
    cases = {"default": [(torch.float32, 1), (torch.float32, 5), (torch.float16, 1)],
             "mma": [(torch.float16, 3), (torch.bfloat16, 5)],
             "tiles": [(torch.float32, 40), (torch.float16, 40)]}[path]
    for dtype, M in cases:
        x = torch.randn(M, in_f, generator=gen).to(dtype)
        y = ws.ops.shared_linear(x.to(device), packed.to(device), cb.to(device), bits, out_f, in_f,
                                 bias.to(device)).cpu()
        w = ws.ops.dequantize(packed, cb, bits, (out_f, in_f)).to(dtype).float()
        tol = (1e-4, 1e-3) if dtype == torch.float32 else TOL[dtype]
        torch.testing.assert_close(y.float(), F.linear(x.float(), w, bias), rtol=tol[0], atol=tol[1])
    for M in {"default": [1, 11], "mma": [], "tiles": [40]}[path]:
        x = torch.randn(M, in_f, generator=gen)
        y = ws.ops.shared_linear(x.to(device), packed.to(device), cb.to(device), bits, out_f, in_f, bias.to(device),
                                 "int8").cpu()
        assert torch.equal(y, reference.shared_linear(x, packed, cb, bits, out_f, in_f, bias, "int8"))


@pytest.mark.parametrize("shape", [(512, 64, 40), (24, 96, 600)])
def test_backward_with_split_reductions(shape, device, gen):
    """The backward where the CUDA tile kernels split their reduction: grad_x over 512 output rows, the codebook
    gradient over 600 rows of x. Against autograd through the reference."""
    out_f, in_f, M = shape
    packed, cb, _ = make_weight(out_f, in_f, 4, 1, gen)
    x = torch.randn(M, in_f, generator=gen)
    xs, cs = x.clone().to(device).requires_grad_(), cb.clone().to(device).requires_grad_()
    y = ws.ops.shared_linear(xs, packed.to(device), cs, 4, out_f, in_f)
    g = torch.randn(y.shape, generator=gen)
    y.backward(g.to(device))
    xr, cr = x.clone().requires_grad_(), cb.clone().requires_grad_()
    reference.shared_linear(xr, packed, cr, 4, out_f, in_f).backward(g)
    torch.testing.assert_close(xs.grad.cpu(), xr.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cs.grad.cpu(), cr.grad, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16])
def test_backward_op_with_an_fp32_grad_for_16bit_x(x_dtype, device, gen):
    """The backward op called directly with grad_out in fp32 and x in 16 bits: computed in fp32 as the reference
    does (grad_out is not rounded to x's dtype first: bf16 would keep 8 of its 24 mantissa bits); grad_x in x's
    dtype."""
    out_f, in_f, M = 48, 70, 5
    packed, cb, _ = make_weight(out_f, in_f, 4, 1, gen)
    x = torch.randn(M, in_f, generator=gen).to(x_dtype)
    g = torch.randn(M, out_f, generator=gen) * (1 + 1 / 3)  # not representable in 16 bits
    gx, gc = torch.ops.weightshare.shared_linear_backward(g.to(device), x.to(device), packed.to(device),
                                                          cb.to(device), 4, out_f, in_f, True, True)
    want_x, want_c = reference.shared_linear_backward(g, x, packed, cb, 4, out_f, in_f, True, True)
    assert gx.dtype == x_dtype and gc.dtype == torch.float32
    torch.testing.assert_close(gx.cpu(), want_x)
    torch.testing.assert_close(gc.cpu(), want_c, rtol=1e-5, atol=1e-4)
