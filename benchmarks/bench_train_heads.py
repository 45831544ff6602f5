"""``guided`` head training step: the composed-map forward vs the plain definition, and the matmul peak.

One training step = head forward + growing classifier + cross-entropy +
backward + Adam, on a batch of 256 current + 128 exemplar clips with
SAM-Audio-shaped features (audio 250 x 128, visual 8 x 1024), the head's
default options (d_model 256, 4 heads, dropout 0.1) and 28 classes (AVE).
Both forms run in the same process, interleaved, from the same parameters:

* **plain**: :meth:`GuidedAttentionHead.forward_plain` (the computation before
  the change: audio projected to d_model, then to keys and values);
* **composed**: :meth:`GuidedAttentionHead.forward` (see its module docstring).

Reported: samples/s of each (median of the rounds), their ratio, the FLOPs of
one step of each form (``torch.utils.flop_counter``; matmuls only) and the
fraction of the machine's measured matmul peak (a float32 2048^3 ``mm`` on the
same threads) that the step's FLOPs reach. ``--write`` records the section.

    .venv/bin/python benchmarks/bench_train_heads.py [--threads 2] [--rounds 5] [--steps 3] [--write]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from train.heads import build_head  # noqa: E402
from train.trainer import CILModel  # noqa: E402
from results import publish  # noqa: E402

SECTION = "## guided head training step (CPU)"


def matmul_peak(n: int = 2048, reps: int = 5) -> float:
    """Best GFLOP/s of a float32 n x n x n matrix product on the current torch threads."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = 0.0
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t) / 1e9)
    return best


def make(batch: int, classes: int, dims, seed: int = 0):
    torch.manual_seed(seed)
    model = CILModel(build_head("guided", dims, {}), classes)
    g = torch.Generator().manual_seed(seed)
    x = {"audio": torch.randn(batch, *dims["audio"], generator=g) * 2 + 0.5,
         "visual": torch.randn(batch, *dims["visual"], generator=g) * 0.03}
    y = torch.randint(0, classes, (batch,), generator=g)
    return model, x, y


def step_fn(model, opt, plain: bool):
    def step(x, y):
        f = model.head.forward_plain(x) if plain else model.head(x)
        loss = F.cross_entropy(model.classifier(f), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def step_flops(model, x, y, plain: bool) -> int:
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with FlopCounterMode(display=False) as fc:
        step_fn(model, opt, plain)(x, y)
    return fc.get_total_flops()


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=384, help="256 current + 128 exemplars")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3, help="training steps per round and form")
    p.add_argument("--write", action="store_true", help="record the result in benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()[0]
    dims = {"audio": (250, 128), "visual": (8, 1024)}
    model, x, y = make(args.batch, 28, dims)
    flops = {plain: step_flops(model, x, y, plain) for plain in (True, False)}
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    steps = {plain: step_fn(model, opt, plain) for plain in (True, False)}
    for plain in (True, False):  # warm-up
        steps[plain](x, y)
    rates: dict[bool, list[float]] = {True: [], False: []}
    peaks = [matmul_peak()]
    for _ in range(args.rounds):
        for plain in (True, False):
            t = time.perf_counter()
            for _ in range(args.steps):
                steps[plain](x, y)
            rates[plain].append(args.steps * args.batch / (time.perf_counter() - t))
        peaks.append(matmul_peak())
    peak = max(peaks)
    med = {k: statistics.median(v) for k, v in rates.items()}
    gflops = {k: flops[k] / args.batch / 1e9 for k in flops}
    achieved = {k: med[k] * gflops[k] for k in med}  # GFLOP/s of counted work
    lines = [
        SECTION,
        "",
        f"`benchmarks/bench_train_heads.py --threads {args.threads} --rounds {args.rounds} --steps {args.steps}` "
        f"({time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}; shared machine, load average "
        f"{load0:.1f} at the start and {os.getloadavg()[0]:.1f} at the end). "
        f"`guided` head (d_model 256, 4 heads, dropout 0.1) + 28-class classifier, cross-entropy, Adam; "
        f"batch {args.batch} (256 + 128 exemplars) of audio (250, 128) + visual (8, 1024) float32; "
        "median of the interleaved rounds.",
        "",
        "| forward | samples/s | GFLOP / sample / step (matmuls) | GFLOP/s reached | share of matmul peak |",
        "|---|---:|---:|---:|---:|",
        f"| plain (before) | {med[True]:,.0f} | {gflops[True]:.3f} | {achieved[True]:.1f} | "
        f"{achieved[True] / peak:.0%} |",
        f"| composed maps (now) | {med[False]:,.0f} | {gflops[False]:.3f} | {achieved[False]:.1f} | "
        f"{achieved[False] / peak:.0%} |",
        "",
        f"Speed-up **{med[False] / med[True]:.2f}x** samples/s (target >= 2x); the step needs "
        f"{gflops[True] / gflops[False]:.1f}x fewer FLOPs. Measured matmul peak: {peak:.1f} GFLOP/s "
        f"(float32 2048^3 `mm`, best of {len(peaks) * 5}). Rounds (samples/s): plain "
        f"{', '.join(f'{r:,.0f}' for r in rates[True])}; composed {', '.join(f'{r:,.0f}' for r in rates[False])}.",
        "",
    ]
    return publish(lines, args.write)


if __name__ == "__main__":
    main()
