"""The experiment scripts' code paths (benchmarks/bench_prune_curve.py, bench_methods_curve.py, bench_hashednets.py
and their README tables), at small settings: one pruning step of the bundled LeNet-300-100 per pipeline; two methods
at one width; HashedNets at one factor for one epoch."""
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def curve():
    sys.path.insert(0, str(BENCH))
    try:
        import bench_prune_curve
        import report
        result = {"machine": {"cpu": "test", "cores": 1, "torch": "x", "date": "today"}, "model": "lenet300100",
                  "seeds": [0], "rows": []}
        r = bench_prune_curve.run("lenet300100", seed=0, min_density=0.5, cross=False,  # 1 epoch: code paths only
                                  retrain=dict(epochs=1, lr=0.05, weight_decay=1e-4, ramp=0.5, distill=0.7))
        result.update(r)
        yield bench_prune_curve, report, result
    finally:
        sys.path.remove(str(BENCH))


def test_prune_curve_rows(curve):
    _, _, result = curve
    rows = result["rows"]
    assert {(r["pipeline"], r["method"], r["bits"]) for r in rows} == {
        ("ours", "loss_aware", 3), ("ours", "loss_aware", 4),
        ("deep_compression", "kmeans", 3), ("deep_compression", "kmeans", 4)}
    for r in rows:
        assert r["target_density"] == 0.5 and abs(r["density"] - 0.5) < 0.01
        assert 0 <= r["test_error"] < 0.05 and 0 <= r["val_error"] < 0.05
        # half the weights at 3-4 bits plus entropy coding: well past 8x, below the 32x of 1 bit per weight
        assert 8 < r["compression_ratio"] < 32
        assert r["zero_val_drop"] == (1 - r["val_error"] >= 1 - result["baseline_val_error"] - 1e-12)
    for pipeline in ("ours", "deep_compression"):
        assert len(result["prune_steps"][pipeline]) == 1


def test_prune_curve_table_and_plot(curve, tmp_path):
    bench, report, result = curve
    table = report.prune_curve_table(result)
    assert table.count("\n| ") == 1 + 4  # the header, then one line per pipeline x quantiser x bits
    assert "50.0% kept" in table
    png = bench.plot(result, tmp_path / "curve.png")
    assert png.stat().st_size > 10_000


def test_methods_curve(tmp_path):
    sys.path.insert(0, str(BENCH))
    try:
        import bench_methods_curve
        import report
        r = bench_methods_curve.run(["lenet300100"], [0, 1], [3], methods=("loss_aware", "uniform"),
                                    tune_samples=0)
        assert {(x["method"], x["seed"]) for x in r["rows"]} == {(m, s) for m in ("loss_aware", "uniform")
                                                                   for s in (0, 1)}
        for x in r["rows"]:
            # 3 bits: about 10x packed, more where entropy coding pays (uniform levels span the outliers, so most
            # weights share a few levels: 27x, measured)
            assert 9 < x["compression_ratio"] < 40 and x["test_error"] < 0.05
        # the two seeds calibrate on different images, so the loss-aware fits differ
        la = [x for x in r["rows"] if x["method"] == "loss_aware"]
        assert la[0]["file_bytes"] != la[1]["file_bytes"] or la[0]["test_error"] != la[1]["test_error"]
        table = report.methods_curve_table(r)
        assert table.count("\n| lenet300100") == 2 and "(min-max over seeds)" in table
        assert bench_methods_curve.plot(r, tmp_path / "m.png").stat().st_size > 10_000
    finally:
        sys.path.remove(str(BENCH))


def test_hashednets_benchmark():
    """bench_hashednets at one factor and one epoch: trained buckets beat their projection by far, the ratio is the
    counted one, and the README table has its row."""
    sys.path.insert(0, str(BENCH))
    try:
        import bench_hashednets
        import report
        r = bench_hashednets.run("lenet300100", [16], epochs=1)
        (row,) = r["rows"]
        # projecting a trained network onto 16x fewer random buckets destroys it (chance level); training the
        # buckets brings it back to a few percent within an epoch (3.6 % test, measured)
        assert row["projected_val_error"] > 0.5 and row["test_error"] < 0.08
        assert 15 < row["compression_ratio"] < 16  # 266,200 fp32 weights / 16 plus 410 fp32 biases
        assert row["stored_bytes"] == 4 * (round(235200 / 16) + round(30000 / 16) + round(1000 / 16)) + 8 * 3 + 4 * 410
        r["machine"] = {"cpu": "test", "cores": 1, "torch": "x", "date": "today"}
        assert "| 1/16 |" in report.hashednets_table(r)
    finally:
        sys.path.remove(str(BENCH))
