"""shared_linear's CUDA kernels, path by path (the SIMT and tensor-core GEMVs, the panels, the tile kernels, the fused
mma.sync / wgmma GEMMs): each against the dequantised weight, and which kernel takes which call. They skip without a
GPU; test_shared_linear.py holds the tests every device runs."""
import pytest
import torch
import torch.nn.functional as F

import weightshare as ws

from conftest import DEVICES, requires_native
from test_shared_linear import TOL, make_weight

pytestmark = requires_native


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
