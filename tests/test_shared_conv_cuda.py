"""shared_conv2d's own CUDA kernels (the implicit-GEMM conv on channels-last 16-bit x, the depthwise kernel) against
F.conv2d with the dequantised weight, and which calls each takes. They skip without a GPU; test_shared_conv.py holds
the tests every device runs."""
import pytest
import torch
import torch.nn.functional as F

import weightshare as ws

from conftest import DEVICES, FLOAT_DTYPES, cuda_kernels_of, requires_native
from test_shared_conv import DEPTHWISE, make

pytestmark = requires_native


IMPLICIT = [  # (batch, in, out, k, stride, padding, dilation, H, W): the implicit-GEMM conv on CUDA (groups 1)
    (1, 64, 64, 3, 1, 1, 1, 14, 14),            # ResNet 3x3: K = 576, a partial last 128-index unit
    (2, 8, 20, 3, 1, 1, 1, 9, 7),               # K = 72: one partial unit; out channels not a multiple of 16
    (1, 24, 300, 5, 2, 2, 1, 13, 12),           # 5x5 stride 2; out channels past one block of 256
    (1, 16, 40, 3, 1, (1, 2), (1, 2), 10, 11),  # dilation and padding per axis
    (3, 128, 96, 1, 1, 0, 1, 7, 9),             # 1x1 of whole units (no repack), 189 pixels: several x blocks
    (1, 256, 64, 1, 2, 0, 1, 8, 8),             # 1x1 stride 2
    (1, 512, 512, 3, 1, 1, 1, 7, 7),            # ResNet's last stage: 49 pixels, K = 4608: split-K
    (8, 64, 64, 3, 1, 1, 1, 8, 8),              # 512 pixels: 128-pixel blocks
    (1, 64, 96, 3, 1, 1, 1, 5, 5),              # 25 pixels, 96 channels: 128-channel blocks at <= 4 bits (TM 2)
    (1, 32, 64, 3, 1, 1, 1, 8, 8),              # 64 pixels, 64 channels: 64-channel blocks of 64-pixel tiles
]


def hopper():
    """An H100/H200 (sm_90): the default build's code and 227 KiB of shared memory per block, so the implicit GEMM
    takes every call of these tests (elsewhere a call may fall back, also correct)."""
    return torch.cuda.get_device_capability() == (9, 0)


def implicit_weight(out, cin, k, bits, groups, gen, dtype=torch.float32, entries=None):
    idx = torch.randint(0, entries or 1 << bits, (out, cin * k * k), generator=gen, dtype=torch.uint8)
    cb = (torch.randn(groups, entries or 1 << bits, generator=gen) * 0.2).to(dtype)
    packed, shape = ws.ops.pack(idx, bits), [out, cin, k, k]
    return packed, cb, shape, ws.ops.dequantize(packed, cb, bits, shape)


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a GPU and the CUDA kernels")
@pytest.mark.parametrize("case", IMPLICIT)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_cuda_implicit_gemm_conv(case, dtype, bits, monkeypatch, gen):
    """The implicit-GEMM conv (WS_CUDA_CONV=implicit, csrc/cuda/shared_conv_implicit.cu) on channels-last x against
    fp32 F.conv2d with the weight rounded to x's dtype, with bias (fp32, as a model keeps it); y channels-last as
    cuDNN gives it, and (on sm_90) computed by the implicit GEMM, not a fallback."""
    monkeypatch.setenv("WS_CUDA_CONV", "implicit")
    n, cin, out, k, s, p, d, h, w_ = case
    packed, cb, shape, w = implicit_weight(out, cin, k, bits, 1, gen)
    x = torch.randn(n, cin, h, w_, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last)
    b = torch.randn(out, generator=gen)
    y, names = cuda_kernels_of(lambda: ws.ops.shared_conv2d(x.cuda(), packed.cuda(), cb.cuda(), bits, shape, b.cuda(),
                                                            s, p, d, 1))
    if names is not None and hopper():
        assert any("conv_mma_kernel" in name for name in names)
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    tol = 2e-2 if dtype == torch.float16 else 5e-2
    want = F.conv2d(x.float(), w.to(dtype).float(), b, s, p, d)
    torch.testing.assert_close(y.cpu().float(), want, rtol=tol, atol=tol)


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a GPU and the CUDA kernels")
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_cuda_implicit_gemm_conv_codebooks_and_training(bits, monkeypatch, gen):
    """The implicit GEMM with two codebooks of 256 output channels, each shorter than 2**bits entries, in fp16 (as
    an fp16 model holds them), without bias; and in training: its output feeds an in-place ReLU (it must not be a
    view) and autograd's backward."""
    monkeypatch.setenv("WS_CUDA_CONV", "implicit")
    packed, cb, shape, w = implicit_weight(512, 64, 3, bits, 2, gen, torch.float16, entries=(1 << bits) - 1)
    x = torch.randn(2, 64, 9, 9, generator=gen).half().contiguous(memory_format=torch.channels_last)
    y, names = cuda_kernels_of(lambda: ws.ops.shared_conv2d(x.cuda(), packed.cuda(), cb.cuda(), bits, shape, None,
                                                            1, 1))
    if names is not None and hopper():
        assert any("conv_mma_kernel" in name for name in names)
    torch.testing.assert_close(y.cpu().float(), F.conv2d(x.float(), w.float(), None, 1, 1), rtol=2e-2, atol=2e-2)
    xg = x.cuda().requires_grad_()
    y = ws.ops.shared_conv2d(xg, packed.cuda(), cb.cuda(), bits, shape, None, 1, 1)
    y.relu_()
    y.float().sum().backward()
    xf = x.float().requires_grad_()  # d sum(relu(conv(x, w))) / dx in fp32 (a few ReLU edges may differ)
    F.conv2d(xf, w.float(), None, 1, 1).relu().sum().backward()
    torch.testing.assert_close(xg.grad.cpu().float(), xf.grad, rtol=5e-2, atol=5e-2)


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a GPU and the CUDA kernels")
def test_cuda_implicit_gemm_conv_takes_the_calls_it_should(monkeypatch, gen):
    """Which calls the implicit GEMM takes, by the profiler's kernel names: channels-last 16-bit x of groups-1
    layers when asked; not NCHW x, grouped layers, per-channel codebooks, fp32 x, unasked calls (off by default
    until measured: kImplicitConvDefault) or refused ones (those take decode + cuDNN, also correct)."""
    if not hopper():
        pytest.skip("the default build's tensor-core code and shared memory: sm_90")
    monkeypatch.delenv("WS_CUDA_CONV", raising=False)

    def ran(x, groups=1, per_channel=False):
        packed, cb, shape, _ = make(32, 32, 3, groups, 4, per_channel, gen)
        _, names = cuda_kernels_of(lambda: ws.ops.shared_conv2d(x.cuda(), packed.cuda(), cb.cuda(), 4, shape, None,
                                                                1, 1, 1, groups))
        if names is None:
            pytest.skip("the profiler recorded no CUDA kernels (no CUPTI)")
        return any("conv_mma_kernel" in name for name in names)

    x = torch.randn(1, 32, 8, 8, generator=gen).half()
    last = x.contiguous(memory_format=torch.channels_last)
    assert not ran(last)
    monkeypatch.setenv("WS_CUDA_CONV", "implicit")
    assert ran(last)
    assert ran(last.bfloat16())
    assert not ran(x)
    assert not ran(last, groups=2)
    assert not ran(last, per_channel=True)
    assert not ran(last.float())
    monkeypatch.setenv("WS_CUDA_CONV", "none")
    assert not ran(last)


def depthwise_problem(case, dtype, layout, codebooks, gen):
    """A depthwise layer (`case` in DEPTHWISE's form) for the CUDA depthwise kernel's tests (here and on the host
    emulator, test_cuda_emu.py): 3-bit indices, one codebook or one per channel, 2 images of x in `layout`, a bias."""
    c, mult, kh, kw, _, _, _, h, w_ = case
    bits, out = 3, c * mult
    idx = torch.randint(0, 1 << bits, (out, kh * kw), generator=gen, dtype=torch.uint8)
    cb = torch.randn(1 if codebooks == "one" else out, 1 << bits, generator=gen) * 0.3
    packed, shape = ws.ops.pack(idx, bits), [out, 1, kh, kw]
    x = torch.randn(2, c, h, w_, generator=gen).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x, packed, cb, bits, shape, torch.randn(out, generator=gen)


def check_depthwise_output(y, case, x, packed, cb, bits, shape, b):
    """y against fp32 F.conv2d with the weight rounded to x's dtype, in x's dtype and memory format (as cuDNN's)."""
    _, _, _, _, s, p, d, _, _ = case
    w = ws.ops.dequantize(packed, cb, bits, shape).to(x.dtype).float()
    want = F.conv2d(x.float(), w, b, s, p, d, x.shape[1])
    assert y.dtype == x.dtype
    assert y.is_contiguous(memory_format=torch.channels_last) == want.is_contiguous(memory_format=torch.channels_last)
    tol = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 5e-2}[x.dtype]
    torch.testing.assert_close(y.float(), want, rtol=tol, atol=tol)


def ran_depthwise_kernel(name):
    """Whether a profiled kernel name is one of ours (not ATen's conv_depthwise2d_* or cuDNN's)."""
    return "depthwise_nchw_kernel" in name or "depthwise_nhwc_kernel" in name


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a GPU and the CUDA kernels")
@pytest.mark.parametrize("case", DEPTHWISE)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("codebooks", ["one", "per_channel"])
def test_cuda_depthwise_kernel(case, dtype, layout, codebooks, monkeypatch, gen):
    """The CUDA depthwise kernel (WS_CUDA_CONV=depthwise, csrc/cuda/shared_conv_depthwise.cu) on the CPU kernel's
    edge cases, both layouts, against fp32 F.conv2d with the weight rounded to x's dtype, with bias; y in x's
    memory format, as cuDNN's."""
    monkeypatch.setenv("WS_CUDA_CONV", "depthwise")
    x, packed, cb, bits, shape, b = depthwise_problem(case, dtype, layout, codebooks, gen)
    _, _, _, _, s, p, d, _, _ = case
    y, names = cuda_kernels_of(lambda: ws.ops.shared_conv2d(x.cuda(), packed.cuda(), cb.cuda(), bits, shape, b.cuda(),
                                                            s, p, d, x.shape[1]).cpu())
    if names is not None:
        assert any(ran_depthwise_kernel(name) for name in names)
    check_depthwise_output(y, case, x, packed, cb, bits, shape, b)


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a GPU and the CUDA kernels")
@pytest.mark.parametrize("case", [  # (batch, channels, multiplier, H, W)
    (2, 64, 1, 40, 40),   # 1,600 outputs a plane: the NCHW kernel's threads loop over the plane
    (2, 8, 1, 192, 192),  # 73,728 pixels: the channels-last kernel's blocks loop over pixels
    (1, 1, 4, 13, 11),    # one input channel, multiplier 4, one image (ambiguous layouts)
    (1, 40, 1, 5, 7),     # 40 channels: two channel blocks, the second partial
])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_cuda_depthwise_kernel_loops_and_plain_layers(case, layout, monkeypatch, gen):
    """The CUDA depthwise kernel's loops and less common inputs: no bias, an fp16 codebook with x fp32 (its taps
    exact), a single input channel; against fp32 F.conv2d, y in the layout cuDNN gives."""
    monkeypatch.setenv("WS_CUDA_CONV", "depthwise")
    n, c, mult, h, w_ = case
    out = c * mult
    idx = torch.randint(0, 16, (out, 9), generator=gen, dtype=torch.uint8)
    cb = (torch.randn(1, 16, generator=gen) * 0.3).half()
    packed, shape = ws.ops.pack(idx, 4), [out, 1, 3, 3]
    w = ws.ops.dequantize(packed, cb, 4, shape).float()
    x = torch.randn(n, c, h, w_, generator=gen)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    y, names = cuda_kernels_of(lambda: ws.ops.shared_conv2d(x.cuda(), packed.cuda(), cb.cuda(), 4, shape, None, 1, 1,
                                                            1, c).cpu())
    if names is not None:
        assert any(ran_depthwise_kernel(name) for name in names)
    assert y.stride() == F.conv2d(x.cuda(), w.cuda(), None, 1, 1, 1, c).stride()  # cuDNN's layout, the fallback's
    torch.testing.assert_close(y, F.conv2d(x, w, None, 1, 1, 1, c), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a GPU and the CUDA kernels")
def test_cuda_depthwise_kernel_takes_the_calls_it_should(monkeypatch, gen):
    """Which calls the CUDA depthwise kernel takes, by the profiler's kernel names: depthwise layers (multiplier 1
    or 2) in either layout when asked (WS_CUDA_CONV=depthwise or =all); not unasked, not grouped non-depthwise
    layers (those take decode + cuDNN)."""
    monkeypatch.delenv("WS_CUDA_CONV", raising=False)

    def ran(x, out, cin_g, groups):
        idx = torch.randint(0, 16, (out, cin_g * 9), generator=gen, dtype=torch.uint8)
        cb = torch.randn(1, 16, generator=gen)
        _, names = cuda_kernels_of(lambda: ws.ops.shared_conv2d(x.cuda(), ws.ops.pack(idx, 4).cuda(), cb.cuda(), 4,
                                                                [out, cin_g, 3, 3], None, 1, 1, 1, groups))
        if names is None:
            pytest.skip("the profiler recorded no CUDA kernels (no CUPTI)")
        return any(ran_depthwise_kernel(name) for name in names)

    x = torch.randn(2, 16, 9, 9, generator=gen)
    assert not ran(x, 16, 1, 16)
    for mode in ("depthwise", "all"):
        monkeypatch.setenv("WS_CUDA_CONV", mode)
        assert ran(x, 16, 1, 16)
        assert ran(x.half().contiguous(memory_format=torch.channels_last), 32, 1, 16)
        assert not ran(x, 16, 2, 8)
    for mode in ("none", "implicit"):
        monkeypatch.setenv("WS_CUDA_CONV", mode)
        assert not ran(x, 16, 1, 16)
