"""Why a feature cache: reading a store vs recomputing its features, and whole-array vs per-row reads.

Two ratios, measured in one run on a synth render (rendered into a temporary folder):

* **cache vs re-extraction**: seconds to decode + encode every clip with the
  ``signal`` encoder (the cheapest encoder there is; a pretrained one costs
  10–1000× more) vs seconds to open the finished store and load its streams
  into a training ``FeatureSet`` — what every ``avcl-train`` run pays instead.
* **shard-sized vs per-row reads**: reading each stream as one array
  (``FeatureStore.read``, what the trainer does) vs reading it one row at a time
  (what a per-clip loader over Zarr would do).

``--record`` writes the table under "feature cache (CPU)" in ``benchmarks/RESULTS.md``.

    .venv/bin/python benchmarks/bench_cache.py [--classes 12] [--clips-per-class 20] [--record]
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from avcl_core import synth  # noqa: E402
from avcl_core.cache import open_store  # noqa: E402
from avcl_core.manifest import Manifest  # noqa: E402
from extract.encoders import build_encoder  # noqa: E402
from extract.runner import extract  # noqa: E402
from train.features import FeatureSet  # noqa: E402
from results import publish  # noqa: E402

SECTION = "## feature cache (CPU)"


def _best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, default=12)
    ap.add_argument("--clips-per-class", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "synth"
        synth.render(root, classes=args.classes, clips_per_class=args.clips_per_class, seed=0, workers=2)
        manifest = Manifest.load(root / "manifest.jsonl")
        n = len(manifest)
        t0 = time.perf_counter()
        summary = extract(manifest, root, build_encoder("signal"), Path(tmp) / "cache", batch_size=16, workers=2,
                          progress=False, dataset="synth")
        t_extract = time.perf_counter() - t0
        store = open_store(summary.store)
        t_load = _best(lambda: FeatureSet.from_stores([summary.store]), args.repeat)

        streams = list(store.streams)
        t_whole = _best(lambda: [store.read(s) for s in streams], args.repeat)

        def per_row():
            for s in streams:
                arr = store.group[s]
                for i in range(n):
                    arr[i]

        t_rows = _best(per_row, 1)
        size_mb = sum(store.read(s).nbytes for s in streams) / 2**20

    rows = [
        ("decode + encode every clip (signal encoder, 2 decoding workers)", t_extract, n / t_extract),
        ("open the store and load a FeatureSet", t_load, n / t_load),
        ("read every stream, one array per stream", t_whole, n / t_whole),
        ("read every stream one row at a time", t_rows, n / t_rows),
    ]
    lines = [
        SECTION,
        "",
        f"`benchmarks/bench_cache.py`: {n} synth clips ({args.classes} classes), streams {', '.join(streams)} "
        f"({size_mb:.1f} MB as float16); {platform.machine()}, torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')}; best of {args.repeat} except the first and last rows.",
        "",
        "| what | seconds | clips/s |",
        "|---|---:|---:|",
        *[f"| {what} | {t:.3f} | {r:,.0f} |" for what, t, r in rows],
        "",
        f"- training from the cache instead of re-extracting: **{t_extract / t_load:.0f}×** faster to get the "
        "features, with the cheapest encoder; pretrained encoders widen the gap by orders of magnitude "
        "(see \"encoders (CPU)\").",
        f"- whole-array (shard-sized) reads vs per-row reads: **{t_rows / t_whole:.0f}×**.",
        "",
    ]
    publish(lines, args.record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
