"""shared_linear with activation="int8": bit-exact to its Python definition on every path (row kernels, blocked
kernels, AVX-512 / AVX2 / scalar), its codebook grid and zero points, and its error against torch's int8 dynamic
Linear."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import weightshare as ws
from weightshare import reference

from conftest import on, requires_native
from test_shared_linear import make_weight

pytestmark = requires_native


@pytest.mark.parametrize("bits", range(1, 9))
# M 3-8 and 11: the row kernels' x-row groupings (AVX-512: 4s, up to 8 at widths that are not byte aligned; on
# AVX2 4s, at 2 and 4 bits 2s and a 3)
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 6, 7, 8, 11])
@pytest.mark.parametrize("per_row", [False, True])
def test_int8_is_bit_exact_to_its_definition(bits, M, per_row, path, gen):
    out_f, in_f = 21, 300  # 21 rows: the batch-1 kernels finish rows 16 (AVX-512) or 8 (AVX2) at a time, and a rest
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
    out_f, in_f = 21, 300  # 21 rows: the batch-1 kernels finish rows 16 (AVX-512) or 8 (AVX2) at a time, and a rest
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


@pytest.mark.parametrize("in_f", [65536, 65793, 65794, 66000])
def test_int8_batch_one_sums_at_their_largest(in_f, simd):
    """At batch 1 the AVX-512 row kernel reduces 16 rows' lane sums together in int32 where a biased sum cannot
    overflow (in_features <= (2**31 - 1) // (255 * 128) = 65793), in 64 bits above. Every product at its largest:
    the codebook constant +0.75 (q = 127, biased 255) against x constant (127). Bit-exact against the definition, on
    both sides of the bound, with rows that are not a multiple of 16."""
    out_f, bits = 19, 2
    packed = ws.ops.pack(torch.zeros(out_f, in_f, dtype=torch.uint8), bits)
    cb = torch.full((1, 1 << bits), 0.75)
    x = torch.full((1, in_f), 2.5)
    got = ws.ops.shared_linear(x, packed, cb, bits, out_f, in_f, None, "int8")
    assert torch.equal(got, reference.shared_linear(x, packed, cb, bits, out_f, in_f, None, "int8"))
    assert got[0, 0].item() == pytest.approx(0.75 * 2.5 * in_f, rel=1e-6)


@pytest.mark.parametrize("groups", [1, 4])
def test_int8_codebook_cache_is_never_stale(groups, path, gen):
    """Each thread keeps the quantized codebooks of its recent layers (shared_linear_int8_quantize.cpp) and serves
    one only where the codebook and the packed bytes its index histogram samples compare equal. Codebooks and
    indices changed in place (through .data too, which leaves the version counter alone), more layers of one shape
    than the cache holds (64), visited twice, and other threads: every call bit-exact against the definition."""
    out_f, in_f, bits = 40, 300, 4
    x = torch.randn(1, in_f, generator=gen)

    def check(packed, cb):
        got = on(path, ws.ops.shared_linear, x, packed, cb, bits, out_f, in_f, None, "int8")
        assert torch.equal(got, reference.shared_linear(x, packed, cb, bits, out_f, in_f, None, "int8"))
        return got

    packed, cb, _ = make_weight(out_f, in_f, bits, groups, gen)
    first = check(packed, cb)
    cb.data.mul_(1.7)
    assert not torch.equal(check(packed, cb), first)
    with torch.no_grad():
        cb[0, 3] = 0.5
    check(packed, cb)
    packed.data.copy_(make_weight(out_f, in_f, bits, groups, gen)[0])
    check(packed, cb)
    packed.data[0, 0] ^= 0x0F  # one index of a sampled row
    check(packed, cb)
    layers = [make_weight(out_f, in_f, bits, groups, gen)[:2] for _ in range(70)]
    for _ in range(2):
        for p, c in layers:
            check(p, c)
    if path == "cpu":
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(3) as pool:
            list(pool.map(lambda pc: check(*pc), layers[:12] * 2))


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
