"""AVSBench F-score speed: threshold counting by one search per pixel (``seg_metrics``)
against the plain computation, one sort per frame, on an S4-test-like set.

The set: ``--videos`` videos of 5 frames of 224 x 224 logits (S4's test set has 740
videos). Both computations give the per-video F-score of record; the script checks
that they agree exactly, times each ``--repeats`` times (the fastest run is kept: the
machine may be shared) and prints the ratio; ``--record`` writes it into
``benchmarks/RESULTS.md`` under "## AVSBench F-score".

Example::

    python benchmarks/bench_seg_metrics.py --videos 40 --record
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import time

import numpy as np

from avcl_core import seg_metrics as S
from results import record_section

HEADING = "## AVSBench F-score"


def sorted_curves(prob: np.ndarray, gt: np.ndarray, thresholds: np.ndarray, beta2: float):
    """The baseline: per frame, sort the pixels and read tp / pp at each threshold."""
    has_fg = gt.any(axis=1)
    curves = np.empty((int(has_fg.sum()), thresholds.size))
    for row, (p, g) in enumerate(zip(prob[has_fg], gt[has_fg])):
        order = np.argsort(p, kind="stable")
        p_sorted = p[order]
        start = np.searchsorted(p_sorted, thresholds.astype(p_sorted.dtype), side="left")
        pp = p.size - start
        tp = np.concatenate([np.cumsum(g[order][::-1])[::-1], [0]])[start].astype(np.float64)
        prec, rec = tp / (pp + 1e-20), tp / (g.sum() + 1e-20)
        with np.errstate(invalid="ignore", divide="ignore"):
            f = (1 + beta2) * prec * rec / (beta2 * prec + rec)
        curves[row] = np.nan_to_num(f, nan=0.0)
    return curves, has_fg


def fscore_with(curves_fn, logits, masks, videos) -> float:
    """avsbench_fscore with the curve computation swapped in."""
    original = S._frame_f_curves
    S._frame_f_curves = curves_fn
    try:
        return S.avsbench_fscore(logits, masks, videos)
    finally:
        S._frame_f_curves = original


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--videos", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    n = 5 * args.videos
    masks = np.zeros((n, 224, 224), np.uint8)
    for i in range(n):
        y, x = rng.integers(0, 160, size=2)
        h, w = rng.integers(16, 64, size=2)
        masks[i, y: y + h, x: x + w] = 1
    masks[::7] = 0  # some frames without an object
    logits = (rng.normal(0, 2, size=masks.shape) + 3.0 * masks - 1.5).astype(np.float32)
    videos = np.repeat(np.arange(args.videos), 5)
    load = os.getloadavg()[0]
    times, values = {}, {}
    for name, fn in (("sort per frame (baseline)", sorted_curves), ("count per pixel", S._frame_f_curves)):
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            values[name] = fscore_with(fn, logits, masks, videos)
            best = min(best, time.perf_counter() - t0)
        times[name] = best
    base, new = times["sort per frame (baseline)"], times["count per pixel"]
    same = values["sort per frame (baseline)"] == values["count per pixel"]
    print(f"F-score {values['count per pixel']:.6f} (identical to the baseline: {same})")
    for name, t in times.items():
        print(f"{name}: {t:.2f} s for {n} frames ({1e3 * t / n:.1f} ms / frame)")
    print(f"speed-up: {base / new:.1f}x")
    if not same:
        raise SystemExit("the two computations disagree")
    if args.record:
        text = "\n".join([
            HEADING, "",
            f"`python benchmarks/bench_seg_metrics.py --videos {args.videos} --repeats {args.repeats} --record`: "
            f"`avsbench_fscore` on {args.videos} videos x 5 frames of 224 x 224 float32 logits "
            "(255 thresholds, per-video aggregation); fastest of "
            f"{args.repeats} runs; {platform.machine()}, numpy {np.__version__}, "
            f"{datetime.date.today().isoformat()}, load average {load:.1f} at start.", "",
            "| curve computation | s | ms / frame | speed-up |", "|---|---|---|---|",
            f"| sort per frame (baseline) | {base:.2f} | {1e3 * base / n:.1f} | 1.0x |",
            f"| count per pixel (`seg_metrics._frame_f_curves`) | {new:.2f} | {1e3 * new / n:.1f} | "
            f"{base / new:.1f}x |", "",
            "Both give the identical F-score (checked by the script).",
        ])
        record_section(text)
    return {"baseline_s": base, "new_s": new, "speedup": base / new}


if __name__ == "__main__":
    main()
