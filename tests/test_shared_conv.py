"""shared_conv2d against F.conv2d with the dequantised weight: groups, depthwise, dilation, panels, autograd (the CUDA
conv kernels one by one: test_shared_conv_cuda.py)."""
import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import weightshare as ws

from conftest import DEVICES, FLOAT_DTYPES, requires_native

pytestmark = requires_native

CONVS = [  # (out, in, k, groups, stride, padding, dilation)
    (16, 8, 3, 1, 1, 1, 1),      # plain 3x3
    (32, 32, 3, 32, 2, 1, 1),    # depthwise, strided
    (64, 16, 1, 4, 1, 0, 1),     # grouped 1x1
    (10, 6, 5, 2, 1, 2, 2),      # dilated, grouped
    (8, 3, 3, 1, 2, 0, 1),       # no padding
]


def make(out, cin, k, groups, bits, per_channel, gen):
    n = cin // groups * k * k
    idx = torch.randint(0, 1 << bits, (out, n), generator=gen, dtype=torch.uint8)
    cb = torch.randn(out if per_channel else 1, 1 << bits, generator=gen) * 0.2
    packed = ws.ops.pack(idx, bits)
    shape = [out, cin // groups, k, k]
    return packed, cb, shape, ws.ops.dequantize(packed, cb, bits, shape)


@pytest.mark.parametrize("conv", CONVS)
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("per_channel", [False, True])
def test_matches_dense_conv(conv, bits, per_channel, device, gen):
    out, cin, k, g, s, p, d = conv
    packed, cb, shape, w = make(out, cin, k, g, bits, per_channel, gen)
    x = torch.randn(2, cin, 15, 13, generator=gen)
    b = torch.randn(out, generator=gen)
    y = ws.ops.shared_conv2d(x.to(device), packed.to(device), cb.to(device), bits, shape, b.to(device), s, p, d, g)
    torch.testing.assert_close(y.cpu(), F.conv2d(x, w, b, s, p, d, g), rtol=1e-4, atol=1e-4)


DEPTHWISE = [  # (channels, multiplier, kh, kw, stride, padding, dilation, H, W): the direct CPU kernel's cases
    (8, 1, 3, 3, (1, 1), (1, 1), (1, 1), 15, 13),
    (8, 2, 3, 3, (1, 1), (0, 0), (1, 1), 9, 11),     # channel multiplier 2, no padding
    (4, 1, 5, 3, (2, 1), (2, 1), (1, 2), 12, 7),     # non-square kernel, mixed stride and dilation
    (6, 1, 3, 3, (3, 3), (4, 4), (2, 2), 10, 10),    # padding larger than the kernel reach
    (5, 3, 7, 7, (1, 2), (3, 0), (1, 1), 8, 20),
    (3, 1, 1, 1, (1, 1), (0, 0), (1, 1), 4, 4),      # 1x1 depthwise
    (4, 1, 3, 3, (1, 1), (0, 0), (1, 1), 3, 3),      # one output pixel
    # 3x3 with channels not a multiple of the vector width: the channels-last interior kernel's masked / scalar tails
    (20, 1, 3, 3, (1, 1), (1, 1), (1, 1), 9, 14),
    (19, 1, 3, 3, (2, 2), (1, 1), (1, 1), 11, 12),
    (37, 1, 3, 3, (1, 2), (2, 2), (2, 1), 10, 17),
    (16, 1, 3, 3, (1, 1), (0, 0), (1, 1), 6, 9),     # no padding: every pixel interior
    (24, 1, 3, 3, (1, 1), (1, 1), (3, 3), 5, 6),     # dilation reaching past the input: no interior pixel
    # 3x3 stride 1 (the AVX2 zero-bordered kernel): row tails of 4, 3 and 2 columns, padding on one axis only
    (4, 1, 3, 3, (1, 1), (1, 1), (1, 1), 5, 12),
    (4, 1, 3, 3, (1, 1), (1, 0), (1, 1), 6, 13),
    (4, 1, 3, 3, (1, 1), (0, 1), (1, 1), 7, 10),
]


@pytest.mark.parametrize("case", DEPTHWISE)
@pytest.mark.parametrize("batched,with_bias", [(True, True), (True, False), (False, True)])
def test_depthwise_direct_kernel(case, batched, with_bias, simd, gen):
    c, mult, kh, kw, s, p, d, h, w_ = case
    idx = torch.randint(0, 16, (c * mult, kh * kw), generator=gen, dtype=torch.uint8)
    cb = torch.randn(1, 16, generator=gen)
    packed, shape = ws.ops.pack(idx, 4), [c * mult, 1, kh, kw]
    w = ws.ops.dequantize(packed, cb, 4, shape)
    x = torch.randn(*((3,) if batched else ()), c, h, w_, generator=gen)
    b = torch.randn(c * mult, generator=gen) if with_bias else None
    y = ws.ops.shared_conv2d(x, packed, cb, 4, shape, b, s, p, d, c)
    torch.testing.assert_close(y, F.conv2d(x, w, b, s, p, d, c), rtol=1e-5, atol=1e-5)
    # channels-last input: the NHWC kernel (multiplier 1) or the general path; same values, and the output is
    # channels-last as F.conv2d's is
    if batched:
        x_cl = x.to(memory_format=torch.channels_last)
        y_cl = ws.ops.shared_conv2d(x_cl, packed, cb, 4, shape, b, s, p, d, c)
        torch.testing.assert_close(y_cl, y, rtol=1e-5, atol=1e-5)
        ref_cl = F.conv2d(x_cl, w, b, s, p, d, c)
        assert y_cl.is_contiguous(memory_format=torch.channels_last) == ref_cl.is_contiguous(
            memory_format=torch.channels_last)


DIRECT = [  # (out, in, kh, kw, padding, dilation, N, H, W): the direct (indirect-GEMM) CPU kernel's cases
    (64, 64, 3, 3, (1, 1), (1, 1), 1, 20, 22),     # the ResNet layer's geometry, small image
    (19, 5, 3, 3, (1, 1), (1, 1), 2, 15, 13),      # output channels not a multiple of the register block
    (8, 3, 7, 7, (3, 3), (1, 1), 1, 23, 21),       # a stem
    (12, 16, 1, 1, (0, 0), (1, 1), 3, 9, 11),      # 1x1, read in place (no padding copy)
    (6, 4, 3, 2, (0, 0), (2, 3), 2, 17, 19),       # no padding, dilated, non-square: wide rows read in place
    (5, 7, 1, 3, (0, 2), (1, 1), 1, 1, 30),        # one input row
    (33, 9, 5, 5, (4, 1), (2, 1), 2, 6, 40),       # padding on one axis only, wide image
    (4, 4, 3, 3, (1, 1), (1, 1), 1, 1, 1),         # one pixel
]


@pytest.mark.parametrize("case", DIRECT)
@pytest.mark.parametrize("batched,with_bias", [(True, True), (True, False), (False, True)])
def test_direct_conv_kernel(case, batched, with_bias, simd, monkeypatch, gen):
    """The dense unit-stride NCHW path of shared_conv2d (csrc/cpu/direct_conv.cpp), forced on where its speed test
    would decline, against F.conv2d; and the same values with the kernel forced off."""
    oc, c, kh, kw, p, d, n, h, w_ = case
    idx = torch.randint(0, 16, (oc, c * kh * kw), generator=gen, dtype=torch.uint8)
    cb = torch.randn(1, 16, generator=gen)
    packed, shape = ws.ops.pack(idx, 4), [oc, c, kh, kw]
    w = ws.ops.dequantize(packed, cb, 4, shape)
    x = torch.randn(*((n,) if batched else ()), c, h, w_, generator=gen)
    b = torch.randn(oc, generator=gen) if with_bias else None
    want = F.conv2d(x, w, b, 1, p, d)
    for mode in ("direct", "dense"):
        monkeypatch.setenv("WS_CPU_CONV", mode)
        y = ws.ops.shared_conv2d(x, packed, cb, 4, shape, b, 1, p, d, 1)
        assert y.shape == want.shape and y.is_contiguous()
        # fp32 sums of up to 576 products of unit-scale values (|y| ~ 25): rounding differs with the order
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-4)


WINOGRAD = [  # (out, in, padding, N, H, W): 3x3 stride-1 convs for the Winograd F(2x2, 3x3) kernel
    (64, 64, (1, 1), 1, 20, 22),   # the ResNet layer's geometry, small image
    (19, 5, (1, 1), 2, 15, 13),    # odd output size: half-used last tiles in both directions
    (33, 16, (0, 1), 1, 3, 3),     # one output row
    (16, 16, (1, 1), 1, 1, 1),     # one pixel
    (40, 24, (2, 2), 3, 17, 2),    # padding wider than the image
    (8, 8, (0, 0), 2, 40, 37),     # more than 16 tiles per row: several vectors and a masked tail
    (70, 3, (1, 1), 1, 9, 9),      # output channels past the last full panel of 8
    (96, 40, (1, 1), 1, 14, 14),   # one image of <= 64 tiles: fused per channel group (6 groups, AVX2: of 4 panels)
    (20, 16, (1, 1), 1, 16, 16),   # exactly 64 tiles, fused, a partial last panel
]


@pytest.mark.parametrize("case", WINOGRAD)
@pytest.mark.parametrize("with_bias", [True, False])
def test_winograd_conv_kernel(case, with_bias, simd, monkeypatch, gen):
    """shared_conv2d's Winograd path (csrc/cpu/winograd_conv.cpp; AVX-512 CPUs, else the next path runs) against a
    float64 convolution, as close as the direct kernel and oneDNN are."""
    oc, c, p, n, h, w_ = case
    idx = torch.randint(0, 16, (oc, c * 9), generator=gen, dtype=torch.uint8)
    cb = torch.randn(1, 16, generator=gen)
    packed, shape = ws.ops.pack(idx, 4), [oc, c, 3, 3]
    w = ws.ops.dequantize(packed, cb, 4, shape)
    x = torch.randn(n, c, h, w_, generator=gen)
    b = torch.randn(oc, generator=gen) if with_bias else None
    want = F.conv2d(x.double(), w.double(), None if b is None else b.double(), 1, p)
    scale = want.abs().max().item()
    errors = {}
    for mode in ("winograd", "direct", "dense"):
        monkeypatch.setenv("WS_CPU_CONV", mode)
        y = ws.ops.shared_conv2d(x, packed, cb, 4, shape, b, 1, p)
        assert y.shape == want.shape and y.dtype == torch.float32 and y.is_contiguous()
        errors[mode] = (y.double() - want).abs().max().item() / scale
    assert errors["winograd"] < 2e-6, errors
    assert errors["winograd"] < 4 * max(errors["direct"], errors["dense"], 1e-7), errors


def test_direct_conv_kernel_leaves_other_layouts_to_the_general_path(monkeypatch, gen):
    """Strided, grouped, channels-last and non-contiguous inputs are not the direct kernel's; forcing it on must
    not change their results."""
    monkeypatch.setenv("WS_CPU_CONV", "direct")
    packed, cb, shape, w = make(8, 8, 3, 1, 4, False, gen)
    x = torch.randn(2, 8, 12, 12, generator=gen)
    cases = [(x, 2, 1), (x.to(memory_format=torch.channels_last), 1, 1), (x[:, :, :, ::2], 1, 1),
             (x.transpose(2, 3), 1, 1)]
    for xi, s, p in cases:
        torch.testing.assert_close(ws.ops.shared_conv2d(xi, packed, cb, 4, shape, None, s, p),
                                   F.conv2d(xi, w, None, s, p), rtol=1e-5, atol=1e-5)
    pg, cg, sg, wg = make(8, 8, 3, 2, 4, False, gen)
    torch.testing.assert_close(ws.ops.shared_conv2d(x, pg, cg, 4, sg, None, 1, 1, 1, 2),
                               F.conv2d(x, wg, None, 1, 1, 1, 2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_dtypes_and_channels_last(dtype, device, gen):
    packed, cb, shape, w = make(16, 8, 3, 1, 4, False, gen)
    x = torch.randn(2, 8, 10, 10, generator=gen).to(dtype).to(memory_format=torch.channels_last)
    # cuDNN computes fp32 convolutions in TF32 by default (torch's global setting, which the op honours like
    # F.conv2d does); the fp32 comparison against the CPU reference needs true fp32 products
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        y = ws.ops.shared_conv2d(x.to(device), packed.to(device), cb.to(device), 4, shape, None, 1, 1, 1, 1).cpu()
    assert y.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(y.float(), F.conv2d(x.float(), w.to(dtype).float(), None, 1, 1), rtol=tol, atol=tol)


@pytest.mark.parametrize("groups,per_channel", [(1, False), (1, True), (8, True)])
@pytest.mark.parametrize("mode", ["", "dense"])
def test_large_weight_goes_through_panels(groups, per_channel, mode, monkeypatch, gen):
    # 512 x 512/g x 3 x 3 > 2**19 weights for g=1: decoded in several output-channel panels ("dense": our conv
    # kernels off; by default this small image of a large layer takes the blocked GEMM on AVX2 CPUs instead)
    monkeypatch.setenv("WS_CPU_CONV", mode)
    packed, cb, shape, w = make(512, 512, 3, groups, 4, per_channel, gen)
    x = torch.randn(1, 512, 6, 6, generator=gen)
    y = ws.ops.shared_conv2d(x, packed, cb, 4, shape, None, 1, 1, 1, groups)
    torch.testing.assert_close(y, F.conv2d(x, w, None, 1, 1, 1, groups), rtol=1e-4, atol=1e-4)


BLOCKED = [  # (out, in, kh, kw, stride, padding, dilation, N, H, W, bits, per_channel): the blocked-GEMM conv
    (512, 512, 3, 3, (1, 1), (1, 1), (1, 1), 1, 7, 7, 4, False),    # late ResNet 3x3: taken by default
    (512, 2048, 1, 1, (1, 1), (0, 0), (1, 1), 1, 7, 7, 4, True),    # bottleneck 1x1, per-channel codebooks
    (64, 32, 3, 3, (2, 2), (1, 1), (1, 1), 1, 14, 14, 2, False),    # strided: 49 output pixels
    (19, 7, 3, 2, (1, 2), (2, 0), (2, 3), 3, 9, 11, 3, True),       # non-square, dilated, mixed strides, batch 3
    (8, 3, 5, 5, (1, 1), (2, 2), (1, 1), 2, 15, 13, 8, False),      # 390 pixels: two passes, one across images
    (5, 4, 3, 3, (1, 1), (4, 4), (1, 1), 1, 2, 3, 4, False),        # padding wider than the image
    (3, 2, 1, 1, (1, 1), (0, 0), (1, 1), 1, 1, 1, 1, False),        # one pixel, 1-bit
]


@pytest.mark.parametrize("case", BLOCKED)
@pytest.mark.parametrize("batched,with_bias", [(True, True), (True, False), (False, True)])
def test_blocked_conv_kernel(case, batched, with_bias, simd, monkeypatch, gen):
    """shared_conv2d's blocked-GEMM path for images of few pixels (csrc/cpu/blocked_conv.cpp), forced on where its
    speed test would decline, and by default where it is taken, against a float64 convolution; and the same values
    with our kernels off (decode + oneDNN)."""
    oc, c, kh, kw, s, p, d, n, h, w_, bits, per_channel = case
    n = n if batched else 1
    idx = torch.randint(0, 1 << bits, (oc, c * kh * kw), generator=gen, dtype=torch.uint8)
    cb = torch.randn(oc if per_channel else 1, 1 << bits, generator=gen)
    packed, shape = ws.ops.pack(idx, bits), [oc, c, kh, kw]
    w = ws.ops.dequantize(packed, cb, bits, shape)
    x = torch.randn(n, c, h, w_, generator=gen)
    x = x if batched else x[0]
    b = torch.randn(oc, generator=gen) if with_bias else None
    want = F.conv2d(x.double(), w.double(), None if b is None else b.double(), s, p, d)
    scale = want.abs().max().item()
    errors = {}
    for mode in ("blocked", "", "dense"):
        monkeypatch.setenv("WS_CPU_CONV", mode)
        y = ws.ops.shared_conv2d(x, packed, cb, bits, shape, b, s, p, d, 1)
        assert y.shape == want.shape and y.dtype == torch.float32 and y.is_contiguous()
        errors[mode or "auto"] = (y.double() - want).abs().max().item() / scale
    # fp32 sums of up to 4608 products, one running sum per output and chunk of 256 (oneDNN splits them further):
    # 2.4e-6 of the output's scale at 4608 against oneDNN's 2.6e-7; a wrong tap or pixel would be ~1e-1
    assert max(errors.values()) < 1e-5, errors


def test_blocked_conv_kernel_leaves_other_layouts_to_the_general_path(monkeypatch, gen):
    """Grouped, channels-last, non-contiguous and 16-bit inputs are not the blocked kernel's; forcing it on must not
    change their results (nor the channels-last output layout)."""
    monkeypatch.setenv("WS_CPU_CONV", "blocked")
    packed, cb, shape, w = make(8, 8, 3, 1, 4, False, gen)
    x = torch.randn(2, 8, 7, 7, generator=gen)
    for xi in (x.to(memory_format=torch.channels_last), x[:, :, :, ::2], x.transpose(2, 3)):
        y = ws.ops.shared_conv2d(xi, packed, cb, 4, shape, None, 1, 1)
        want = F.conv2d(xi, w, None, 1, 1)
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
        assert y.is_contiguous(memory_format=torch.channels_last) == want.is_contiguous(
            memory_format=torch.channels_last)
    y16 = ws.ops.shared_conv2d(x.bfloat16(), packed, cb, 4, shape, None, 1, 1)
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), F.conv2d(x.bfloat16().float(), w.bfloat16().float(), None, 1, 1),
                               rtol=3e-2, atol=3e-2)
    pg, cg, sg, wg = make(8, 8, 3, 2, 4, False, gen)
    torch.testing.assert_close(ws.ops.shared_conv2d(x, pg, cg, 4, sg, None, 1, 1, 1, 2),
                               F.conv2d(x, wg, None, 1, 1, 1, 2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("per_channel", [False, True])
def test_autograd(per_channel, device, gen):
    packed, cb, shape, _ = make(12, 6, 3, 3, 3, per_channel, gen)
    x = torch.randn(2, 6, 7, 7, generator=gen)
    b = torch.randn(12, generator=gen)
    xs, cs, bs = (t.clone().to(device).requires_grad_() for t in (x, cb, b))
    y = ws.ops.shared_conv2d(xs, packed.to(device), cs, 3, shape, bs, 1, 1, 1, 3)
    g = torch.randn_like(y)
    y.backward(g)
    xr, cr, br = (t.clone().requires_grad_() for t in (x, cb, b))
    F.conv2d(xr, ws.reference.dequantize(packed, cr, 3, shape), br, 1, 1, 1, 3).backward(g.cpu())
    for got, want in ((xs.grad, xr.grad), (cs.grad, cr.grad), (bs.grad, br.grad)):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)


def test_opcheck(device, gen):
    packed, cb, shape, _ = make(8, 4, 3, 2, 4, True, gen)
    x = torch.randn(2, 4, 6, 6, generator=gen).to(device)
    args = (x, packed.to(device), cb.to(device), 4, shape, torch.randn(8).to(device), [1, 1], [1, 1], [1, 1], 2)
    opcheck(torch.ops.weightshare.shared_conv2d.default, args)
    opcheck(torch.ops.weightshare.shared_conv2d.default, (x.clone().requires_grad_(),) + args[1:])


@pytest.mark.parametrize("case,exc,match", [
    ("channels", ValueError, "x has 5 channels"),
    ("shape_rank", ValueError, "weight_shape must be"),
    ("groups", ValueError, "groups=3 must divide"),
    ("dtype", TypeError, "x must be float32"),
    ("bias", ValueError, "bias must be \\[8\\]"),
    ("bits", ValueError, "bits must be in 1..8"),
])
def test_bad_input(case, exc, match, gen):
    packed, cb, shape, _ = make(8, 4, 3, 1, 4, False, gen)
    a = [torch.randn(1, 4, 6, 6), packed, cb, 4, shape, None, [1, 1], [1, 1], [1, 1], 1]
    if case == "channels":
        a[0] = torch.randn(1, 5, 6, 6)
    elif case == "shape_rank":
        a[4] = [8, 36]
    elif case == "groups":
        a[9] = 3
    elif case == "dtype":
        a[0] = a[0].double()
    elif case == "bias":
        a[5] = torch.randn(7)
    elif case == "bits":
        a[3] = 9
    with pytest.raises(exc, match=match):
        torch.ops.weightshare.shared_conv2d(*a)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("groups, codebook_groups", [(1, 1), (2, 2)])
def test_double_backward_matches_the_dense_conv(groups, codebook_groups, device):
    """create_graph=True through shared_conv2d (a Hessian-vector product w.r.t. input and codebook) equals F.conv2d
    with the weight gathered differentiably from the codebook."""
    torch.manual_seed(0)
    out_c, in_c, k, bits = 4, 4, 3, 3
    shape = [out_c, in_c // groups, k, k]
    idx = torch.randint(0, 8, (out_c, shape[1] * k * k), dtype=torch.uint8)
    packed = ws.ops.pack(idx, bits)
    cb0, x0 = torch.randn(codebook_groups, 8), torch.randn(2, in_c, 6, 6)
    v, u = torch.randn(2, in_c, 6, 6), torch.randn(codebook_groups, 8)
    idx, packed, cb0, x0, v, u = (t.to(device) for t in (idx, packed, cb0, x0, v, u))
    rows = torch.arange(out_c, device=device) // (out_c // codebook_groups)

    def second_derivatives(layer):
        x, cb = x0.clone().requires_grad_(True), cb0.clone().requires_grad_(True)
        gx, gc = torch.autograd.grad(layer(x, cb).sin().sum(), [x, cb], create_graph=True)
        return torch.autograd.grad((gx * v).sum() + (gc * u).sum(), [x, cb])

    ours = second_derivatives(lambda x, cb: torch.ops.weightshare.shared_conv2d(
        x, packed, cb, bits, shape, None, [1, 1], [1, 1], [1, 1], groups))
    dense = second_derivatives(lambda x, cb: torch.nn.functional.conv2d(
        x, cb[rows[:, None], idx.long()].view(shape), None, 1, 1, 1, groups))
    for a, b in zip(ours, dense):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
