"""benchmarks/gpu_defaults.py: the defaults it proposes from a GPU run's rows (synthetic rows here)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_defaults  # noqa: E402


def rows(times: dict) -> list[dict]:
    """times: {batch: {path: ms}} with "ws" the default's time; two layers alike."""
    out = []
    for m, t in times.items():
        for shape in ([8192, 8192], [28672, 8192]):
            r = {"batch": m, "shape": shape, "bits": 4, "ws_ms": t["ws"], "speedup_vs_cublas": 1.0}
            r.update({f"ws_{p}_ms": v for p, v in t.items() if p != "ws"})
            out.append(r)
    return out


def test_fused_default_starts_where_a_fused_gemm_wins_from_then_on():
    line, evidence = gpu_defaults.linear_advice(rows({
        1: {"ws": 1.0, "fused": 2.0, "wgmma": 2.0}, 16: {"ws": 1.0, "fused": 0.9, "wgmma": 1.1},
        64: {"ws": 1.0, "fused": 0.8, "wgmma": 0.5}, 256: {"ws": 1.0, "fused": 0.7, "wgmma": 0.4}}))
    assert line == "constexpr int64_t kFusedDefaultFirstM = 16;"
    assert len(evidence) == 4 and "fused 1.11x" in evidence[1] and evidence[0].endswith("-> default")


def test_a_loss_at_a_larger_batch_keeps_the_fused_gemms_off_below_it():
    line, _ = gpu_defaults.linear_advice(rows({
        16: {"ws": 1.0, "fused": 0.5}, 64: {"ws": 1.0, "fused": 1.5, "tiles": 0.9}, 256: {"ws": 1.0, "fused": 0.9}}))
    assert line.endswith("= 256;")
    line, _ = gpu_defaults.linear_advice(rows({16: {"ws": 1.0, "fused": 0.5}, 256: {"ws": 1.0, "fused": 1.2}}))
    assert line.endswith("= INT64_MAX;")


def test_conv_kernels_become_default_only_without_a_loss():
    conv = [{"conv": "a", "batch": 1, "ws_ms": 1.0, "ws_implicit_ms": 0.5, "ws_depthwise_ms": 0.9},
            {"conv": "b", "batch": 8, "ws_ms": 1.0, "ws_implicit_ms": 1.1}, {"conv": "c", "batch": 1, "ws_ms": 1.0}]
    line, evidence = gpu_defaults.conv_advice(conv, "ws_implicit_ms", "kImplicitConvDefault")
    assert line == "constexpr bool kImplicitConvDefault = false;" and len(evidence) == 2
    line, _ = gpu_defaults.conv_advice(conv, "ws_depthwise_ms", "kDepthwiseConvDefault")
    assert line == "constexpr bool kDepthwiseConvDefault = true;"
    assert "stays false" in gpu_defaults.conv_advice(conv[2:], "ws_depthwise_ms", "kDepthwiseConvDefault")[0]


def test_gemv_byte_tables_become_the_default_only_if_they_win_every_row():
    both = [{"shape": [8192, 8192], "bits": b, "batch": 1, "ws_simt_ms": 0.020, "ws_simt_bytes_ms": t}
            for b, t in ((4, 0.015), (2, 0.012))]
    line, evidence = gpu_defaults.gemv_bytes_advice(both + [{"shape": [8192, 8192], "bits": 8, "batch": 1,
                                                             "ws_simt_ms": 0.03}])
    assert line == "constexpr bool kGemvBytesDefault = true;" and len(evidence) == 2 and "1.33x" in evidence[0]
    both[1]["ws_simt_bytes_ms"] = 0.021
    assert gpu_defaults.gemv_bytes_advice(both)[0] == "constexpr bool kGemvBytesDefault = false;"
    assert gpu_defaults.gemv_bytes_advice([])[0].startswith("kGemvBytesDefault stays false")
