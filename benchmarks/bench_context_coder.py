"""Index-stream coding of pruned layers: bytes and speed of the context-adaptive coder (ops.context_encode)
against static rANS (weightshare.entropy) and bit packing, and the Shannon bound of independent symbols, on the
layers of the sparsest committed pruned checkpoint (checkpoints/pruned/; a magnitude-pruned copy of the dense
checkpoint at 5 % density where none is committed). Each layer's surviving weights get a 15-entry k-means
codebook plus the exact zero (4-bit indices, as the demo's k-means files).

    python benchmarks/bench_context_coder.py      # writes benchmarks/results/context_coder_cpu.json
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
import weightshare as ws  # noqa: E402
from weightshare import entropy  # noqa: E402
from weightshare.compress.layers import compressible_layers  # noqa: E402
from weightshare.formats import packed_row_bytes  # noqa: E402
from weightshare.train import load_checkpoint  # noqa: E402
from _common import parse_cli, machine, time_cpu, write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
K = 16


def pruned_model(name: str):
    committed = sorted((REPO / "checkpoints" / "pruned").glob(f"{name}-d*.safetensors"))
    if committed:  # the sparsest (names sort by density)
        return load_checkpoint(committed[0], expected_model=name), str(committed[0].relative_to(REPO))
    from weightshare.compress.prune import global_masks, weight_scores
    model = load_checkpoint(REPO / "checkpoints" / f"{name}.safetensors", expected_model=name)
    scores = weight_scores(model, "magnitude", None, None)
    masks = global_masks(scores, {n: torch.ones_like(s, dtype=torch.bool) for n, s in scores.items()}, 0.05, 0.01)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for n, m in masks.items():
            modules[n].weight.mul_(m)
    return model, f"checkpoints/{name}.safetensors magnitude-pruned to 5 %"


def layer_indices(weight: torch.Tensor) -> torch.Tensor:
    """0 for the pruned weights, 1..15 the nearest of a k-means codebook of the survivors."""
    w = weight.reshape(weight.shape[0], -1)
    idx = torch.zeros(w.shape, dtype=torch.uint8)
    alive = w != 0
    if alive.any():
        fit = ws.kmeans(w[alive].contiguous(), K - 1)
        idx[alive] = fit.idx.to(torch.uint8) + 1
    return idx.contiguous()


def main() -> None:
    rows = []
    for name in ("lenet300100", "lenet5"):
        model, source = pruned_model(name)
        for layer in compressible_layers(model):
            idx = layer_indices(layer.weight)
            flat = idx.reshape(-1)
            context = ws.ops.context_encode(idx, K)
            rans = entropy.encode(flat, K)
            assert torch.equal(ws.ops.context_decode(context, *idx.shape, K), idx)
            row = {
                "model": name, "source": source, "layer": layer.name, "shape": list(idx.shape),
                "density": float((idx != 0).float().mean()),
                "packed_bytes": idx.shape[0] * packed_row_bytes(idx.shape[1], 4),
                "shannon_bytes": entropy.entropy_bits(flat) / 8, "rans_bytes": rans.numel(),
                "context_bytes": context.numel(),
                "context_encode_ms": 1e3 * time_cpu(lambda: ws.ops.context_encode(idx, K)),
                "context_decode_ms": 1e3 * time_cpu(lambda: ws.ops.context_decode(context, *idx.shape, K)),
                "rans_encode_ms": 1e3 * time_cpu(lambda: entropy.encode(flat, K), repeat=5),
                "rans_decode_ms": 1e3 * time_cpu(lambda: entropy.decode(rans, flat.numel(), K), repeat=5),
            }
            row["context_vs_rans"] = row["context_bytes"] / row["rans_bytes"]
            rows.append(row)
            print(f"{name:12s} {layer.name:6s} density {row['density']:.4f}: packed {row['packed_bytes']:7d} B, "
                  f"Shannon {row['shannon_bytes']:8.0f} B, rANS {row['rans_bytes']:6d} B, context "
                  f"{row['context_bytes']:6d} B ({row['context_vs_rans']:.3f}x rANS); context enc/dec "
                  f"{row['context_encode_ms']:.2f}/{row['context_decode_ms']:.2f} ms, rANS "
                  f"{row['rans_encode_ms']:.1f}/{row['rans_decode_ms']:.1f} ms", flush=True)
    totals = {m: {key: sum(r[key] for r in rows if r["model"] == m) for key in ("rans_bytes", "context_bytes",
                                                                                  "shannon_bytes")}
              for m in ("lenet300100", "lenet5")}
    for m, t in totals.items():
        t["context_vs_rans"] = t["context_bytes"] / t["rans_bytes"]
        print(f"{m}: all layers, context {t['context_bytes']} B vs rANS {t['rans_bytes']} B "
              f"({t['context_vs_rans']:.3f}x)")
    print(write_json("context_coder_cpu.json", {"machine": machine(), "k": K, "rows": rows, "totals": totals}))


if __name__ == "__main__":
    parse_cli(__doc__)
    main()
