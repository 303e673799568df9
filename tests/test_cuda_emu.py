"""The CUDA kernels run on the CPU by the host emulator (tests/cuda_emu: every thread a fiber, warp instructions as
the PTX ISA defines them): each path of shared_linear, dequantize, the backward and the conv kernels against the
same references the GPU tests use, and which kernel took each call. So kernels written where no GPU is lent run
before they reach one. What the emulator does not model (timing, memory ordering between blocks) stays the GPU
tests' and the sanitizers' business (tests/test_*_cuda.py, benchmarks/gpu_check.sh)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import weightshare as ws

from conftest import requires_native
from test_shared_conv_cuda import check_depthwise_output, depthwise_problem
from test_shared_linear import TOL, make_weight

pytestmark = requires_native

EMU_DIR = Path(__file__).parent / "cuda_emu"


# WS_EMU_VARIANT=asan: the AddressSanitizer build (test_emu_kernels_under_address_sanitizer runs this file so)
VARIANT = os.environ.get("WS_EMU_VARIANT", "")


def emu_build():
    sys.path.insert(0, str(EMU_DIR))
    try:
        import build
    finally:
        sys.path.remove(str(EMU_DIR))
    try:
        build.cuda_include()
    except RuntimeError as e:
        pytest.skip(str(e))
    return build


@pytest.fixture(scope="session")
def emu():
    """The emulator library (built on first use, then cached), its ops under torch.ops.weightshare_emu."""
    torch.ops.load_library(str(emu_build().build(variant=VARIANT)))
    return torch.ops.weightshare_emu


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("WS_CUDA_GEMV", "WS_CUDA_LINEAR", "WS_CUDA_CONV", "WS_CUDA_WGMMA_DRAIN"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def as_pair(v):
    """A conv argument (an int or a per-axis pair) as the [h, w] list the conv_kernel op takes."""
    return [v, v] if isinstance(v, int) else list(v)


def launched(emu, fn):
    """fn()'s result and the kernels it launched (source names, with their launcher's signature)."""
    emu.clear_launches()
    out = fn()
    return out, list(emu.launches())


# ------------------------------------------------------------------------------------------------ dequantize
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("shape", [(37, 300), (8, 256), (3, 3, 3, 5)])
@pytest.mark.parametrize("cb_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("groups", ["one", "per_row"])
def test_emu_dequantize(emu, bits, shape, cb_dtype, groups, gen):
    """The CUDA dequantize kernel (a thread per 8 indices, 16-byte stores where rows allow) equals the CPU op bit
    for bit, in the codebook's dtype, partial groups of 8 and rows of any length included."""
    rows, n = shape[0], int(torch.tensor(shape[1:]).prod())
    packed, cb, _ = make_weight(rows, n, bits, 1 if groups == "one" else rows, gen)
    cb = cb.to(cb_dtype)
    got, names = launched(emu, lambda: emu.dequantize(packed, cb, bits, list(shape)))
    assert any("dequantize_kernel" in n for n in names)
    want = ws.ops.dequantize(packed, cb, bits, shape)
    assert got.dtype == want.dtype and torch.equal(got, want)


@pytest.mark.parametrize("bits", range(1, 9))
def test_emu_pack_unpack(emu, bits, gen):
    """pack / unpack on CUDA equal the CPU ops bit for bit; an index too wide is refused with the CPU's error."""
    idx = torch.randint(0, 1 << bits, (7, 333), generator=gen, dtype=torch.uint8)
    packed = emu.pack(idx, bits)
    assert torch.equal(packed, ws.ops.pack(idx, bits))
    assert torch.equal(emu.unpack(packed, bits, 333), idx)
    if bits < 8:
        with pytest.raises(ValueError, match="cannot be packed"):
            emu.pack(torch.full((2, 9), 1 << bits, dtype=torch.uint8), bits)


@pytest.mark.parametrize("k", [2, 16, 256])
@pytest.mark.parametrize("groups", [1, 4])
def test_emu_assign_and_kmeans_step(emu, k, groups, gen):
    """assign and loss_aware_assign equal the CPU ops (search_table.h's thresholds, ties to the lowest index);
    kmeans_step's float64 sums agree to rounding (the device adds in another order)."""
    w = torch.randn(8, 50, generator=gen)
    cb = torch.randn(groups, k, generator=gen)
    idx = emu.assign(w, cb)
    assert torch.equal(idx, ws.ops.assign(w, cb))
    grad, hdiag = torch.randn(8, 50, generator=gen), torch.rand(8, 50, generator=gen)
    pen = torch.rand(groups, k, generator=gen) * 1e-2
    assert torch.equal(emu.loss_aware_assign(w, grad, hdiag, cb, pen),
                       torch.ops.weightshare.loss_aware_assign(w, grad, hdiag, cb, pen))
    imp = torch.rand(8, 50, generator=gen)
    for got, want in zip(emu.kmeans_step(w, idx, k, imp, groups), torch.ops.weightshare.kmeans_step(w, idx, k, imp,
                                                                                                      groups)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------ shared_linear
# path -> (environment, the kernel name that must take the call, in_features, rows of x)
LINEAR_PATHS = {
    "simt": ({"WS_CUDA_GEMV": "off"}, "launch_gemv(", 300, [1, 5, 8]),
    # the byte-table form takes 2 and 4 bits with a codebook per block (else the plain SIMT GEMV runs); 16-bit x of
    # more rows goes to the tensor-core GEMV
    "simt_bytes": ({"WS_CUDA_GEMV": "bytes"}, "bool BYTES = true", 300, [1, 1]),
    "mma_gemv": ({"WS_CUDA_GEMV": "mma"}, "gemv_mma_kernel", 300, [1, 5, 16, 17, 40]),
    "default": ({}, "", 300, [1, 2, 16, 17]),
    "panels": ({"WS_CUDA_GEMV": "off", "WS_CUDA_LINEAR": "panels"}, "panel", 300, [17, 40]),
    "tiles": ({"WS_CUDA_GEMV": "off", "WS_CUDA_LINEAR": "tiles"}, "launch_tiles", 300, [17, 40]),
    "fused": ({"WS_CUDA_LINEAR": "fused"}, "gemm_mma_kernel", 256, [17, 40, 130]),
    "wgmma": ({"WS_CUDA_LINEAR": "wgmma"}, "gemm_wgmma_kernel", 384, [17, 40, 130]),
}


@pytest.mark.parametrize("path", list(LINEAR_PATHS))
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("groups", ["one", "per_row", "three"])
def test_emu_linear_16bit(emu, path, bits, groups, clean_env, gen):
    """Each CUDA path of shared_linear for fp16/bf16 x, forced by its switch, against fp32 products with the weight
    rounded to x's dtype (test_shared_linear_cuda.py's reference), with bias; the path's kernel took the call
    wherever its rules allow."""
    env, kernel, in_f, rows = LINEAR_PATHS[path]
    for name, value in env.items():
        clean_env.setenv(name, value)
    out_f = 48 if groups == "three" else (256 if path in ("fused", "wgmma") else 37)
    g = {"one": 1, "per_row": out_f, "three": 3}[groups]
    packed, cb, _ = make_weight(out_f, in_f, bits, g, gen)
    for M, dtype in zip(rows, [torch.float16, torch.bfloat16] * 3):
        x = torch.randn(M, in_f, generator=gen).to(dtype)
        bias = torch.randn(out_f, generator=gen)
        c, b = (cb.to(dtype), bias.to(dtype)) if groups == "three" else (cb, bias)
        y, names = launched(emu, lambda: emu.shared_linear(x, packed, c, bits, out_f, in_f, b, "float"))
        w = ws.ops.dequantize(packed, c, bits, (out_f, in_f)).to(dtype).float()
        want = F.linear(x.float(), w, b.float())
        assert y.dtype == dtype
        torch.testing.assert_close(y.float(), want, rtol=TOL[dtype][0], atol=TOL[dtype][1])
        # the fused GEMMs' rules: wgmma one codebook per block of output rows; mma.sync per-row tables (any grouping
        # that splits a block) at 2, 3, 4 and 8 bits only
        declines = ((path == "wgmma" and groups != "one") or (path == "fused" and groups != "one" and bits in (1, 5))
                    or (path == "simt_bytes" and (groups != "one" or bits not in (2, 4))))
        if kernel and not declines:
            assert any(kernel in n for n in names), (M, names)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("dtype, M", [(torch.float32, 1), (torch.float32, 3), (torch.float32, 16),
                                      (torch.float16, 1), (torch.bfloat16, 1)])
@pytest.mark.parametrize("out_f, in_f, groups", [(37, 300, 1), (64, 4096, 2), (48, 600, 3), (24, 300, 3)])
def test_emu_gemv_byte_table_is_bit_identical(emu, bits, dtype, M, out_f, in_f, groups, clean_env, gen):
    """The SIMT GEMV's byte-table form (WS_CUDA_GEMV=bytes) gives the plain form's output bit for bit (the same
    products in the same order), NaN where an index is past a short codebook included, over whole spans and a
    partial last one; it takes a call only where the rows of each 16-row block share a codebook (1 codebook; 2 of
    32 rows; 3 of 16; not 3 of 8). 16-bit x at one row: more go to the tensor-core GEMV."""
    k = (1 << bits) - 1
    idx = torch.randint(0, 1 << bits, (out_f, in_f), generator=gen, dtype=torch.uint8)
    idx[1::2] %= k  # every other row free of the index past the codebook
    packed, cb = ws.ops.pack(idx, bits), torch.randn(groups, k, generator=gen)
    x = torch.randn(M, in_f, generator=gen).to(dtype)
    clean_env.setenv("WS_CUDA_GEMV", "off")
    want, plain = launched(emu, lambda: emu.shared_linear(x, packed, cb, bits, out_f, in_f, None, "float"))
    clean_env.setenv("WS_CUDA_GEMV", "bytes")
    got, names = launched(emu, lambda: emu.shared_linear(x, packed, cb, bits, out_f, in_f, None, "float"))
    assert torch.equal(got.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       want.view(torch.int16 if dtype != torch.float32 else torch.int32))
    assert torch.isnan(got).any() and not torch.isnan(got[:, 1::2]).any()
    assert any("bool BYTES = true" in n for n in names) == (groups == 1 or (out_f // groups) % 16 == 0), names
    assert not any("bool BYTES = true" in n for n in plain)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("M", [1, 3, 8, 9, 16, 17, 40])
def test_emu_linear_fp32(emu, bits, M, clean_env, gen):
    """fp32 x: the SIMT GEMV up to 16 rows (fp32 tables, exact products; 8 rows per block), the panels above; a
    partial last span (in_features 300), rows not a multiple of 16, per-row codebooks."""
    out_f, in_f = 37, 300
    packed, cb, _ = make_weight(out_f, in_f, bits, out_f if M % 2 else 1, gen)
    x = torch.randn(M, in_f, generator=gen)
    bias = torch.randn(out_f, generator=gen)
    y, names = launched(emu, lambda: emu.shared_linear(x, packed, cb, bits, out_f, in_f, bias, "float"))
    want = F.linear(x.double(), ws.ops.dequantize(packed, cb, bits, (out_f, in_f)).double(), bias.double())
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
    assert any(("launch_gemv(" if M <= 16 else "decode_panel_kernel") in n for n in names), names


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("M", [1, 4, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("groups", ["one", "per_row"])
def test_emu_linear_int8_bit_exact(emu, bits, M, dtype, groups, clean_env, gen):
    """activation="int8" on CUDA (row quantizer, zero-point sampler, table kernels, int8 GEMV / tiles) gives the
    CPU op's output bit for bit, as the GPU tests require."""
    out_f, in_f = 40, 700
    packed, cb, _ = make_weight(out_f, in_f, bits, 1 if groups == "one" else out_f, gen)
    x = torch.randn(M, in_f, generator=gen).to(dtype)
    bias = torch.randn(out_f, generator=gen)
    got = emu.shared_linear(x, packed, cb, bits, out_f, in_f, bias, "int8")
    want = ws.ops.shared_linear(x, packed, cb, bits, out_f, in_f, bias, "int8")
    assert got.dtype == want.dtype and torch.equal(got, want)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M", [1, 20])
def test_emu_linear_backward(emu, bits, dtype, M, gen):
    """shared_linear_backward's CUDA tile kernels (grad_x through the transposed shared matmul, the codebook
    gradient as per-entry sums) against the CPU op."""
    out_f, in_f, groups = 48, 300, 3
    packed, cb, _ = make_weight(out_f, in_f, bits, groups, gen)
    x = torch.randn(M, in_f, generator=gen).to(dtype)
    grad = torch.randn(M, out_f, generator=gen).to(dtype)
    got = emu.shared_linear_backward(grad, x, packed, cb, bits, out_f, in_f, True, True)
    want = torch.ops.weightshare.shared_linear_backward(grad, x, packed, cb, bits, out_f, in_f, True, True)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g.float(), w.float(), rtol=tol, atol=tol)


# ------------------------------------------------------------------------------------------------ conv
IMPLICIT = [  # (batch, in, out, k, stride, padding, dilation, H, W), test_shared_conv_cuda.py's cases, smaller
    (1, 64, 64, 3, 1, 1, 1, 6, 6),              # ResNet 3x3: K = 576, a partial last 128-index unit
    (2, 8, 20, 3, 1, 1, 1, 9, 7),               # K = 72: one partial unit; out channels not a multiple of 16
    (1, 24, 300, 5, 2, 2, 1, 9, 8),             # 5x5 stride 2; out channels past one block of 256
    (1, 16, 40, 3, 1, (1, 2), (1, 2), 10, 11),  # dilation and padding per axis
    (3, 128, 96, 1, 1, 0, 1, 7, 9),             # 1x1 of whole units (no repack), 189 pixels: several x blocks
    (1, 32, 64, 3, 1, 1, 1, 8, 8),              # 64 pixels, 64 channels: 64-channel blocks of 64-pixel tiles
]


@pytest.mark.parametrize("case", IMPLICIT)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_emu_implicit_gemm_conv(emu, case, bits, clean_env, gen):
    """The implicit-GEMM conv kernel (repack + the fused mma.sync body over channels-last pixels) against fp32
    F.conv2d with the weight rounded to x's dtype, with bias; y channels-last."""
    clean_env.setenv("WS_CUDA_CONV", "implicit")
    n, cin, out, k, s, p, d, h, w_ = case
    dtype = torch.float16 if bits != 3 else torch.bfloat16
    idx = torch.randint(0, 1 << bits, (out, cin * k * k), generator=gen, dtype=torch.uint8)
    cb = torch.randn(1, 1 << bits, generator=gen) * 0.2
    packed, shape = ws.ops.pack(idx, bits), [out, cin, k, k]
    w = ws.ops.dequantize(packed, cb, bits, shape)
    x = torch.randn(n, cin, h, w_, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last)
    b = torch.randn(out, generator=gen)
    y, names = launched(emu, lambda: emu.conv_kernel(x, packed, cb, bits, shape, b, as_pair(s), as_pair(p),
                                                     as_pair(d), 1, "implicit"))
    assert any("conv_mma_kernel" in n for n in names)
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    tol = 2e-2 if dtype == torch.float16 else 5e-2
    torch.testing.assert_close(y.float(), F.conv2d(x.float(), w.to(dtype).float(), b, s, p, d), rtol=tol, atol=tol)


DEPTHWISE = [  # (channels, multiplier, kh, kw, stride, padding, dilation, H, W)
    (8, 1, 3, 3, 1, 1, 1, 9, 9),
    (6, 2, 5, 3, 2, (2, 1), 1, 11, 8),
    (40, 1, 3, 3, 1, 2, 2, 7, 7),
    (1, 4, 3, 3, 1, 1, 1, 13, 11),
]


@pytest.mark.parametrize("case", DEPTHWISE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_emu_depthwise_conv(emu, case, dtype, layout, clean_env, gen):
    """The depthwise kernel (taps decoded into shared memory per block, fp32 accumulation; NCHW planes or
    channels-last blocks of 32 channels x 8 pixels) against fp32 F.conv2d; y in x's memory format."""
    clean_env.setenv("WS_CUDA_CONV", "depthwise")
    x, packed, cb, bits, shape, b = depthwise_problem(case, dtype, layout, "per_channel", gen)
    _, _, _, _, s, p, d, _, _ = case
    y, names = launched(emu, lambda: emu.conv_kernel(x, packed, cb, bits, shape, b, as_pair(s), as_pair(p), as_pair(d),
                                                     x.shape[1], "depthwise"))
    assert any("depthwise" in n for n in names), names
    check_depthwise_output(y, case, x, packed, cb, bits, shape, b)


# ------------------------------------------------------------------------------------------------ the emulator
def test_emu_mma_sync_is_a_matrix_product(emu, gen):
    """mma.m16n8k16 as emulated (fragments as the PTX ISA lays them out) equals A B."""
    a = torch.randn(16, 16, generator=gen).half()
    b = torch.randn(16, 8, generator=gen).half()
    d = emu.selftest("mma", a.view(torch.int16), b.view(torch.int16))
    torch.testing.assert_close(d, a.float() @ b.float(), rtol=1e-5, atol=1e-5)


def test_emu_wgmma_chains_and_reports_writes_in_flight(emu, gen):
    """Two wgmma on the same accumulators, the second issued before the first completes, add up (the first's result
    reaches the second, as on the GPU); B read through a 128-byte-swizzle descriptor. Writing the accumulators
    before the wait, or reusing the first one's A registers for the second, is reported."""
    a = torch.randn(64, 16, generator=gen).half()
    b = torch.randn(16, 64, generator=gen).half()
    d = emu.selftest("wgmma", a.view(torch.int16), b.view(torch.int16))
    torch.testing.assert_close(d, a.float() @ b.float(), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="accumulator registers written while the wgmma was in flight"):
        emu.selftest("wgmma", a.view(torch.int16), b.view(torch.int16), 1)
    with pytest.raises(RuntimeError, match="A's registers changed while the wgmma was in flight"):
        emu.selftest("wgmma", a.view(torch.int16), b.view(torch.int16), 2)


def test_emu_cp_async_lands_at_its_wait(emu):
    """A read of cp.async's destination before cp.async.wait_group sees the old bytes; after it, the copy."""
    src = torch.arange(100, 104, dtype=torch.int32)
    out = emu.selftest("cp_async", src, src)
    assert out.tolist() == [7, 7, 7, 7, 100, 101, 102, 103]


def test_emu_reports_broken_warp_synchronisation(emu):
    """A warp split between __syncwarp and __syncthreads is a deadlock, reported with its block; a shuffle from a
    lane that has exited is reported too. Neither crashes nor hangs, and the next launch runs normally."""
    x = torch.zeros(1)
    with pytest.raises(RuntimeError, match="deadlock"):
        emu.selftest("split_barrier", x, x)
    with pytest.raises(RuntimeError, match="a shuffle reads an exited lane"):
        emu.selftest("exited_lane", x, x)
    src = torch.arange(4, dtype=torch.int32)
    assert emu.selftest("cp_async", src, src).tolist()[4:] == [0, 1, 2, 3]


@pytest.mark.parametrize("schedule", ["reverse", "shuffle"])
@pytest.mark.parametrize("path", ["simt", "simt_bytes", "mma_gemv", "fused", "wgmma", "panels", "tiles"])
def test_emu_linear_under_other_thread_orders(emu, schedule, path, clean_env, gen):
    """The same results when the threads of each block run in reverse or a random order between barriers
    (WS_EMU_SCHEDULE): a kernel that reads shared memory another thread writes without a barrier in between would
    change its result with the order."""
    env, kernel, in_f, rows = LINEAR_PATHS[path]
    for name, value in env.items():
        clean_env.setenv(name, value)
    out_f = 256 if path in ("fused", "wgmma") else 37
    packed, cb, _ = make_weight(out_f, in_f, 4, 1, gen)
    x = torch.randn(rows[-1], in_f, generator=gen).half()
    want = emu.shared_linear(x, packed, cb, 4, out_f, in_f, None, "float")
    clean_env.setenv("WS_EMU_SCHEDULE", schedule)
    got, names = launched(emu, lambda: emu.shared_linear(x, packed, cb, 4, out_f, in_f, None, "float"))
    assert any(kernel in n for n in names)
    assert torch.equal(got, want)


@pytest.mark.parametrize("schedule", ["reverse", "shuffle"])
def test_emu_conv_under_other_thread_orders(emu, schedule, clean_env, gen):
    """The conv kernels and the int8 path, likewise."""
    n, cin, out, k, s, p, d, h, w_ = IMPLICIT[0]
    idx = torch.randint(0, 16, (out, cin * k * k), generator=gen, dtype=torch.uint8)
    packed, cb, shape = ws.ops.pack(idx, 4), torch.randn(1, 16, generator=gen), [out, cin, k, k]
    x = torch.randn(n, cin, h, w_, generator=gen).half().contiguous(memory_format=torch.channels_last)
    dw_packed, dw_shape = ws.ops.pack(idx[:, :9].contiguous(), 4), [out, 1, 3, 3]
    xl = torch.randn(2, 64, 20, 20, generator=gen)
    lin_packed, lin_cb, _ = make_weight(40, 700, 3, 40, gen)
    xi = torch.randn(3, 700, generator=gen)

    def run():
        clean_env.setenv("WS_CUDA_CONV", "all")
        return (emu.conv_kernel(x, packed, cb, 4, shape, None, [1, 1], [1, 1], [1, 1], 1, "implicit"),
                emu.conv_kernel(xl, dw_packed, cb, 4, dw_shape, None, [1, 1], [1, 1], [1, 1], 64, "depthwise"),
                emu.shared_linear(xi, lin_packed, lin_cb, 3, 40, 700, None, "int8"))

    want = run()
    clean_env.setenv("WS_EMU_SCHEDULE", schedule)
    for g, w in zip(run(), want):
        assert torch.equal(g, w)


# Runs one self-test kernel (sys.argv[1]: its mode) with a sanitizer variant and prints its output's sum
SELFTEST_SCRIPT = ("import sys, torch; sys.path.insert(0, {emu!r}); import build; "
                   "torch.ops.load_library(str(build.build(variant={variant!r}))); x = torch.arange(64.0); "
                   "y = torch.ops.weightshare_emu.selftest({name!r}, x, x, int(sys.argv[1])); "
                   "print('sum', float(y.sum()))")


def run_under(variant: str, args: list[str]) -> subprocess.CompletedProcess:
    """python args in a process of its own with the emulator's `variant` build (asan, tsan) and its runtime."""
    env = dict(os.environ, WS_EMU_VARIANT=variant, **emu_build().sanitizer_env(variant))
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True,
                          cwd=Path(__file__).parent)


# Under a sanitizer each kernel runs 5-15x slower: the sanitizer runs take this file's tests but the other thread
# orders (which the sanitizers do not need) and, of the shared_linear tests, the 3-codebook grouping
SANITIZER_SELECTION = "not orders and not three and not sanitizer and not reports_races and not overruns"


@pytest.mark.skipif(VARIANT != "", reason="this is the run under a sanitizer")
@pytest.mark.parametrize("variant", ["asan", "tsan"])
def test_emu_kernels_under_sanitizer(variant):
    """This file's kernel tests again with the emulator built under a sanitizer, each in a process of its own with
    the runtime preloaded. asan: a kernel that reads or writes outside its tensors, its __shared__ arrays or the
    shared memory it launched with is reported where it happens (compute-sanitizer's memcheck). tsan: two threads
    of a block touching the same bytes, one writing, with no barrier or atomic between them are reported
    (racecheck, for shared and global memory alike; emu_runtime.cpp says how)."""
    r = run_under(variant, ["-m", "pytest", __file__, "-x", "-q", "-p", "no:cacheprovider",
                            "-k", SANITIZER_SELECTION])
    out = r.stdout + r.stderr
    assert "Sanitizer" not in out, out[-6000:]
    assert r.returncode == 0, out[-6000:]
    assert " passed" in out and " failed" not in out


@pytest.mark.skipif(VARIANT != "", reason="this is the run under a sanitizer")
def test_emu_thread_sanitizer_reports_races():
    """The tsan variant's racecheck itself: a thread reading its neighbour's shared slot with no barrier, or with
    only __syncwarp where the neighbour is in the other warp, is reported as a data race in that kernel; with
    __syncthreads, or with atomics on one shared counter, nothing is."""
    for mode, racy in [(0, False), (1, True), (2, True), (3, False)]:
        r = run_under("tsan", ["-c", SELFTEST_SCRIPT.format(emu=str(EMU_DIR), variant="tsan", name="neighbour"),
                               str(mode)])
        out = r.stdout + r.stderr
        if racy:
            assert "ThreadSanitizer: data race" in out and "neighbour_kernel" in out, (mode, out[-3000:])
            assert r.returncode != 0
        else:
            assert "ThreadSanitizer" not in out and r.returncode == 0, (mode, out[-3000:])
            # every thread read its neighbour's value (plus the 64 atomic increments in mode 3)
            assert f"sum {sum(range(64)) + (64 * 64 if mode == 3 else 0):.1f}" in out, (mode, out[-3000:])


@pytest.mark.skipif(VARIANT != "", reason="this is the run under a sanitizer")
def test_emu_address_sanitizer_reports_overruns():
    """The asan variant's memcheck itself: one float read past the shared memory a kernel was launched with, or
    past the end of its input tensor, is reported in that kernel; the same kernel in bounds is clean."""
    for mode, where in [(0, None), (1, "overrun_kernel"), (2, "overrun_kernel")]:
        r = run_under("asan", ["-c", SELFTEST_SCRIPT.format(emu=str(EMU_DIR), variant="asan", name="overrun"),
                               str(mode)])
        out = r.stdout + r.stderr
        if where:
            assert "AddressSanitizer" in out and where in out and r.returncode != 0, (mode, out[-3000:])
        else:
            assert "AddressSanitizer" not in out and r.returncode == 0, (mode, out[-3000:])
            assert f"sum {sum(range(64)):.1f}" in out, (mode, out[-3000:])
