"""Markdown tables for README and docs/ from the JSON results (benchmarks/results/*.json and a demo's summary.json).

    python benchmarks/report.py [--demo out/demo/summary.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from _common import error_point  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _load(name):
    p = RESULTS / name
    return json.loads(p.read_text()) if p.exists() else None


def _machine(m):
    isa = f" ({m['isa']})" if m.get("isa") else ""
    return f"{m['cpu']}{isa}, {m['cores']} cores, torch {m['torch']}, {m['date']}"


def assign_table(r):
    out = [f"Assignment, N = 2^24 fp32 weights ({_machine(r['machine'])}; copy bandwidth in the same run "
           f"{r['copy_gbps']:.1f} GB/s)", "",
           "| k | path | ws.ops.assign | GB/s | vs torch.bucketize | vs naive argmin |", "|---|---|---|---|---|---|"]
    for row in r["results"]:
        for path, p in row["paths"].items():
            out.append(f"| {row['k']} | {path} | {p['ms']:.2f} ms | {p['gbps']:.1f} "
                       f"({100 * p['fraction_of_copy_gbps']:.0f}% of copy) | {p['speedup_vs_bucketize']:.1f}x "
                       f"({row['bucketize_ms']:.0f} ms) | {p['speedup_vs_naive']:.0f}x |")
    return "\n".join(out)


def kmeans_table(r):
    out = [f"1-D k-means, N = 2^{int(r['n']).bit_length() - 1} N(0,1) weights, k = {r['k']} "
           f"({_machine(r['machine'])})", "", "| method | settings | time | distortion | full passes |",
           "|---|---|---|---|---|"]
    for row in r["rows"]:
        out.append(f"| {row['method']} | {row['settings']} | {row['seconds']:.2f} s | {row['distortion']:.1f} | "
                   f"{row['full_passes'] if row['full_passes'] is not None else ''} |")
    return "\n".join(out)


def _caps(r):
    caps = r.get("simd_caps") or {}
    return "; " + " ".join(f"{k}={v}" for k, v in caps.items()) if caps else ""


def linear_table(r):
    out = [f"Shared Linear, {r['bits']}-bit indices, per-layer codebook, fp32 in/out ({_machine(r['machine'])}"
           f"{_caps(r)})", "",
           "| layer | batch | weights from | dense fp32 | ws float | speed-up | ws int8 | torch int8 dynamic | "
           "int8 speed-up | int8 error (ws / torch) |", "|---|---|---|---|---|---|---|---|---|---|"]
    naive = all("dequantize_then_linear_ms" in x for x in r["results"])  # runs from 2026-12-01 on
    if naive:
        out[2] += " dequantize + F.linear | ws float vs it |"
        out[3] += "---|---|"
    regimes = {"cache": "cache (one layer, repeated)", "dram": "DRAM (rotating copies, 2x L3)"}
    for x in r["results"]:
        out.append(f"| {x['shape'][0]}x{x['shape'][1]} | {x['batch']} | {regimes[x.get('regime', 'cache')]} | "
                   f"{x['dense_fp32_ms']:.3f} ms | "
                   f"{x['ws_float_ms']:.3f} ms | {x['ws_float_speedup_vs_dense']:.2f}x | {x['ws_int8_ms']:.3f} ms | "
                   f"{x['torch_int8_dynamic_ms']:.3f} ms | {x['ws_int8_speedup_vs_torch_int8_dynamic']:.2f}x | "
                   f"{x['ws_int8_rel_err']:.2e} / {x['torch_int8_dynamic_rel_err']:.2e} |"
                   + (f" {x['dequantize_then_linear_ms']:.3f} ms | "
                      f"{x['ws_float_speedup_vs_dequantize_then_linear']:.2f}x |" if naive else ""))
    return "\n".join(out)


def int8_accuracy_table(r):
    """Rows: index width; columns: kind of input; cells: median / worst of the error ratio over the draws."""
    kinds = list(dict.fromkeys(x["input"] for x in r["results"]))
    out = [f"int8 output error / torch int8 dynamic Linear's, {r['shape'][0]}x{r['shape'][1]}, {r['draws']} layers "
           f"per cell (median / worst; {_machine(r['machine'])})", "",
           "| bits | " + " | ".join(f"{k} x" for k in kinds) + " |", "|---|" + "---|" * len(kinds)]
    for bits in dict.fromkeys(x["bits"] for x in r["results"]):
        cells = {x["input"]: x for x in r["results"] if x["bits"] == bits}
        out.append(f"| {bits} | " + " | ".join(f"{cells[k]['median_ratio']:.2f}x / {cells[k]['worst_ratio']:.2f}x"
                                               for k in kinds) + " |")
    return "\n".join(out)


def int8_models_table(r):
    """One row per saved model: test error and logits error, float / int8 activations / torch's int8 dynamic."""
    out = [f"Compressed MNIST networks with int8 activations, 10,000 test images ({_machine(r['machine'])})", "",
           "| model file | test error, float | int8 (ws) | torch int8 dynamic | logits error, int8 (ws) | "
           "torch int8 dynamic |", "|---|---|---|---|---|---|"]
    for x in r["results"]:
        out.append(f"| {x['file']} | {x['test_error_float']:.2f}% | {x['test_error_int8']:.2f}% | "
                   f"{x['test_error_torch_int8']:.2f}% | {x['logits_err_int8']:.2e} | {x['logits_err_torch_int8']:.2e} |")
    return "\n".join(out)


def widths_table(r):
    """One row per width: batch 1 and 64, per-layer and per-row codebooks, float (vs dense) and int8 (vs torch)."""
    base = r["baselines"]
    out = [f"Shared Linear {r['shape'][0]}x{r['shape'][1]} at every index width ({_machine(r['machine'])}{_caps(r)}; "
           f"dense fp32 {base['1']['dense_fp32_ms']:.3f} / {base['64']['dense_fp32_ms']:.3f} ms and torch int8 "
           f"dynamic {base['1']['torch_int8_dynamic_ms']:.3f} / {base['64']['torch_int8_dynamic_ms']:.3f} ms at batch "
           "1 / 64; cells: time (ratio))", "",
           "| bits | codebooks | float, batch 1 (x dense) | float, batch 64 | int8, batch 1 (x torch int8) | "
           "int8, batch 64 | int8, batch 1, weights from DRAM |", "|---|---|---|---|---|---|---|"]
    if "torch_int8_dynamic_dram_ms" in base["1"]:
        out[0] = out[0][:-1] + f"; from DRAM torch int8 {base['1']['torch_int8_dynamic_dram_ms']:.3f} ms)"
    cells = {}
    for x in r["rows"]:
        cells.setdefault((x["bits"], x["codebooks"]), {})[x["batch"]] = x
    for (bits, cbs), c in cells.items():
        f = " | ".join(f"{c[M]['ws_float_ms']:.3f} ms ({c[M]['float_speedup_vs_dense']:.2f}x)" for M in (1, 64))
        i = " | ".join(f"{c[M]['ws_int8_ms']:.3f} ms ({c[M]['int8_speedup_vs_torch_int8']:.2f}x)" for M in (1, 64))
        d = (f"{c[1]['ws_int8_dram_ms']:.3f} ms ({c[1]['int8_dram_speedup_vs_torch_int8']:.2f}x)"
             if "ws_int8_dram_ms" in c[1] else "")
        out.append(f"| {bits} | {cbs} | {f} | {i} | {d} |")
    return "\n".join(out)


def small_layers_table(r):
    """Per-call microseconds of small layers at batch 1, the whole LeNet-300-100, and one training step; the int8
    path against torch's int8 dynamic Linear where the run measured it (since session 25)."""
    int8 = "ws.ops.shared_linear_int8_us" in (r["layers"] or [{}])[0]
    i8_head = " ws int8 | torch int8 dynamic | torch int8 / ws int8 |" if int8 else ""
    out = [f"Small layers, per call ({_machine(r['machine'])}{_caps(r)}; microseconds, median of rounds)", "",
           "| layer | bits | F.linear | nn.Linear | ws.ops.shared_linear | SharedLinear | nn.Linear / SharedLinear |"
           + i8_head, "|---|---|---|---|---|---|---|" + ("---|---|---|" if int8 else "")]
    for x in r["layers"]:
        i8 = (f" {x['ws.ops.shared_linear_int8_us']:.2f} | {x['torch_int8_dynamic_us']:.2f} | "
              f"{x['int8_ratio_vs_torch_int8']:.2f}x |") if int8 else ""
        out.append(f"| {x['shape'][0]}x{x['shape'][1]}, batch 1 | {x['bits']} | {x['F.linear_us']:.2f} | "
                   f"{x['nn.Linear_us']:.2f} | {x['ws.ops.shared_linear_us']:.2f} | {x['SharedLinear_us']:.2f} | "
                   f"{x['module_ratio']:.2f}x |" + i8)
    for x in r["model"]:
        i8 = (f" {x['shared_int8_us']:.2f} | {x['torch_int8_us']:.2f} | {x['int8_ratio_vs_torch_int8']:.2f}x |"
              if int8 else "")
        out.append(f"| {x['model']}, batch {x['batch']} | {x['bits']} |  | {x['dense_us']:.2f} |  | "
                   f"{x['shared_us']:.2f} | {x['ratio']:.2f}x |" + i8)
    for x in r["training"]:
        out.append(f"| {x['shape'][0]}x{x['shape'][1]}, forward + backward, batch {x['batch']} | {x['bits']} |  | "
                   f"{x['dense_us']:.1f} |  | {x['shared_us']:.1f} | {x['ratio']:.2f}x |" + ("  |  |  |" if int8 else ""))
    return "\n".join(out)


def transformer_table(r):
    """The GPT-2-small-shaped stack: dense, shared (float / int8 activations), torch int8, per token count."""
    sh, sz = r["shape"], r["sizes"]
    out = [f"Transformer, {sh['blocks']} GPT-2-small blocks ({sh['dim']} wide, MLP {4 * sh['dim']}), every Linear "
           f"shared at {sh['bits']} bits ({_machine(r['machine'])}{_caps(r)}; weights {sz['dense_fp32_mb']:.0f} MB "
           f"fp32, file {sz['shared_file_mb']:.1f} MB)", "",
           "| tokens | dense fp32 | shared, float | shared, int8 activations | torch int8 dynamic | "
           "rel. error (float / int8 / torch int8) |", "|---|---|---|---|---|---|"]
    for x in r["rows"]:
        d, e = x["dense_ms"], x["rel_error"]
        out.append(f"| {x['tokens']} | {d:.2f} ms | {x['shared_ms']:.2f} ms ({d / x['shared_ms']:.2f}x) | "
                   f"{x['shared_int8_ms']:.2f} ms ({d / x['shared_int8_ms']:.2f}x) | {x['torch_int8_ms']:.2f} ms "
                   f"({d / x['torch_int8_ms']:.2f}x) | {e['shared']:.1e} / {e['shared_int8']:.1e} / "
                   f"{e['torch_int8']:.1e} |")
    return "\n".join(out)


def resnet_table(r):
    """ResNet-18 with every conv and the classifier shared: whole model and per stage, dense vs shared."""
    sz = r["sizes"]
    out = [f"ResNet-18, 224x224, every Conv2d and the classifier shared at {r['bits']} bits ({_machine(r['machine'])}"
           f"{_caps(r)}; weights {sz['dense_fp32_mb']:.1f} MB fp32, file {sz['shared_file_mb']:.1f} MB); per stage "
           "dense / shared ms", "",
           "| batch | dense fp32 | shared | rel. error | stem | 56x56 | 28x28 | 14x14 | 7x7 | head |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        d = x["dense_ms"]
        stages = " | ".join(f"{a:.2f} / {b:.2f}" for a, b in zip(x["stage_dense_ms"], x["stage_shared_ms"]))
        out.append(f"| {x['batch']} | {d:.2f} ms | {x['shared_ms']:.2f} ms ({d / x['shared_ms']:.2f}x) | "
                   f"{x['rel_error']:.1e} | {stages} |")
    return "\n".join(out)


def memory_table(r):
    """Resident memory of each model, dense against shared loaded into a meta-device skeleton (bench_memory.py)."""
    out = [f"Memory of a deployed model at {r['bits']} bits ({_machine(r['machine'])}); resident MiB above the "
           "process's baseline, the shared model loaded from its file into a meta-device skeleton; forward peaks over "
           "the inputs (GPT-2 stack: 1 and 128 tokens; ResNet-18: one 224x224 image)", "",
           "| model | file | dense: model | dense: forward peak | shared: model (its tensors) | shared: load peak | "
           "shared: forward peak |", "|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        d, s = x["dense"], x["shared"]
        out.append(f"| {x['model']} | {x['file_mb']:.1f} | {d['model_mb']:.1f} | {d['forward_peak_mb']:.1f} | "
                   f"{s['model_mb']:.1f} ({s['tensor_mb']:.1f}) | {s['load_peak_mb']:.1f} | "
                   f"{s['forward_peak_mb']:.1f} |")
    return "\n".join(out)


def conv_table(r):
    offsets = r.get("offsets")
    head = f"Shared Conv2d, {r['bits']}-bit, batch 1, fp32 ({_machine(r['machine'])}{_caps(r)})"
    if not offsets:  # files from before the placement sweep
        out = [head, "", "| conv | dense F.conv2d | ws.ops.shared_conv2d | speed vs dense |", "|---|---|---|---|"]
        for x in r["results"]:
            out.append(f"| {x['conv']} | {x['dense_fp32_ms']:.3f} ms | {x['ws_ms']:.3f} ms | "
                       f"{x['ws_speed_vs_dense']:.2f}x |")
        return "\n".join(out)
    out = [head + f"; each at its best of {len(offsets)} input placements, the range in brackets", "",
           "| conv | dense F.conv2d | ws.ops.shared_conv2d | speed vs dense | ws as decode + oneDNN |",
           "|---|---|---|---|---|"]

    def cell(best, values):
        return f"{best:.3f} ms ({min(values):.3f}-{max(values):.3f})"
    for x in r["results"]:
        by = x["ms_by_offset"]
        out.append(f"| {x['conv']} | {cell(x['dense_fp32_ms'], by['dense'])} | {cell(x['ws_ms'], by['ws'])} | "
                   f"{x['ws_speed_vs_dense']:.2f}x | {cell(x['ws_decode_onednn_ms'], by['decode_onednn'])} |")
    return "\n".join(out)


def ops_table(r):
    out = [f"Other ops, {r['shape'][0]}x{r['shape'][1]} weights, {r['bits']}-bit, k = {r['k']} ({_machine(r['machine'])}; "
           "plain PyTorch = the reference formulas, broadcast ones timed on a slice and scaled)", "",
           "| op | ws | plain PyTorch | speed-up |", "|---|---|---|---|"]
    for x in r["results"]:
        out.append(f"| {x['op']} | {x['ws_ms']:.2f} ms | {x['pytorch_ms']:.1f} ms | {x['speedup']:.1f}x |")
    return "\n".join(out)


def cuda_linear_table(r):
    """The CUDA shared_linear against cuBLAS on the dequantised weight: the default path's time and each path timed
    with its switch (the SIMT GEMV, the tensor-core GEMV, decoded panels + cuBLAS, the tile kernel, the fused
    tensor-core GEMMs where the run has them), plus int8."""
    m = r["machine"]
    out = [f"Shared Linear on the GPU, fp16 x, per-layer codebook ({m.get('gpu', 'GPU')}, torch {m['torch']}, "
           f"{m['date']}; {r['protocol']})", "",
           "| layer | bits | batch | cuBLAS fp16 | ws default | SIMT GEMV | tensor-core GEMV | panels + cuBLAS | "
           "tiles | ws int8 |", "|---|---|---|---|---|---|---|---|---|---|"]
    names = ["simt", "mma", "panels", "tiles", "int8"]
    for name, title in (("fused", "fused GEMM"), ("wgmma", "fused GEMM, wgmma"),  # where the run has them
                        ("wgmma_drain", "wgmma, draining units")):
        if any(f"ws_{name}_ms" in x for x in r["results"]):
            out[2] = out[2].replace(" ws int8 |", f" {title} | ws int8 |")
            out[3] += "---|"
            names.insert(len(names) - 1, name)

    def cell(x, name):
        ms, speedup = x.get(f"ws_{name}_ms"), x.get(f"{name}_speedup_vs_cublas")
        return f"{ms:.4f} ms ({speedup:.2f}x)" if ms is not None else ""
    for x in r["results"]:
        out.append(f"| {x['shape'][0]}x{x['shape'][1]} | {x['bits']} | {x['batch']} | {x['cublas_fp16_ms']:.4f} ms | "
                   f"{x['ws_ms']:.4f} ms ({x['speedup_vs_cublas']:.2f}x) | " +
                   " | ".join(cell(x, name) for name in names) + " |")
    return "\n".join(out)


def cuda_conv_table(r):
    """The CUDA shared_conv2d against cuDNN: decode + cuDNN on the input as listed, and where the run has them our
    depthwise kernel on that input, and both again on channels-last x with ours by the implicit GEMM."""
    m = r["machine"]
    columns = [(key, title, base, speed) for key, title, base, speed in (
        ("ws_depthwise_ms", "ws depthwise kernel", None, "depthwise_speed_vs_cudnn"),
        ("ws_implicit_ms", "ws implicit GEMM, channels-last", "cudnn_channels_last_ms",
         "implicit_speed_vs_cudnn_channels_last")) if any(key in x for x in r["results"])]
    head = "| conv | batch | cuDNN | ws (decode + cuDNN) |"
    for key, title, base, _ in columns:
        head += (" cuDNN, channels-last |" if base else "") + f" {title} |"
    out = [f"Shared Conv2d on the GPU, {r['bits']}-bit, fp16 ({m.get('gpu', 'GPU')}, torch {m['torch']}, {m['date']}; "
           "CUDA graphs)", "", head, "|---" * head.count(" |") + "|"]
    for x in r["results"]:
        row = (f"| {x['conv']} | {x['batch']} | {x['cudnn_fp16_ms']:.4f} ms | {x['ws_ms']:.4f} ms "
               f"({x['ws_speed_vs_cudnn']:.2f}x) |")
        for key, _, base, speed in columns:
            if base:
                row += f" {x[base]:.4f} ms |" if base in x else " |"
            row += f" {x[key]:.4f} ms ({x[speed]:.2f}x) |" if key in x else " |"
        out.append(row)
    return "\n".join(out)


def demo_table(records):
    out = ["| model | method | validation error (dense -> file; the constraint) | baseline test error | test error | "
           "compression ratio (file) | file bytes | bits per layer | batch-1 dense / compressed |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        bits = "/".join(str(l["bits"]) for l in r["layers"])
        fixed = ("" if r.get("bits") is None else
                 f" (bits {r['bits']})" if "=" in str(r["bits"]) else f" ({r['bits']} bits)")
        if r.get("pruned_density") is not None:  # pruned runs: which candidate met the constraint
            d = r["pruned_density"]
            fixed += (f" ({100 * d:.3g}% of weights kept" + (
                f"; pruned, unquantised: val {100 * r['pruned_val_error']:.2f}%, test "
                f"{100 * r['pruned_test_error']:.2f}%" if r.get("pruned_test_error") is not None else "") + ")"
                if d < 1 else " (no pruned candidate met it: dense network)")
        val = (f"{100 * r['baseline_val_error']:.2f} -> {100 * r['val_error']:.2f}%"
               if r.get("val_error") is not None and r.get("baseline_val_error") is not None else "")
        if r.get("constraint_met") is False:
            val += " (not met: the closest attempt)"
        out.append(f"| {r['model']} | {r['method']}{fixed} | {val} | "
                   f"{100 * r['baseline_test_error']:.2f}% | {100 * r['test_error']:.2f}% | "
                   f"{r['compression_ratio']:.1f}x | {r['file_bytes']:,} | {bits} | "
                   f"{r['batch1_ms_dense']:.3f} / {r['batch1_ms_compressed']:.3f} ms |")
    return "\n".join(out)


def qat_table(r):
    """Pruned networks retrained with shared weights (bench_qat.py): every density x bit configuration."""
    out = [f"{r['model']}: pruned + trained sharing, {r['recipe']['epochs']} epochs at lr {r['recipe']['lr']}, "
           f"distillation {r['recipe']['distill']} (dense val {100 * r['baseline_val_error']:.2f}%, test "
           f"{100 * r['baseline_test_error']:.2f}%; {_machine(r['machine'])})", "",
           "| weights kept | pruned val / test error | bits | seed | val error | test error | compression ratio (file) | "
           "file bytes | index / codebook / bias / header bytes |", "|---|---|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        parts = [sum(l[key] for l in x["layers"]) for key in ("index_bytes", "codebook_bytes", "bias_bytes")]
        out.append(f"| {100 * x['density']:.2f}% | {100 * x['pruned_val_error']:.2f} / "
                   f"{100 * x['pruned_test_error']:.2f}% | {x['config']} | {x.get('seed', 0)} | "
                   f"{100 * x['val_error']:.2f}% | "
                   f"{100 * x['test_error']:.2f}% | {x['compression_ratio']:.1f}x | {x['file_bytes']:,} | "
                   f"{' / '.join(f'{v:,}' for v in parts)} / {x['overhead_bytes']:,} |")
    return "\n".join(out)


def pruned_table(r):
    """Every step of a long pruning run (prune_checkpoints.py) and which networks it kept."""
    kept = {c["density"] for c in r["chosen"]}
    out = [f"{r['model']}: {r['recipe']['epochs']} epochs a step, lr {r['recipe']['lr']}, floors "
           f"{r['layer_floors']} ({_machine(r['machine'])}, {r['seconds']:.0f} s)", "",
           "| density | val error | test error | per-layer density | kept |", "|---|---|---|---|---|"]
    for x in r["steps"]:
        layers = ", ".join(f"{k} {100 * v:.1f}%" for k, v in x["layer_density"].items())
        out.append(f"| {100 * x['density']:.2f}% | {100 * x['val_error']:.2f}% | {100 * x['test_error']:.2f}% | "
                   f"{layers} | {'yes' if x['density'] in kept else ''} |")
    return "\n".join(out)


def context_coder_table(r):
    out = [f"Index streams of pruned layers, 4-bit (k-means, 15 values + zero) ({_machine(r['machine'])})", "",
           "| model | layer | density | packed | Shannon bound (independent) | static rANS | context coder | "
           "context / rANS | context enc / dec |", "|---|---|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        out.append(f"| {x['model']} | {x['layer']} | {100 * x['density']:.2f}% | {x['packed_bytes']:,} B | "
                   f"{x['shannon_bytes']:,.0f} B | {x['rans_bytes']:,} B | {x['context_bytes']:,} B | "
                   f"{x['context_vs_rans']:.3f} | {x['context_encode_ms']:.2f} / {x['context_decode_ms']:.2f} ms |")
    return "\n".join(out)


def hashednets_table(r):
    """HashedNets trained at each compression factor: counted ratio, validation and test error."""
    out = [f"{r['model']}: HashedNets (Chen et al. 2015), trained buckets, {r['epochs']} epochs at lr {r['lr']}, "
           f"distillation {r['distill']} (baseline val {100 * r['baseline_val_error']:.2f}%, test "
           f"{100 * r['baseline_test_error']:.2f}%; {_machine(r['machine'])})", "",
           "| factor | stored bytes (counted) | compression ratio | val error (projected -> trained) | test error |",
           "|---|---|---|---|---|"]
    for x in r["rows"]:
        out.append(f"| 1/{x['factor']:g} | {x['stored_bytes']:,} | {x['compression_ratio']:.1f}x | "
                   f"{100 * x['projected_val_error']:.1f}% -> {100 * x['val_error']:.2f}% | "
                   f"{100 * x['test_error']:.2f}% |")
    return "\n".join(out)


def _seeds_cell(rows):
    """"ratio / test error" of rows measured at one setting, the mean over seeds, with the min-max of the error when
    there are several."""
    ratio, mean, minus, plus = error_point(rows)
    cell = f"{ratio:.1f}x / {mean:.2f}%"
    return cell + (f" ({mean - minus:.2f}-{mean + plus:.2f})" if len(rows) > 1 else "")


def _recipe(retrain) -> str:
    if not retrain:
        return "?"
    text = f"{retrain['epochs']} epochs at lr {retrain['lr']}"
    if retrain.get("ramp"):
        text += f", ramped over {retrain['ramp']:.0%} of the step"
    if retrain.get("distill"):
        text += f", distilled ({retrain['distill']}, T={retrain.get('temperature', 2.0)})"
    return text


def prune_curve_table(r):
    """Rows: pruning x quantiser x bits; columns: the pruning chain's densities; cells: file ratio / test error,
    the mean over the seeds with the min..max of the test error when there are several."""
    dens = sorted({x["target_density"] for x in r["rows"]}, reverse=True)
    seeds = r.get("seeds", [r.get("seed", 0)])
    out = [f"{r['model']}, pruning + retraining + weight sharing, seeds {seeds} (baseline test error "
           f"{100 * r['baseline_test_error']:.2f}%, val {100 * r['baseline_val_error']:.2f}%; "
           f"{_machine(r['machine'])}; "
           f"retraining per step: {_recipe(r.get('retrain'))}). "
           "Cells: compression ratio of the saved file / test error" + (" (mean, min-max over seeds)" if len(seeds) > 1
                                                                        else "") +
           "; **bold** = no increase of validation error (every seed).", "",
           "| pruning | quantiser | bits | " + " | ".join(f"{100 * d:.1f}% kept" for d in dens) + " |",
           "|---|---|---|" + "---|" * len(dens)]
    keys = []
    for x in r["rows"]:
        k = (x["pipeline"], x["saliency"], x["method"], x["bits"])
        if k not in keys:
            keys.append(k)
    for k in keys:
        cells = []
        for d in dens:
            xs = [x for x in r["rows"] if (x["pipeline"], x["saliency"], x["method"], x["bits"]) == k
                  and x["target_density"] == d]
            if not xs:
                cells.append("")
                continue
            cell = _seeds_cell(xs)
            cells.append(f"**{cell}**" if all(x["zero_val_drop"] for x in xs) else cell)
        out.append(f"| {k[1]} ({k[0]}) | {k[2]} | {k[3]} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def methods_curve_table(r):
    """Rows: model x method; columns: fixed bit widths; cells: file ratio / test error, mean (min-max) over seeds."""
    out = [f"Every method at fixed bits, no pruning, seeds {r['seeds']} ({_machine(r['machine'])}). Cells: compression "
           "ratio of the saved file / test error, mean (min-max over seeds).", "",
           "| model | method | " + " | ".join(f"{b} bits" for b in r["bits"]) + " |",
           "|---|---|" + "---|" * len(r["bits"])]
    keys = []
    for x in r["rows"]:
        if (x["model"], x["method"]) not in keys:
            keys.append((x["model"], x["method"]))
    for model, method in keys:
        cells = []
        for b in r["bits"]:
            xs = [x for x in r["rows"] if (x["model"], x["method"], x["bits"]) == (model, method, b)]
            if not xs:
                cells.append("")
                continue
            cells.append(_seeds_cell(xs))
        base = 100 * r["baseline_test_error"][model]
        out.append(f"| {model} ({base:.2f}%) | {method} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", default=None, help="a demo summary.json")
    args = ap.parse_args()
    for name, fn in (("assign_cpu.json", assign_table), ("kmeans_cpu.json", kmeans_table),
                     ("shared_linear_cpu.json", linear_table), ("shared_linear_cpu_avx2.json", linear_table),
                     ("int8_accuracy.json", int8_accuracy_table), ("int8_models.json", int8_models_table),
                     ("linear_widths_cpu.json", widths_table), ("linear_widths_cpu_avx2.json", widths_table),
                     ("shared_linear_cpu_intel.json", linear_table), ("shared_linear_cpu_avx2_intel.json", linear_table),
                     ("shared_linear_cpu_avx2vnni_intel.json", linear_table),
                     ("transformer_cpu_intel.json", transformer_table),
                     ("transformer_cpu_avx2_intel.json", transformer_table),
                     ("resnet18_cpu_intel.json", resnet_table), ("resnet18_cpu_avx2_intel.json", resnet_table),
                     ("shared_conv_cpu_intel.json", conv_table), ("shared_conv_cpu_avx2_intel.json", conv_table),
                     ("linear_widths_cpu_intel.json", widths_table),
                     ("linear_widths_cpu_avx2_intel.json", widths_table),
                     ("linear_widths_cpu_avx2vnni_intel.json", widths_table),
                     # the issues' own machine: an AVX2-only AMD EPYC (Zen 3), 2 cores
                     ("shared_linear_cpu_zen3.json", linear_table), ("linear_widths_cpu_zen3.json", widths_table),
                     ("shared_conv_cpu_zen3.json", conv_table), ("transformer_cpu_zen3.json", transformer_table),
                     ("resnet18_cpu_zen3.json", resnet_table),
                     ("small_layers_cpu.json", small_layers_table), ("small_layers_cpu_avx2.json", small_layers_table), ("transformer_cpu.json", transformer_table),
                     ("transformer_cpu_avx2.json", transformer_table),
                     ("shared_conv_cpu.json", conv_table), ("shared_conv_cpu_avx2.json", conv_table),
                     ("ops_cpu.json", ops_table), ("prune_curve_lenet300100.json", prune_curve_table),
                     ("prune_curve_lenet5.json", prune_curve_table),
                     ("prune_curve_lenet300100_ramped.json", prune_curve_table),
                     ("prune_curve_lenet5_ramped.json", prune_curve_table), ("methods_curve.json", methods_curve_table),
                     ("hashednets_lenet300100.json", hashednets_table), ("pruned_lenet300100.json", pruned_table),
                     ("pruned_lenet5.json", pruned_table), ("qat_lenet300100.json", qat_table),
                     ("qat_lenet5.json", qat_table), ("qat_lenet300100_seeds.json", qat_table),
                     ("qat_lenet5_seeds.json", qat_table), ("qat_lenet5_mixed.json", qat_table),
                     ("qat_lenet300100_mixed.json", qat_table), ("qat_lenet300100_uniform.json", qat_table),
                     ("pruned_lenet300100_f085.json", pruned_table), ("qat_lenet300100_gradual.json", qat_table),
                     ("pruned_lenet300100_e60.json", pruned_table), ("qat_lenet300100_e60.json", qat_table),
                     ("context_coder_cpu.json", context_coder_table), ("memory_cpu.json", memory_table),
                     ("gpu/2026-11-30-H200/shared_linear_cuda.json", cuda_linear_table),
                     ("gpu/2026-11-30-H200/shared_conv_cuda.json", cuda_conv_table)):
        r = _load(name)
        if r:
            print(fn(r), end="\n\n")
    if args.demo:
        print(demo_table(json.loads(Path(args.demo).read_text())))


if __name__ == "__main__":
    main()
