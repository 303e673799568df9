"""1-D k-means for weight sharing: ws.kmeans / ws.kmeans_optimal against faiss and scikit-learn.

    python benchmarks/bench_kmeans.py [--n 16777216] [--k 16] [--skip-sklearn]
        -> benchmarks/results/kmeans_cpu.json

Same 2**24 N(0, 1) fp32 weights for every method; every method's final distortion is measured the same way:
the sum of squared distances of all weights to their nearest centroid (float64). faiss runs 20 iterations on
all the points (max_points_per_centroid raised so it does not subsample); scikit-learn runs Lloyd with
n_init=1, max_iter=20. For Lloyd vs the exact dynamic programme at equal time, the table lists time and
distortion of several settings of each.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import weightshare as ws  # noqa: E402
from _common import machine, write_json  # noqa: E402


def distortion(w: torch.Tensor, centroids: torch.Tensor) -> float:
    c = torch.sort(centroids.float().reshape(-1)).values
    idx = ws.ops.assign(w, c[None])
    return float(((w.double() - c.double()[idx.long()]) ** 2).sum())


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1 << 24)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--skip-sklearn", action="store_true")
    ap.add_argument("--skip-faiss", action="store_true")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    w = torch.randn(args.n, generator=g)
    rows = []

    def record(method, settings, seconds, centroids, passes=None):
        rows.append({"method": method, "settings": settings, "seconds": seconds,
                     "distortion": distortion(w, centroids), "full_passes": passes})
        r = rows[-1]
        print(f"{method:22s} {settings:38s} {seconds:8.3f} s  distortion {r['distortion']:.2f}", flush=True)

    for init in ("linear", "quantile", "kmeans++"):
        for tol in (1e-4, 1e-5):
            r, t = timed(lambda: ws.kmeans(w, args.k, init=init, tol=tol))
            record("ws.kmeans", f"init={init} tol={tol:g}", t, r.codebook, r.iterations)
    r, t = timed(lambda: ws.kmeans(w, args.k, init="linear", coarse_bins=0, tol=0, max_iter=20))
    record("ws.kmeans", "init=linear no-histogram 20 passes", t, r.codebook, r.iterations)
    for bins in (4096, 16384, 65536):
        r, t = timed(lambda: ws.kmeans_optimal(w, args.k, bins=bins))
        record("ws.kmeans_optimal", f"bins={bins} refine=2", t, r.codebook, r.iterations)
    x = w.numpy().reshape(-1, 1)
    if not args.skip_faiss:
        import faiss
        km = faiss.Kmeans(1, args.k, niter=20, seed=1234, max_points_per_centroid=args.n)
        _, t = timed(lambda: km.train(x))
        record("faiss.Kmeans", "niter=20, all points", t, torch.from_numpy(km.centroids[:, 0].copy()))
    if not args.skip_sklearn:
        from sklearn.cluster import KMeans
        km = KMeans(args.k, n_init=1, max_iter=20, random_state=0, algorithm="lloyd")
        _, t = timed(lambda: km.fit(x))
        record("sklearn.KMeans", "n_init=1 max_iter=20", t, torch.from_numpy(km.cluster_centers_[:, 0]))

    ours = [r for r in rows if r["method"] == "ws.kmeans" and r["settings"] == "init=linear tol=1e-05"][0]
    summary = {}
    for other in ("faiss.Kmeans", "sklearn.KMeans"):
        ref = [r for r in rows if r["method"] == other]
        if ref:
            summary[f"ws.kmeans(linear, tol=1e-5) speedup vs {other}"] = ref[0]["seconds"] / ours["seconds"]
            summary[f"ws.kmeans(linear, tol=1e-5) distortion / {other}"] = ours["distortion"] / ref[0]["distortion"]
    print(summary)
    print(write_json("kmeans_cpu.json", {"machine": machine(), "n": args.n, "k": args.k, "rows": rows,
                                         "summary": summary}))


if __name__ == "__main__":
    main()
