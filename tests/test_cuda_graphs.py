"""Every CUDA op captured in a CUDA graph (the issue: "work under CUDA graphs"): captured once, replayed on new
input written into the captured buffers, and compared with the same calls run eagerly. Skips without a GPU.

What could break capture: a host synchronisation inside an op (the data checks' 4-byte error-flag read, which is
skipped while capturing: cuda_utils.h ErrorFlag), work on a stream other than the current one, or an allocation
the graph pool cannot serve."""
import pytest
import torch

import weightshare as ws

from conftest import DEVICES, cuda_kernels_of

pytestmark = pytest.mark.skipif("cuda" not in DEVICES, reason="needs a GPU and the CUDA kernels")


def capture(fn):
    """fn captured in a CUDA graph after a warm-up on a side stream (as torch.cuda.graphs' documentation asks);
    returns (graph, the captured output)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def replay_matches(fn, inputs, fresh):
    """Capture fn over `inputs` (a list of CUDA tensors), then copy `fresh` into them, replay, and compare with fn
    run eagerly on the fresh values (equal up to float summation order: grad_codebook accumulates with float atomics,
    whose order differs between runs: 3.7e-6 relative on the H200, past assert_close's fp32 default of 1.3e-6)."""
    graph, out = capture(fn)
    for dst, src in zip(inputs, fresh):
        dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    want = fn()
    outs, wants = (out, want) if isinstance(out, tuple) else ((out,), (want,))
    for got, ref in zip(outs, wants):
        torch.testing.assert_close(got, ref, rtol=2e-5, atol=1e-5)


# the GEMV (fp16: the tensor-core GEMV at 8 rows), its split-K form's sizes, panels + cuBLAS above
@pytest.mark.parametrize("M", [1, 8, 40, 300])
@pytest.mark.parametrize("activation", ["float", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_graph_shared_linear(M, activation, dtype):
    g = torch.Generator().manual_seed(0)
    out_f, in_f, bits = 96, 520, 4
    idx = torch.randint(0, 16, (out_f, in_f), generator=g, dtype=torch.uint8)
    packed = ws.ops.pack(idx, bits).cuda()
    cb = (torch.randn(1, 16, generator=g) * 0.1).cuda()
    bias = torch.randn(out_f, generator=g).cuda().to(dtype)
    x = torch.randn(M, in_f, generator=g).cuda().to(dtype)
    fresh = torch.randn(M, in_f, generator=g).cuda().to(dtype)
    replay_matches(lambda: ws.ops.shared_linear(x, packed, cb, bits, out_f, in_f, bias, activation), [x], [fresh])


def test_cuda_graph_shared_linear_backward():
    g = torch.Generator().manual_seed(1)
    out_f, in_f, bits = 64, 200, 3
    packed = ws.ops.pack(torch.randint(0, 8, (out_f, in_f), generator=g, dtype=torch.uint8), bits).cuda()
    cb = torch.randn(4, 8, generator=g).cuda()
    x, grad = torch.randn(24, in_f, generator=g).cuda(), torch.randn(24, out_f, generator=g).cuda()
    fresh = [torch.randn(24, in_f, generator=g).cuda(), torch.randn(24, out_f, generator=g).cuda()]
    replay_matches(lambda: torch.ops.weightshare.shared_linear_backward(grad, x, packed, cb, bits, out_f, in_f,
                                                                         True, True), [x, grad], fresh)


def test_cuda_graph_dequantize_and_conv(monkeypatch):
    # cuDNN's TF32 off: the replay and the eager call are compared closely (the algorithm it picks is the same
    # either way without benchmark mode, but fp32 should mean fp32 here)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    g = torch.Generator().manual_seed(2)
    shape, bits = (16, 8, 3, 3), 4
    packed = ws.ops.pack(torch.randint(0, 16, (16, 72), generator=g, dtype=torch.uint8), bits).cuda()
    cb = torch.randn(1, 16, generator=g).cuda()
    replay_matches(lambda: ws.ops.dequantize(packed, cb, bits, list(shape)), [cb],
                   [torch.randn(1, 16, generator=g).cuda()])
    x = torch.randn(2, 8, 12, 12, generator=g).cuda()
    replay_matches(lambda: ws.ops.shared_conv2d(x, packed, cb, bits, shape, None, 1, 1), [x],
                   [torch.randn(2, 8, 12, 12, generator=g).cuda()])


def test_cuda_graph_assign_pack_and_statistics():
    """The ops whose data checks read an error flag back (NaN weights, indices out of range): they capture, the
    replay computes on new data, and the same calls run eagerly still raise on bad data."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 100, generator=g).cuda()
    cb = torch.sort(torch.randn(1, 16, generator=g)).values.cuda()
    grad, hdiag = torch.randn(64, 100, generator=g).cuda(), torch.rand(64, 100, generator=g).cuda()
    fresh_w = torch.randn(64, 100, generator=g).cuda()
    replay_matches(lambda: ws.ops.assign(w, cb), [w], [fresh_w])
    replay_matches(lambda: ws.ops.loss_aware_assign(w, grad, hdiag, cb), [w], [fresh_w * 2])
    idx = torch.randint(0, 16, (64, 100), generator=g, dtype=torch.uint8).cuda()
    fresh_idx = torch.randint(0, 16, (64, 100), generator=g, dtype=torch.uint8).cuda()
    replay_matches(lambda: ws.ops.pack(idx, 4), [idx], [fresh_idx])
    replay_matches(lambda: ws.ops.kmeans_step(w, idx, 16), [w, idx], [fresh_w, fresh_idx])
    # outside capture the checks run as before
    with pytest.raises(ValueError, match="NaN"):
        ws.ops.assign(torch.full((4, 4), float("nan"), device="cuda"), cb)
    with pytest.raises(ValueError, match="cannot be packed"):
        ws.ops.pack(torch.full((4, 8), 200, dtype=torch.uint8, device="cuda"), 4)


# the fused tensor-core GEMMs (asked for: not yet defaults), with and without their split-K workspace
@pytest.mark.parametrize("kernel", ["fused", "wgmma"])
@pytest.mark.parametrize("shape", [(300, 512), (40, 4096)])
def test_cuda_graph_fused_gemm(kernel, shape, monkeypatch):
    monkeypatch.setenv("WS_CUDA_LINEAR", kernel)
    g = torch.Generator().manual_seed(0)
    (out_f, in_f), bits, M = shape, 4, 70
    idx = torch.randint(0, 16, (out_f, in_f), generator=g, dtype=torch.uint8)
    packed = ws.ops.pack(idx, bits).cuda()
    cb = (torch.randn(1, 16, generator=g) * 0.1).cuda()
    bias = torch.randn(out_f, generator=g).cuda().half()
    x = torch.randn(M, in_f, generator=g).cuda().half()
    fresh = torch.randn(M, in_f, generator=g).cuda().half()
    replay_matches(lambda: ws.ops.shared_linear(x, packed, cb, bits, out_f, in_f, bias), [x], [fresh])


# the implicit-GEMM conv (asked for: not yet a default): its repack, GEMM and split-K finaliser in one graph
@pytest.mark.parametrize("shape", [(64, 64, 3, 3), (512, 512, 3, 3)])
def test_cuda_graph_implicit_gemm_conv(shape, monkeypatch):
    monkeypatch.setenv("WS_CUDA_CONV", "implicit")
    g = torch.Generator().manual_seed(4)
    bits, hw = 4, 7
    idx = torch.randint(0, 16, (shape[0], shape[1] * 9), generator=g, dtype=torch.uint8)
    packed = ws.ops.pack(idx, bits).cuda()
    cb = (torch.randn(1, 16, generator=g) * 0.1).cuda()
    bias = torch.randn(shape[0], generator=g).cuda()

    def image():
        return torch.randn(1, shape[1], hw, hw, generator=g).cuda().half().contiguous(
            memory_format=torch.channels_last)

    x = image()
    _, names = cuda_kernels_of(lambda: ws.ops.shared_conv2d(x, packed, cb, bits, list(shape), bias, 1, 1))
    if names is not None and torch.cuda.get_device_capability() == (9, 0):  # the default build's code: sm_90
        assert any("conv_mma_kernel" in n for n in names)
    replay_matches(lambda: ws.ops.shared_conv2d(x, packed, cb, bits, list(shape), bias, 1, 1), [x], [image()])


# the depthwise conv kernel (asked for: not yet a default), both layouts
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_graph_depthwise_conv(channels_last, monkeypatch):
    monkeypatch.setenv("WS_CUDA_CONV", "depthwise")
    g = torch.Generator().manual_seed(5)
    packed = ws.ops.pack(torch.randint(0, 16, (64, 9), generator=g, dtype=torch.uint8), 4).cuda()
    cb = torch.randn(1, 16, generator=g).cuda()

    def image():
        x = torch.randn(2, 64, 14, 14, generator=g).cuda().half()
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    x = image()
    _, names = cuda_kernels_of(lambda: ws.ops.shared_conv2d(x, packed, cb, 4, [64, 1, 3, 3], None, 1, 1, 1, 64))
    if names is not None:  # the call is our kernel's, so its capture is what this tests
        assert any("depthwise_nhwc_kernel" in n or "depthwise_nchw_kernel" in n for n in names)
    replay_matches(lambda: ws.ops.shared_conv2d(x, packed, cb, 4, [64, 1, 3, 3], None, 1, 1, 1, 64), [x], [image()])
