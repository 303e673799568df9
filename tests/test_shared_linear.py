"""shared_linear / dequantize / shared_linear_backward against the reference, on every dtype, width and path."""
import warnings

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


@pytest.mark.parametrize("bits", range(1, 9))
# M 3-5: the row kernels' x-row groupings (4s; on AVX2 at 2 and 4 bits 2s and a 3)
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 8, 11])
@pytest.mark.parametrize("per_row", [False, True])
def test_int8_is_bit_exact_to_its_definition(bits, M, per_row, path, gen):
    out_f, in_f = 24, 300
    packed, cb, _ = make_weight(out_f, in_f, bits, out_f if per_row else 1, gen)
    x = torch.randn(M, in_f, generator=gen)
    bias = torch.randn(out_f, generator=gen)
    got = on(path, ws.ops.shared_linear, x, packed, cb, bits, out_f, in_f, bias, "int8")
    assert torch.equal(got, reference.shared_linear(x, packed, cb, bits, out_f, in_f, bias, "int8"))


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("M", [9, 16, 37, 44, 300])
@pytest.mark.parametrize("groups", [1, 3])
def test_int8_batched_kernels(bits, M, groups, path, gen):
    """The int8 path for batches where its blocking shows. The blocked kernel (shared_linear_int8_blocked.cpp,
    AVX-512 VNNI; 16 rows, 44 rows = 48 lanes with 4 padded, 300 rows = passes of 256 and 44): K chunks of 1024 and
    a partial last one (2600 values: 3 x 1024 padded at 1 bit, 2 x 1024 + 576 at 3 bits), output features not a
    multiple of its 8-row block, codebook groups straddling blocks. The row kernels (9 and 37 rows: groups of 4 x
    rows and a single one, weight rows two at a time and an odd one left; on AVX2 every M at 1 bit). The AVX2
    blocked kernel (shared_linear_int8_blocked_avx2.cpp, every M here from 2 bits): K chunks of 512 (5 x 512 + 64 at
    3 bits, the last one read past the row end as zeros), a 16-row block and a 5-row one, tiles of 6 x rows and the
    1-5 left, passes of 256 and 44 rows. A row of zeros and a row with an Inf (NaN outputs, as defined). Bit-exact against the
    definition."""
    out_f, in_f = 21, 2600
    packed, cb, _ = make_weight(out_f, in_f, bits, groups, gen)
    x = torch.randn(M, in_f, generator=gen) * 3
    x[1] = 0
    x[M - 2, 5] = float("inf")
    bias = torch.randn(out_f, generator=gen)
    got = on(path, ws.ops.shared_linear, x, packed, cb, bits, out_f, in_f, bias, "int8")
    want = reference.shared_linear(x, packed, cb, bits, out_f, in_f, bias, "int8")
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    assert got[M - 2].isnan().all() and got[:M - 2].isfinite().all()


@pytest.mark.parametrize("bits,k", [(1, 1), (1, 2), (2, 3), (3, 8), (4, 11), (4, 16), (5, 12), (5, 32), (6, 17), (7, 10),
                                    (7, 128), (8, 16), (8, 200)])
@pytest.mark.parametrize("M", [1, 5, 16])
def test_int8_per_row_codebooks_of_few_entries(bits, k, M, path, gen):
    """A codebook per output row, each with k <= 2**bits entries (the int8 tables are built per group on every call:
    one form for k <= 16 (the 7-bit affine grid), one for longer codebooks; tables shorter than 2**bits; at 5 bits
    the 64-entry biased table is the 32 entries twice). An all-zero codebook (scale 1), one with a NaN (its row's
    outputs NaN), one-signed ones (offset 0 and 127), a constant one, and entries of +-3e38 (whose range overflows
    float32). Bit-exact to the definition."""
    out_f, in_f = 40, 700
    packed, cb, _ = make_weight(out_f, in_f, bits, out_f, gen, k=k)
    cb[3] = 0.0  # an all-zero codebook: scale 1
    cb[5, k - 1] = float("nan")
    cb[7] = cb[7].abs()
    cb[9] = -cb[9].abs()
    cb[11] = -0.75
    cb[13, 0], cb[13, k - 1] = 3e38, -3e38
    x = torch.randn(M, in_f, generator=gen)
    got = on(path, ws.ops.shared_linear, x, packed, cb, bits, out_f, in_f, None, "int8")
    want = reference.shared_linear(x, packed, cb, bits, out_f, in_f, None, "int8")
    assert got[:, 5].isnan().all()
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


def _near_half_integers(amax: float, n: int, gen) -> torch.Tensor:
    """n float32 values v whose quotients v / (amax / 127) lie at, or one or two ulps from, half-integers (and the
    row's largest magnitude is amax): where a multiply by the reciprocal of the scale can round to the other
    integer than the division the definition uses."""
    scale = torch.tensor(amax, dtype=torch.float32) / 127
    half = torch.randint(-127, 127, (n,), generator=gen).float() + 0.5
    v = (half * scale).float()  # fl((k + 0.5) * scale): its quotient is k + 0.5 give or take an ulp
    for step in (1, 2):  # neighbours an ulp or two either side
        up, down = v.clone(), v.clone()
        for _ in range(step):
            up, down = torch.nextafter(up, torch.tensor(float("inf"))), torch.nextafter(down, torch.tensor(-1e30))
        pick = torch.randint(0, 3, (n,), generator=gen)
        v = torch.where(pick == 1, up, torch.where(pick == 2, down, v))
    v[0] = amax
    return v


@pytest.mark.parametrize("bits,per_row", [(4, False), (8, False), (8, True), (6, True)])
@pytest.mark.parametrize("M", [1, 5, 16])
def test_int8_quantization_near_half_integers(bits, per_row, M, path, gen):
    """Activations and codebook entries whose quotients by their scale sit at or next to half-integers (scales
    1/127 of 0.7, 3.3 and 1e-3: not powers of two, so the reciprocal is inexact). Bit-exact to the definition, which
    divides: a SIMD quantizer multiplying by the reciprocal instead fails 36 of these 48 cases (tried in session 16,
    with and without a guard that redoes the lanes near half-integers by division; the guarded form passed, but was
    no faster on the Intel VM, so the quantizers still divide)."""
    out_f, in_f = 16, 520
    packed, cb, _ = make_weight(out_f, in_f, bits, out_f if per_row else 1, gen)
    if per_row:  # codebooks of up to 256 entries quantized symmetrically, entry by entry
        cb = torch.stack([_near_half_integers(a, cb.shape[1], gen) for a in (0.7, 3.3, 1e-3, 0.7) * 4])
    x = torch.stack([_near_half_integers((0.7, 3.3, 1e-3)[m % 3], in_f, gen) for m in range(M)])
    got = on(path, ws.ops.shared_linear, x, packed, cb, bits, out_f, in_f, None, "int8")
    want = reference.shared_linear(x, packed, cb, bits, out_f, in_f, None, "int8")
    assert torch.equal(got, want)


LAYER_CODEBOOKS = {  # edge cases of a layer-wide codebook: the int8 grid's step and phase search takes them
    "gaussian": lambda k, g: torch.randn(1, k, generator=g) * 0.1,
    "zero": lambda k, g: torch.zeros(1, k),
    "positive": lambda k, g: torch.rand(1, k, generator=g) + 0.5,
    "negative": lambda k, g: -torch.rand(1, k, generator=g) * 1e-3,
    "constant": lambda k, g: torch.full((1, k), -0.75),
    "huge": lambda k, g: torch.linspace(-3e38, 3e38, k)[None],
    "subnormal": lambda k, g: torch.randn(1, k, generator=g) * 1e-39,
    "nan": lambda k, g: torch.cat([torch.randn(1, k - 1, generator=g), torch.tensor([[float("nan")]])], 1),
}


@pytest.mark.parametrize("bits,k", [(1, 2), (2, 3), (3, 8), (4, 16)])
@pytest.mark.parametrize("kind", list(LAYER_CODEBOOKS))
@pytest.mark.parametrize("M", [1, 5, 16])
def test_int8_layer_codebook_edge_cases(bits, k, kind, M, path, gen):
    """A layer-wide codebook of k <= 16 entries (the int8 path searches its grid's step and phase, weighed by the
    layer's index frequencies; codebooks per group do not) at its edge cases: all zero, one-signed (the grid need not
    hold 0), constant, +-3e38 (the range overflows float32), subnormal (tiny steps), a NaN entry (NaN outputs).
    Through the row kernels (M 1, 5) and the blocked ones (16). Bit-exact to the definition."""
    out_f, in_f = 24, 300
    packed, _, _ = make_weight(out_f, in_f, bits, 1, gen, k=k)
    cb = LAYER_CODEBOOKS[kind](k, gen)
    x = torch.randn(M, in_f, generator=gen)
    got = on(path, ws.ops.shared_linear, x, packed, cb, bits, out_f, in_f, None, "int8")
    want = reference.shared_linear(x, packed, cb, bits, out_f, in_f, None, "int8")
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    assert got.isnan().all() if kind == "nan" else got.isfinite().all() or kind == "huge"


def _weighted_residual_variance(c, q, s, w):
    """Per group, the weighted variance of the residuals c - s q: what the int8 path's error is, once the zero point
    takes their mean."""
    r = c.double() - q.double() * s.double()
    w = w.double()[None, :]
    mean = (w * r).sum(1, keepdim=True) / w.sum()
    return (w * (r - mean) ** 2).sum(1) / w.sum()


def test_int8_codebook_grid(gen):
    """reference.quantize_int8_codebook: for K <= 16 a 7-bit affine grid whose q + offset is an unsigned 7-bit table
    (what the AVX2 row kernel multiplies with vpmaddubsw) over [min(c, 0), max(c, 0)]; without weights its step is
    hi / 126 - lo / 126 and every residual within half a step (phase 0); with weights the step is one of
    hi / (126 - t) - lo / (126 - t), t < 8, every residual within a step, and their weighted variance no more than
    phase 0's on step 0 (up to the 1/32-step sub-grid); K > 16 is symmetric int8 with offset 128; a NaN or Inf entry
    gives a NaN scale, q 0 and offset 0."""
    cases = [torch.randn(5, 16, generator=gen), torch.randn(3, 4, generator=gen) * 1e-3,
             torch.rand(2, 16, generator=gen), -torch.rand(2, 8, generator=gen), torch.zeros(1, 16),
             torch.tensor([[3e38, -3e38, 1.0]]), torch.full((1, 16), -0.75), torch.tensor([[1e-40, -3e-41]])]
    for c in cases:
        K = c.shape[1]
        w = torch.randint(0, 4000, (K,), generator=gen)
        lo, hi = c.amin(1, keepdim=True).clamp(max=0), c.amax(1, keepdim=True).clamp(min=0)
        steps = torch.cat([hi / (126 - t) - lo / (126 - t) for t in range(8)], 1)
        steps = torch.where(steps > 0, steps, torch.ones_like(steps))
        for weights in (None, w):
            q, s, o = reference.quantize_int8_codebook(c, weights)
            assert q.shape == c.shape and s.shape == o.shape == (c.shape[0], 1)
            assert ((o >= 0) & (o <= 127)).all() and ((q + o >= 0) & (q + o <= 127)).all(), c
            if weights is None:
                assert torch.equal(s, steps[:, :1])
            else:
                assert (s == steps).any(1).all(), c
            assert torch.equal(o, -q.amin(1, keepdim=True).clamp(max=0))  # the clamps do not bind
            if (steps > 1e-37).all():  # normal scales: up to the scale's rounding (126 x 2**-24 of the step)
                bound = 0.5 + 1 / 64 if weights is None else 1 + 1 / 64
                assert ((c.double() - q.double() * s.double()).abs() <= s.double() * bound * (1 + 1e-5)).all(), c
        if (steps > 1e-37).all():
            q0, s0, _ = reference.quantize_int8_codebook(c)
            q1, s1, _ = reference.quantize_int8_codebook(c, w)
            slack = s0[:, 0].double() ** 2 / 16
            searched, plain = _weighted_residual_variance(c, q1, s1, w), _weighted_residual_variance(c, q0, s0, w)
            assert (searched <= plain + slack).all()
    # entries between grid points (fractions 0.40-0.55 of a step): phase 0 on step 0 leaves residuals half a step
    # apart, the search puts grid points beside every entry
    n = torch.tensor([-60.0, -3.0, 2.0, 66.0])
    c = ((n + torch.tensor([0.40, 0.45, 0.50, 0.55])) * 0.01)[None]
    w = torch.tensor([3000, 5000, 5000, 3384])
    q0, s0, _ = reference.quantize_int8_codebook(c)
    q1, s1, _ = reference.quantize_int8_codebook(c, w)
    assert _weighted_residual_variance(c, q0, s0, w).item() > (0.2 * 0.01) ** 2
    assert _weighted_residual_variance(c, q1, s1, w).item() < (0.06 * 0.01) ** 2
    c = torch.randn(3, 17, generator=gen)
    q, s, o = reference.quantize_int8_codebook(c, torch.ones(17, dtype=torch.long))
    qs, ss = reference.quantize_int8_symmetric(c, dim=1)
    assert torch.equal(q, qs) and torch.equal(s, ss) and (o == 128).all()
    for bad in (float("nan"), float("inf")):
        for weights in (None, torch.ones(3, dtype=torch.long)):
            q, s, o = reference.quantize_int8_codebook(torch.tensor([[0.5, bad, -1.0]]), weights)
            assert torch.isnan(s).all() and (q == 0).all() and (o == 0).all()


@pytest.mark.parametrize("in_f", [65536, 66000])
@pytest.mark.parametrize("bits", [1, 3, 4])
def test_int8_longest_rows_stay_exact(in_f, bits, simd, gen):
    """The blocked int8 kernels sum in int32 lanes, exact while K <= 65536 (127 x 127 x 65536 < 2**31); longer rows go
    to the row kernels, which fold into int64 (at 1 bit the AVX2 row kernel, which takes every batch there, also sums
    pairs in int16 lanes within a step). Every product at its largest (x and the codebook constant up to sign, so
    every quantized value is +-127) puts the sums at that bound. Bit-exact against the definition, at a batch the blocked
    kernels take."""
    out_f, M = 3, 16
    idx = torch.randint(0, 1 << bits, (out_f, in_f), generator=gen, dtype=torch.uint8)
    cb = torch.full((1, 1 << bits), -0.75)
    if bits == 1:
        cb[0, 1] = 0.75  # 1 bit sums q[1] - q[0] times the x values under the 1 bits: at its largest
        idx[0] = 1
    packed = ws.ops.pack(idx, bits)
    x = torch.full((M, in_f), 2.5)
    x[1] = -x[1]
    x[2] = torch.randn(in_f, generator=gen)
    got = ws.ops.shared_linear(x, packed, cb, bits, out_f, in_f, None, "int8")
    want = reference.shared_linear(x, packed, cb, bits, out_f, in_f, None, "int8")
    assert torch.equal(got, want)
    assert got[0, 0].item() == pytest.approx(cb[0, -1].item() * 2.5 * in_f, rel=1e-6)


def test_int8_error_is_small(gen):
    packed, cb, _ = make_weight(256, 1024, 4, 1, gen)
    x = torch.randn(3, 1024, generator=gen)
    exact = ws.ops.shared_linear(x, packed, cb, 4, 256, 1024)
    approx = ws.ops.shared_linear(x, packed, cb, 4, 256, 1024, None, "int8")
    assert (approx - exact).norm() / exact.norm() < 0.02


def _kmeans_like_layer(out_f, in_f, bits, seed):
    """Gaussian weights shared through a sorted quantile codebook and nearest-entry indices: clusters of unequal
    sizes, like k-means ones (their int8 rounding residuals weigh unequally)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.02 + 0.003 * (seed % 2)
    k = 1 << bits
    cb = torch.quantile(w.flatten()[: 1 << 16], torch.linspace(0.5 / k, 1 - 0.5 / k, k))[None]
    cb = cb + 0.0004 * torch.randn(1, k, generator=g)
    cb = cb.sort(1).values
    idx = torch.bucketize(w, (cb[0, 1:] + cb[0, :-1]) / 2).to(torch.uint8)
    return ws.ops.pack(idx, bits), cb, g


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_int8_error_on_one_signed_inputs_stays_within_torchs(bits, act, device):
    """The issue's accuracy bound (int8 output error at most 1.25x that of torch's int8 dynamic Linear on the same
    weight), with the activations real layers see after ReLU or GELU (mean far from 0), on several codebooks.
    Without the zero points (reference.int8_zero_points) the codebook's int8 rounding residuals add up coherently
    against such inputs: 13 of these 48 draws were above 1.25x, up to 4.0x; with them the worst is 0.97x."""
    out_f = in_f = 1024
    worst = 0.0
    for seed in range(6):
        packed, cb, g = _kmeans_like_layer(out_f, in_f, bits, seed)
        x = torch.randn(4, in_f, generator=g)
        x = torch.relu(x) if act == "relu" else F.gelu(x)
        w = ws.ops.dequantize(packed, cb, bits, (out_f, in_f))
        exact = x.double() @ w.double().T
        lin = torch.nn.Linear(in_f, out_f, bias=False)
        lin.weight.data = w
        with warnings.catch_warnings():  # torch.ao.quantization's deprecation notices
            warnings.simplefilter("ignore")
            q = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8)
        ours = ws.ops.shared_linear(x.to(device), packed.to(device), cb.to(device), bits, out_f, in_f, None,
                                    "int8").cpu().double()
        worst = max(worst, ((ours - exact).norm() / (q(x).double() - exact).norm()).item())
    assert worst <= 1.25


@pytest.mark.parametrize("bits", [1, 3, 4, 8])
def test_int8_zero_points_are_the_weighted_mean_residual(bits, device, gen):
    """reference.int8_zero_points against its plain formula (a small layer: every row is in the sample), and its
    edge cases: no counted index (all >= K) gives 0, a NaN codebook NaN; the kernels agree bit for bit."""
    def op(*args):
        return ws.ops.shared_linear(*[a.to(device) if isinstance(a, torch.Tensor) else a for a in args]).cpu()

    out_f, in_f, k = 12, 50, max(2, (1 << bits) - 1)
    packed, cb, idx = make_weight(out_f, in_f, bits, 3, gen, k=k)
    weights = reference.int8_index_weights(packed, bits, k, out_f, in_f)
    cq, sw, _ = reference.quantize_int8_codebook(cb, weights)
    z = reference.int8_zero_points(packed, cb, cq, sw, bits, out_f, in_f)
    rows, cols = reference.int8_sample_rows(out_f, in_f)
    assert rows == list(range(out_f)) and cols == in_f
    counts = torch.bincount(idx.flatten().long(), minlength=k).double()
    want = ((cb.double() - cq.double() * sw.double()) * counts).sum(1) / counts.sum()
    # the definition's precision: frequencies as weights of 2**-14, residuals on a grid of 2**-15 of the scale
    torch.testing.assert_close(z.double(), want, rtol=0, atol=float(sw.max()) * (k * 2.0 ** -16 + 2.0 ** -14))
    assert (z.abs() <= sw[:, 0] * 1.02).all()  # a mean of residuals of at most a step (the grid's phase)

    x = torch.randn(3, in_f, generator=gen)
    # tiny and huge codebooks too: scales down to subnormal floats and up to 1e35, where the grid's power of two
    # leaves float32's range
    for codebook in (cb, torch.full_like(cb, float("nan")), cb * 1e-30, cb * 1e-36, cb * 1e38):
        got = op(x, packed, codebook, bits, out_f, in_f, None, "int8")
        torch.testing.assert_close(got, reference.shared_linear(x, packed, codebook, bits, out_f, in_f, None, "int8"),
                                   rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(reference.int8_zero_points(packed, cb * float("nan"), cq, sw * float("nan"), bits, out_f,
                                                  in_f)).all()
    if bits > 1:  # every index >= K = 1: nothing is counted, z = 0, and the int8 weights are 0
        one = torch.full((out_f, in_f), k - 1, dtype=torch.uint8)
        p1, c1 = ws.ops.pack(one, bits), cb[:, :1].contiguous()
        q1, s1, _ = reference.quantize_int8_codebook(c1)
        assert torch.equal(reference.int8_zero_points(p1, c1, q1, s1, bits, out_f, in_f), torch.zeros(3))
        got = op(x, p1, c1, bits, out_f, in_f, None, "int8")
        assert torch.equal(got, reference.shared_linear(x, p1, c1, bits, out_f, in_f, None, "int8"))


def test_int8_zero_rows_and_fewer_entries(path, gen):
    packed, _, _ = make_weight(8, 64, 2, 1, gen, k=3)
    cb = torch.tensor([[-0.5, 0.0, 0.25]])
    x = torch.zeros(2, 64)
    x[1] = torch.randn(64, generator=gen)
    got = on(path, ws.ops.shared_linear, x, packed, cb, 2, 8, 64, None, "int8")
    assert torch.equal(got, reference.shared_linear(x, packed, cb, 2, 8, 64, None, "int8"))
    assert torch.equal(got[0], torch.zeros(8))


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


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a GPU and the CUDA kernels")
def test_cuda_mma_gemv_takes_the_calls_it_should(monkeypatch, gen):
    """gemv_mma_takes on sm_80+: the tensor-core GEMV runs 16-bit calls of 2 to 16 rows by default, 1 to 64 rows
    under WS_CUDA_GEMV=mma, none under WS_CUDA_GEMV=off; were it to fall back to another kernel, the "mma" cases
    of the tests here would still pass without running it. The profiler's kernel names say which ran."""
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("the tensor-core GEMV needs sm_80 or newer")
    from torch.profiler import ProfilerActivity, profile

    packed, cb, _ = make_weight(64, 256, 4, 1, gen)

    def ran_mma(M):
        x = torch.randn(M, 256, generator=gen).half().cuda()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            ws.ops.shared_linear(x, packed.cuda(), cb.cuda(), 4, 64, 256)
            torch.cuda.synchronize()
        names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        if not names:
            pytest.skip("the profiler recorded no CUDA kernels (no CUPTI)")
        return any("gemv_mma_kernel" in n for n in names)

    assert [ran_mma(M) for M in (1, 2, 16, 17)] == [False, True, True, False]
    monkeypatch.setenv("WS_CUDA_GEMV", "mma")
    assert [ran_mma(M) for M in (1, 64, 65)] == [True, True, False]
    monkeypatch.setenv("WS_CUDA_GEMV", "off")
    assert not ran_mma(16)


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a GPU and the CUDA kernels")
@pytest.mark.parametrize("gemv", ["default", "mma", "panels", "tiles"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("M", [1, 5, 16, 17, 40])
@pytest.mark.parametrize("groups", ["one", "per_row", "three"])
def test_cuda_16bit_few_rows(gemv, dtype, bits, M, groups, monkeypatch, gen):
    # The CUDA GEMV paths for fp16/bf16 x (WS_CUDA_GEMV=mma: the tensor-core kernel, shared_linear_gemv_mma.cu)
    # against fp32 products with the weight rounded to x's dtype: a whole 256-index span plus a partial one (in_f
    # 300), output rows not a multiple of 16, one / three / per-row codebooks, bias, x rows of M that span 1-3 blocks.
    # default: the SIMT GEMV at 1 row, the tensor-core GEMV for 2-16, the panels above; mma: the tensor-core GEMV
    # for all; panels / tiles: the SIMT GEMV up to 8 rows, decoded panels + cuBLAS / the tile kernel above
    if gemv == "mma":
        monkeypatch.setenv("WS_CUDA_GEMV", "mma")
    if gemv in ("panels", "tiles"):
        monkeypatch.setenv("WS_CUDA_GEMV", "off")
    if gemv == "tiles":
        monkeypatch.setenv("WS_CUDA_LINEAR", "tiles")
    out_f, in_f = 48 if groups == "three" else 37, 300
    g = {"one": 1, "per_row": out_f, "three": 3}[groups]
    packed, cb, _ = make_weight(out_f, in_f, bits, g, gen)
    x = torch.randn(M, in_f, generator=gen).to(dtype)
    bias = torch.randn(out_f, generator=gen)
    if groups == "three":  # an fp16/bf16 model's layer: codebook and bias in x's dtype, which the kernels read as such
        cb, bias = cb.to(dtype), bias.to(dtype)
    y = ws.ops.shared_linear(x.cuda(), packed.cuda(), cb.cuda(), bits, out_f, in_f, bias.cuda()).cpu()
    w = ws.ops.dequantize(packed, cb, bits, (out_f, in_f)).to(dtype).float()
    want = F.linear(x.float(), w, bias.float())
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), want, rtol=TOL[dtype][0], atol=TOL[dtype][1])


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


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a GPU and the CUDA kernels")
def test_cuda_tiles_past_65535_along_the_output_features(gen):
    """A layer of more than 65535 x 64 output features: the tile kernels enumerate their (x, y) tiles along grid.x
    (gridDim.y stops at 65535), so the int8 forward of 17 rows and the codebook gradient run and agree with the CPU
    op (itself tested against the reference)."""
    out_f, in_f, M = 65536 * 64 + 64, 8, 17
    packed, cb, _ = make_weight(out_f, in_f, 4, 1, gen)
    x = torch.randn(M, in_f, generator=gen)
    y = ws.ops.shared_linear(x.cuda(), packed.cuda(), cb.cuda(), 4, out_f, in_f, None, "int8")
    assert torch.equal(y.cpu(), ws.ops.shared_linear(x, packed, cb, 4, out_f, in_f, None, "int8"))
    g = torch.randn(M, out_f, generator=gen)
    _, gc = torch.ops.weightshare.shared_linear_backward(g.cuda(), x.cuda(), packed.cuda(), cb.cuda(), 4, out_f,
                                                         in_f, False, True)
    _, want = torch.ops.weightshare.shared_linear_backward(g, x, packed, cb, 4, out_f, in_f, False, True)
    # sums of 2 million terms each, in a different order (float atomics): compared as a whole
    assert float((gc.cpu() - want).norm() / want.norm()) < 1e-5


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a GPU and the CUDA kernels")
@pytest.mark.parametrize("gemv", ["default", "mma"])
def test_cuda_16bit_unaligned_x_and_bad_indices(gemv, monkeypatch, gen):
    # x rows that are not 8-byte aligned (a column slice made contiguous at an odd offset) take the element loads;
    # indices >= K give NaN outputs exactly in the rows that use them, finite ones elsewhere
    if gemv == "mma":
        monkeypatch.setenv("WS_CUDA_GEMV", "mma")
    out_f, in_f, bits = 24, 131, 4
    idx = torch.randint(0, 10, (out_f, in_f), generator=gen, dtype=torch.uint8)
    idx[5, 7] = 12  # K = 10: no entry
    packed, cb = ws.ops.pack(idx, bits), torch.randn(1, 10, generator=gen) * 0.1
    buf = torch.randn(3 * in_f + 1, generator=gen).half().cuda()
    x = buf[1:].view(3, in_f)  # storage offset 1 element: rows start 2 bytes past an 8-byte boundary
    assert x.is_contiguous() and x.data_ptr() % 8 != 0
    y = ws.ops.shared_linear(x, packed.cuda(), cb.cuda(), bits, out_f, in_f).float().cpu()
    assert torch.isnan(y[:, 5]).all() and not torch.isnan(y[:, [i for i in range(out_f) if i != 5]]).any()
    w = cb[0, idx.clamp(max=9).long()].half().float()
    keep = [i for i in range(out_f) if i != 5]
    want = F.linear(x.float().cpu(), w)
    torch.testing.assert_close(y[:, keep], want[:, keep], rtol=2e-2, atol=2e-2)


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a GPU and the CUDA kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_many_rows_in_several_panels(dtype, gen):
    # a weight larger than half the L2 of any current GPU, so the panel path decodes it in several panels (the last
    # one partial), with per-row codebooks and a bias; fp32 x is compared at fp32 precision (no TF32 by default)
    out_f, in_f, bits = 5000, 4096, 3
    packed, cb, _ = make_weight(out_f, in_f, bits, out_f, gen)
    x = torch.randn(33, in_f, generator=gen).to(dtype).cuda()
    bias = torch.randn(out_f, generator=gen).cuda()
    y = ws.ops.shared_linear(x, packed.cuda(), cb.cuda(), bits, out_f, in_f, bias)
    w = ws.ops.dequantize(packed.cuda(), cb.cuda(), bits, (out_f, in_f)).to(dtype).float()
    want = F.linear(x.float(), w, bias)
    tol = (1e-5, 1e-4) if dtype == torch.float32 else TOL[dtype]
    torch.testing.assert_close(y.float(), want, rtol=tol[0], atol=tol[1])


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a GPU and the CUDA kernels")
@pytest.mark.parametrize("kernel", ["fused", "wgmma"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("M", [1, 17, 40, 64, 65, 200])
@pytest.mark.parametrize("shape", [(300, 128), (300, 256), (40, 4096), (512, 384)])
def test_cuda_fused_gemm(kernel, dtype, bits, M, shape, monkeypatch, gen):
    """The fused tensor-core GEMMs (WS_CUDA_LINEAR=fused: mma.sync, shared_linear_gemm_mma.cu; =wgmma: its sm_90a
    form, shared_linear_gemm_wgmma.cu) against fp32 products with the weight rounded to x's dtype:
    output rows that end inside a block (300, 40), one 128-index unit (a pipeline that ends where it starts), a
    layer of 40 rows and 32 units that splits K over many blocks,
    two codebooks of 256 rows (512 x 384: one per block at every width), rows of x that fill 1 to 4 of its 8-row
    tile groups (1 or 2 wgmma blocks), with bias; test_cuda_fused_gemm_takes_the_calls_it_should proves they ran
    (a call they do not take falls back to another path, also correct)."""
    monkeypatch.setenv("WS_CUDA_LINEAR", kernel)
    out_f, in_f = shape
    groups = 2 if out_f == 512 else 1
    packed, cb, _ = make_weight(out_f, in_f, bits, groups, gen)
    x = torch.randn(M, in_f, generator=gen).to(dtype)
    bias = torch.randn(out_f, generator=gen)
    y = ws.ops.shared_linear(x.cuda(), packed.cuda(), cb.cuda(), bits, out_f, in_f, bias.cuda()).cpu()
    w = ws.ops.dequantize(packed, cb, bits, (out_f, in_f)).to(dtype).float()
    want = F.linear(x.float(), w, bias)
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), want, rtol=TOL[dtype][0], atol=TOL[dtype][1])


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a GPU and the CUDA kernels")
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("M", [17, 200])
@pytest.mark.parametrize("shape", [(300, 128), (300, 256), (40, 4096), (512, 384)])
def test_cuda_wgmma_gemm_draining_form(bits, M, shape, monkeypatch, gen):
    """The wgmma kernel's first form (WS_CUDA_WGMMA_DRAIN=1: every unit ends with wait_group 0), kept beside the
    default one (groups in flight across units) to compare their speed; both must be right."""
    monkeypatch.setenv("WS_CUDA_LINEAR", "wgmma")
    monkeypatch.setenv("WS_CUDA_WGMMA_DRAIN", "1")
    out_f, in_f = shape
    packed, cb, _ = make_weight(out_f, in_f, bits, 2 if out_f == 512 else 1, gen)
    x = torch.randn(M, in_f, generator=gen).half()
    y = ws.ops.shared_linear(x.cuda(), packed.cuda(), cb.cuda(), bits, out_f, in_f).cpu()
    w = ws.ops.dequantize(packed, cb, bits, (out_f, in_f)).half().float()
    torch.testing.assert_close(y.float(), F.linear(x.float(), w), rtol=TOL[torch.float16][0],
                               atol=TOL[torch.float16][1])


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a GPU and the CUDA kernels")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("M", [17, 130])
@pytest.mark.parametrize("shape", [(300, 256), (40, 4096)])
def test_cuda_fused_gemm_per_row_codebooks(dtype, bits, M, shape, monkeypatch, gen):
    """The mma.sync fused GEMM with a codebook per output row (its per-row tables, 2-byte lookups; 5 bits has none
    and falls back to the panels), in x's dtype as an fp16/bf16 model holds it, with bias, split-K included."""
    monkeypatch.setenv("WS_CUDA_LINEAR", "fused")
    out_f, in_f = shape
    packed, cb, _ = make_weight(out_f, in_f, bits, out_f, gen)
    cb = cb.to(dtype)
    x = torch.randn(M, in_f, generator=gen).to(dtype)
    bias = torch.randn(out_f, generator=gen)
    y = ws.ops.shared_linear(x.cuda(), packed.cuda(), cb.cuda(), bits, out_f, in_f, bias.cuda()).cpu()
    w = ws.ops.dequantize(packed, cb, bits, (out_f, in_f)).float()
    torch.testing.assert_close(y.float(), F.linear(x.float(), w, bias), rtol=TOL[dtype][0], atol=TOL[dtype][1])


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a GPU and the CUDA kernels")
@pytest.mark.parametrize("kernel", ["fused", "wgmma"])
def test_cuda_fused_gemm_bad_indices_and_3d_x(kernel, monkeypatch, gen):
    # indices >= K decode to NaN exactly in the output columns of the rows that hold them; x of shape [2, 33, in_f]
    monkeypatch.setenv("WS_CUDA_LINEAR", kernel)
    out_f, in_f, bits = 70, 256, 4
    idx = torch.randint(0, 10, (out_f, in_f), generator=gen, dtype=torch.uint8)
    idx[5, 200] = 12  # K = 10: no entry
    packed, cb = ws.ops.pack(idx, bits), torch.randn(1, 10, generator=gen) * 0.1
    x = torch.randn(2, 33, in_f, generator=gen).half()
    y = ws.ops.shared_linear(x.cuda(), packed.cuda(), cb.cuda(), bits, out_f, in_f).float().cpu()
    keep = [i for i in range(out_f) if i != 5]
    assert torch.isnan(y[..., 5]).all() and not torch.isnan(y[..., keep]).any()
    want = F.linear(x.float(), cb[0, idx.clamp(max=9).long()].half().float())
    torch.testing.assert_close(y[..., keep], want[..., keep], rtol=2e-2, atol=2e-2)


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a GPU and the CUDA kernels")
def test_cuda_fused_gemm_takes_the_calls_it_should(monkeypatch, gen):
    """gemm_mma_takes on sm_80+ / gemm_wgmma_takes on compute capability 9.0: only when asked (WS_CUDA_LINEAR=fused
    / wgmma), and then only where their shape rules allow: in_features a multiple of 128, one codebook per block of
    output rows, 16-bit x. Otherwise the call falls back to the other paths (whose results the
    tests above check), which the fused tests could not tell apart from them; the profiler's kernel names can."""
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("the fused GEMM needs sm_80 or newer")
    from torch.profiler import ProfilerActivity, profile

    def ran(kernel="gemm_mma_kernel", in_f=256, groups=1, dtype=torch.float16, M=40, bits=4):
        packed, cb, _ = make_weight(64, in_f, bits, groups, gen)
        x = torch.randn(M, in_f, generator=gen).to(dtype).cuda()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            ws.ops.shared_linear(x, packed.cuda(), cb.cuda(), bits, 64, in_f)
            torch.cuda.synchronize()
        names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        if not names:
            pytest.skip("the profiler recorded no CUDA kernels (no CUPTI)")
        return any(kernel in n for n in names)

    assert not ran()  # by default: kFusedDefaultFirstM, until a GPU run has measured them
    monkeypatch.setenv("WS_CUDA_LINEAR", "panels")
    assert not ran() and not ran("gemm_wgmma_kernel", M=200)
    monkeypatch.setenv("WS_CUDA_LINEAR", "fused")
    assert ran() and ran(M=1) and ran(dtype=torch.bfloat16) and ran(bits=8)
    assert ran(groups=64) and ran(groups=64, bits=8)  # per-row tables at 2, 3, 4, 8 bits
    assert not ran(in_f=300) and not ran(groups=64, bits=5) and not ran(dtype=torch.float32)
    # the wgmma form: sm_90a code, so compute capability 9.0 and a build for "9.0a" (setup.py's default)
    monkeypatch.setenv("WS_CUDA_LINEAR", "wgmma")
    if torch.cuda.get_device_capability() != (9, 0):
        assert not ran("gemm_wgmma_kernel")
        return
    if not ran("gemm_wgmma_kernel"):
        pytest.skip("this build has no sm_90a code (TORCH_CUDA_ARCH_LIST without 9.0a)")
    assert ran("gemm_wgmma_kernel", M=200) and ran("gemm_wgmma_kernel", dtype=torch.bfloat16)
    assert ran("gemm_wgmma_kernel", bits=8) and not ran("gemm_wgmma_kernel", in_f=300)
    assert not ran("gemm_wgmma_kernel", groups=64)  # one codebook per block only
    assert not ran("gemm_mma_kernel")  # and nothing else takes a call it takes
