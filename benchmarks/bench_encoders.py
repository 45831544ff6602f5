"""Throughput of the pretrained encoders on this machine's CPU (random-init weights).

For each encoder and variant, builds it, runs one warm-up call, then times ``encode`` on
``--clips`` synthetic clips of ``--seconds`` seconds (8 frames for the visual encoders).
PE-Core-L14-336 (``sam-audio`` base, visual) is far too slow for that on a CPU: it is timed
on ``--pe-frames`` frames of one clip, and reported per frame; its clip rate is extrapolated
to the default 8 frames per clip. The ``ratio`` column is base time / tiny time per clip.

Example::

    python benchmarks/bench_encoders.py --record        # record the table in benchmarks/RESULTS.md
    python benchmarks/bench_encoders.py --encoders pann-cnn14 --variants tiny
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from extract.encoders import build_encoder  # noqa: E402
from results import publish  # noqa: E402



def _inputs(enc, clips: int, frames: int | None = None, seconds: float | None = None):
    p = enc.preprocess
    g = torch.Generator().manual_seed(0)
    t = frames if frames is not None else p.num_frames
    video = (torch.randint(0, 256, (clips, t, p.image_size, p.image_size, 3), dtype=torch.uint8, generator=g)
             if t else None)
    samples = round(p.audio_rate * (seconds or p.clip_seconds))
    audio = torch.randn(clips, samples, generator=g) * 0.1 if p.audio_rate else None
    return video, audio


def _time(enc, clips: int, frames: int | None = None, warmup: bool = True) -> float:
    """Seconds per clip of ``enc.encode`` on ``clips`` clips (after a short one-clip warm-up)."""
    if warmup:
        enc.encode(*_inputs(enc, 1, frames=1 if enc.preprocess.num_frames else 0, seconds=1.0))
    video, audio = _inputs(enc, clips, frames)
    start = time.perf_counter()
    enc.encode(video, audio)
    return (time.perf_counter() - start) / clips


def measure(name: str, variant: str, clips: int, seconds: float, pe_frames: int) -> dict:
    """Seconds per clip (and per PE frame, for sam-audio) of one encoder variant."""
    common = dict(variant=variant, clip_seconds=seconds)
    if name == "sam-audio":
        audio_enc = build_encoder(name, frames_per_clip=0, **common)
        audio_s = _time(audio_enc, clips)
        del audio_enc
        visual_enc = build_encoder(name, audio=False, frames_per_clip=8, **common)
        if variant == "base":
            frame_s = _time(visual_enc, 1, frames=pe_frames, warmup=False) / pe_frames
        else:
            frame_s = _time(visual_enc, clips) / 8
        return {"clip_s": audio_s + 8 * frame_s, "audio_s": audio_s, "frame_s": frame_s}
    enc = build_encoder(name, **common)
    return {"clip_s": _time(enc, clips)}


def main(argv=None) -> list[str]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoders", nargs="+", default=["pann-cnn14", "vit-b16", "sam-audio"])
    ap.add_argument("--variants", nargs="+", default=["tiny", "base"])
    ap.add_argument("--clips", type=int, default=4, help="clips per timed batch (default 4)")
    ap.add_argument("--seconds", type=float, default=10.0, help="clip length in seconds (default 10)")
    ap.add_argument("--pe-frames", type=int, default=2, help="frames timed through base PE-L (default 2)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--record", action="store_true", help="record the table in benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    results: dict[tuple[str, str], dict] = {}
    for name in args.encoders:
        for variant in args.variants:
            results[name, variant] = r = measure(name, variant, args.clips, args.seconds, args.pe_frames)
            print(f"{name:11s} {variant:5s} {r}", flush=True)

    lines = [
        "| encoder | variant | s / clip | clips / s | base ÷ tiny | notes |",
        "|---|---|---|---|---|---|",
    ]
    for (name, variant), r in results.items():
        tiny = results.get((name, "tiny"))
        ratio = f"{r['clip_s'] / tiny['clip_s']:.0f}×" if variant != "tiny" and tiny else ""
        notes = ""
        if "frame_s" in r:
            notes = (f"audio {r['audio_s']:.2f} s/clip + 8 × {r['frame_s']:.3f} s/frame"
                     + (f" (PE-L timed on {args.pe_frames} frames; 25 fps = {250 * r['frame_s'] / 60:.0f} min/clip)"
                        if variant == "base" else ""))
        lines.append(f"| {name} | {variant} | {r['clip_s']:.3f} | {1 / r['clip_s']:.3f} | {ratio} | {notes} |")
    header = (f"{args.clips} clips × {args.seconds:g} s, 8 frames, random-init weights, float32; "
              f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}")
    publish(["## encoders (CPU)", "", header, "", *lines], args.record)
    return lines


if __name__ == "__main__":
    main()
