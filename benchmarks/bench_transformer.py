"""A GPT-2-small-shaped transformer (12 blocks, 768 wide, 12 heads, MLP 3072; built here with random weights, no
download) with every Linear replaced by a 4-bit SharedLinear, against the dense model and torch's int8 dynamic
quantization of it, in one run: one token (decode-shaped: batch 1, the weights streamed once per token) and 128 tokens
(prefill-shaped).

    python benchmarks/bench_transformer.py        # writes benchmarks/results/transformer_cpu.json

Why: the per-layer benchmarks time one 4096-wide layer from cache or with rotated copies; a deployed model is a
stack of layers whose weights (340 MB fp32 here, 42 MB packed at 4 bits) do not fit the cache, plus LayerNorm,
attention and GELU between them. The forward has no KV cache (each call attends over its own tokens): the 1-token
rows measure the weight-streaming part of a decode step, which is what the packed layers change.
"""
from __future__ import annotations

import math
import os
import sys
import warnings

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
import weightshare as ws  # noqa: E402
from _common import parse_cli, cpu_results_name, machine, simd_env, time_interleaved, write_json  # noqa: E402

DIM, HEADS, BLOCKS, BITS = 768, 12, 12, 4
TOKENS = [1, 128]


class Block(nn.Module):
    """GPT-2's block layout with nn.Linear projections (q, k, v fused as c_attn)."""

    def __init__(self) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.c_attn, self.c_proj = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)
        self.fc, self.proj = nn.Linear(DIM, 4 * DIM), nn.Linear(4 * DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=-1)
        heads = lambda y: y.view(b, t, HEADS, d // HEADS).transpose(1, 2)  # noqa: E731
        att = torch.softmax(heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(d // HEADS), dim=-1)
        x = x + self.c_proj((att @ heads(v)).transpose(1, 2).reshape(b, t, d))
        return x + self.proj(torch.nn.functional.gelu(self.fc(self.ln_2(x))))


def build() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(*[Block() for _ in range(BLOCKS)]).eval()
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
    return model


def run() -> dict:
    dense = build()
    shared = build()
    assignments = {name: ws.kmeans(m.weight.detach(), 1 << BITS) for name, m in shared.named_modules()
                   if isinstance(m, nn.Linear)}
    report = ws.replace_layers(shared, assignments)
    shared_int8 = build()
    ws.replace_layers(shared_int8, assignments, activation="int8")
    # the dense reference with the shared weights (so every model computes the same function up to rounding)
    with torch.no_grad():
        for name, m in dense.named_modules():
            if name in assignments:
                m.weight.copy_(assignments[name].codebook[0][assignments[name].idx.long()])
    with warnings.catch_warnings():  # torch deprecates its quantized tensors; still the int8 baseline it ships
        warnings.simplefilter("ignore")
        torch_int8 = torch.ao.quantization.quantize_dynamic(dense, {nn.Linear}, dtype=torch.qint8)
    sizes = {"dense_fp32_mb": sum(p.numel() * 4 for p in dense.parameters()) / 2**20,
             "shared_file_mb": ws.size_report(shared, entropy_coding=False).file_bytes / 2**20}
    out = {"machine": machine(), "simd_caps": simd_env(), "shape": {"dim": DIM, "heads": HEADS, "blocks": BLOCKS,
           "bits": BITS}, "replaced": len(report.replaced), "sizes": sizes, "rows": []}
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in TOKENS:
            x = torch.randn(1, t, DIM, generator=gen)
            ref = dense(x)
            err = {name: float((m(x) - ref).norm() / ref.norm())
                   for name, m in (("shared", shared), ("shared_int8", shared_int8), ("torch_int8", torch_int8))}
            times = time_interleaved([lambda: dense(x), lambda: shared(x), lambda: shared_int8(x),
                                      lambda: torch_int8(x)], repeat=20 if t == 1 else 8)
            row = {"tokens": t, "dense_ms": times[0] * 1e3, "shared_ms": times[1] * 1e3,
                   "shared_int8_ms": times[2] * 1e3, "torch_int8_ms": times[3] * 1e3,
                   "rel_error": err}
            out["rows"].append(row)
            print(f"{t:4d} tokens: dense {row['dense_ms']:.2f} ms | shared {row['shared_ms']:.2f} ms "
                  f"({row['dense_ms'] / row['shared_ms']:.2f}x) | shared int8 {row['shared_int8_ms']:.2f} ms "
                  f"({row['dense_ms'] / row['shared_int8_ms']:.2f}x) | torch int8 {row['torch_int8_ms']:.2f} ms "
                  f"({row['dense_ms'] / row['torch_int8_ms']:.2f}x) | rel. error {err}", flush=True)
    return out


if __name__ == "__main__":
    parse_cli(__doc__)
    print(write_json(cpu_results_name("transformer_cpu"), run()))
