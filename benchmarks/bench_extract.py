"""Extraction throughput (clips/s) of the runner on a rendered synth set, per encoder.

Each encoder (random weights; the tiny variants of the pretrained ones, and
``signal``) extracts the same clips twice into fresh cache directories: with
``workers=0`` (decode in the encoding process) and with ``workers=N`` decoding
processes. clips/s counts decode + encode + shard writes (not building the encoder);
the ratio of the two is what overlapping decoding with encoding gains.

Usage::

    python benchmarks/bench_extract.py                      # prints a table
    python benchmarks/bench_extract.py --record             # and records it in benchmarks/RESULTS.md
    python benchmarks/bench_extract.py --encoders signal --classes 2 --clips-per-class 4
"""
from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

from avcl_core.manifest import Manifest
from avcl_core.synth import render
from extract.encoders import build_encoder
from extract.runner import extract
from results import record_section


#: name -> (label, build options); clip_seconds is set from the rendered clips.
CONFIGS = {
    "signal": ("signal", {}),
    "vit-b16": ("vit-b16 tiny", {"variant": "tiny", "random_init_seed": 0, "device": "cpu"}),
    "pann-cnn14": ("pann-cnn14 tiny", {"variant": "tiny", "random_init_seed": 0, "device": "cpu"}),
    "sam-audio": ("sam-audio tiny", {"variant": "tiny", "random_init_seed": 0, "device": "cpu"}),
}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


SECTION = "## extraction (CPU)"
SECTION_INTRO = ("`benchmarks/bench_extract.py`: clips/s of `extract.runner.extract` (decode + encode + shard writes), "
                 "decoding in the encoding process (workers=0) and in worker processes.\n")


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--encoders", default=",".join(CONFIGS), help="comma-separated, from: " + ", ".join(CONFIGS))
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--clips-per-class", type=int, default=6)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--workers", type=int, default=2, help="decoding processes of the overlapped run")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--record", action="store_true", help="record the table in benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.encoders.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        ap.error(f"unknown encoders {unknown}; choose from {list(CONFIGS)}")

    rows = []
    with tempfile.TemporaryDirectory(prefix="avcl-bench-") as tmp:
        tmp = Path(tmp)
        root = tmp / "synth"
        render(root, classes=args.classes, clips_per_class=args.clips_per_class, seed=0, seconds=args.seconds)
        manifest = Manifest.load(root / "manifest.jsonl")
        for name in names:
            label, opts = CONFIGS[name]
            enc = build_encoder(name, clip_seconds=args.seconds, **opts)
            result = {"encoder": label, "streams": enc.streams()}
            for workers in (0, args.workers):
                t = time.perf_counter()
                s = extract(manifest, root, enc, tmp / f"cache-{name}-{workers}", batch_size=args.batch_size,
                            workers=workers, progress=False)
                assert s.complete and s.ok == len(manifest), s.format()
                result[workers] = len(manifest) / (time.perf_counter() - t)
            result["gain"] = result[args.workers] / result[0]
            rows.append(result)
            print(f"{label:18s} workers=0 {result[0]:7.2f} clips/s   workers={args.workers} "
                  f"{result[args.workers]:7.2f} clips/s   x{result['gain']:.2f}", flush=True)

    table = [
        f"### {time.strftime('%Y-%m-%d')}: {len(manifest)} synth clips of {args.seconds:g} s "
        f"({args.classes} classes, 96 px, 8 fps, 16 kHz), batch {args.batch_size}",
        "",
        f"CPU: {cpu_name()}, {torch.get_num_threads()} torch threads; torch {torch.__version__}; random weights.",
        "",
        f"| encoder | streams | clips/s, workers=0 | clips/s, workers={args.workers} | overlap gain |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        streams = ", ".join(f"{k} {tuple(v)}" for k, v in r["streams"].items())
        table.append(f"| {r['encoder']} | {streams} | {r[0]:.2f} | {r[args.workers]:.2f} | x{r['gain']:.2f} |")
    text = "\n".join(table) + "\n"
    print("\n" + text)
    if args.record:
        record_section(f"{SECTION}\n\n{SECTION_INTRO}\n{text}")
    return rows


if __name__ == "__main__":
    main()
