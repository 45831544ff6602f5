"""Extraction throughput (clips/s) of the runner on a rendered synth set, per encoder;
its pipeline efficiency; and its peak memory over N and 4N clips.

**Throughput.** Each encoder (random weights; the tiny variants of the pretrained ones, and
``signal``) extracts the same clips twice into fresh cache directories: with
``workers=0`` (decode in the encoding process) and with ``workers=N`` decoding
processes. clips/s counts decode + encode + shard writes (not building the encoder);
the ratio of the two is what overlapping decoding with encoding gains.

**Pipeline** (``--pipeline``). For the same clips, encoder, batch size and workers:
decode-only clips/s (the runner's decoding pool, nothing encoded), encode-only clips/s
(clips decoded beforehand, encoded in batches, nothing written) and end-to-end clips/s
(``extract``: decode, encode, write). A pipeline that overlaps its stages runs at
min(decode-only, encode-only); the ratio end-to-end / min is its efficiency. When the
encoder shares the CPU with the decoders (no GPU), the stages compete for the same cores
and the attainable rate is the serial bound 1 / (1/decode + 1/encode) at worst — both
ratios are reported.

**Memory** (``--memory``). Peak RSS of an extraction of N and of 4N clips (the clips
repeated under new sample ids), each in a fresh process: the main process and, separately,
the largest decoding process (``RUSAGE_CHILDREN``). Flat means the 4N run's peak is
within 10 % of the N run's.

Usage::

    python benchmarks/bench_extract.py                      # prints a table
    python benchmarks/bench_extract.py --record             # and records it in benchmarks/RESULTS.md
    python benchmarks/bench_extract.py --encoders signal --classes 2 --clips-per-class 4
    python benchmarks/bench_extract.py --pipeline --memory --record --encoders signal,pann-cnn14
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

import torch

from avcl_core.manifest import Manifest
from avcl_core.synth import render
from extract.encoders import build_encoder
from extract.runner import extract
from results import publish


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


PIPELINE_SECTION = "## extraction pipeline efficiency (CPU)"
MEMORY_SECTION = "## extraction peak memory (CPU)"


def decode_only(manifest, root, preprocess, workers: int, batch_size: int) -> float:
    """clips/s of the runner's decoding pool alone (same window as ``run_shards``)."""
    from extract.runner import _Decoders

    d = _Decoders(workers, root, preprocess)
    window = max(2 * batch_size, 4 * workers, 1)
    t = time.perf_counter()
    try:
        queue: deque = deque()
        for row in manifest:
            queue.append((row, d.submit(row)))
            while len(queue) > window:
                r, job = queue.popleft()
                assert d.result(job, r).ok
        while queue:
            r, job = queue.popleft()
            assert d.result(job, r).ok
    finally:
        d.close()
    return len(manifest) / (time.perf_counter() - t)


def encode_only(manifest, root, encoder, batch_size: int) -> float:
    """clips/s of the encoder alone on clips decoded beforehand (batches of ``batch_size``)."""
    from extract.decode import decode_row
    from extract.runner import _encode, encoder_device

    clips = [decode_row(r, root, encoder.preprocess) for r in manifest]
    device = encoder_device(encoder)
    t = time.perf_counter()
    for k in range(0, len(clips), batch_size):
        _encode(encoder, clips[k:k + batch_size], device)
    return len(clips) / (time.perf_counter() - t)


def pipeline_rows(names, manifest, root, tmp, args) -> list[dict]:
    rows = []
    for name in names:
        label, opts = CONFIGS[name]
        enc = build_encoder(name, clip_seconds=args.seconds, **opts)
        torch.set_num_threads(args.threads)
        dec = encr = e2e = 0.0
        for k in range(args.repeat):  # interleaved, best of each: the machine's load drifts
            dec = max(dec, decode_only(manifest, root, enc.preprocess, args.workers, args.batch_size))
            encr = max(encr, encode_only(manifest, root, enc, args.batch_size))
            t = time.perf_counter()
            s = extract(manifest, root, enc, tmp / f"pipe-{name}-{k}", batch_size=args.batch_size,
                        workers=args.workers, progress=False, threads=args.threads)
            e2e = max(e2e, len(manifest) / (time.perf_counter() - t))
            assert s.complete and s.ok == len(manifest), s.format()
        serial = 1 / (1 / dec + 1 / encr)
        r = {"encoder": label, "decode": dec, "encode": encr, "e2e": e2e, "vs_min": e2e / min(dec, encr),
             "vs_serial": e2e / serial}
        rows.append(r)
        print(f"{label:18s} decode {dec:7.2f}  encode {encr:7.2f}  end-to-end {e2e:7.2f} clips/s  "
              f"/min x{r['vs_min']:.2f}  /serial x{r['vs_serial']:.2f}", flush=True)
    return rows


def _rss_child(argv) -> None:
    """Hidden mode: one extraction in this fresh process; prints peak RSS (MiB) as JSON."""
    name, manifest_path, root, cache, workers, batch, threads, seconds, rate = argv
    label, opts = CONFIGS[name]
    if name == "signal":
        opts = {**opts, "audio_rate": int(rate)}
    enc = build_encoder(name, clip_seconds=float(seconds), **opts)
    m = Manifest.load(manifest_path)
    s = extract(m, root, enc, cache, batch_size=int(batch), workers=int(workers), progress=False,
                threads=int(threads))
    assert s.complete and s.ok == len(m), s.format()
    mib = 1024.0  # ru_maxrss is in KiB on Linux
    print(json.dumps({"main": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / mib,
                      "worker": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / mib}))


def memory_rows(names, manifest, root, tmp, args) -> list[dict]:
    rows = []
    for name in names:
        r = {"encoder": CONFIGS[name][0]}
        for mult in (1, 4):
            rows_m = [{**row, "sample_id": f"{row['sample_id']}-{k}"} for k in range(mult) for row in manifest]
            path = Manifest(rows_m).save(tmp / f"mem-{name}-{mult}.jsonl")
            out = subprocess.run([sys.executable, __file__, "--_rss-child", name, str(path), str(root),
                                  str(tmp / f"mem-{name}-{mult}"), str(args.workers), str(args.batch_size),
                                  str(args.threads), str(args.seconds), str(args.audio_rate)], capture_output=True,
                                 text=True, check=True,
                                 cwd=Path(__file__).resolve().parents[1])
            r[mult] = json.loads(out.stdout.strip().splitlines()[-1])
            r[f"n{mult}"] = len(rows_m)
        r["main_ratio"] = r[4]["main"] / r[1]["main"]
        r["worker_ratio"] = r[4]["worker"] / r[1]["worker"]
        rows.append(r)
        print(f"{r['encoder']:18s} N={r['n1']}: main {r[1]['main']:.1f} MiB, worker {r[1]['worker']:.1f} MiB; "
              f"4N={r['n4']}: main {r[4]['main']:.1f} MiB, worker {r[4]['worker']:.1f} MiB "
              f"(x{r['main_ratio']:.3f}, x{r['worker_ratio']:.3f})", flush=True)
    return rows


def _machine(args) -> str:
    load = os.getloadavg()[0]
    return (f"CPU: {cpu_name()}, {os.cpu_count()} cores (shared; load average {load:.1f} at the end); "
            f"torch {torch.__version__}; {args.threads} torch thread(s), {args.workers} decoding process(es), "
            f"batch {args.batch_size}; random weights; {time.strftime('%Y-%m-%d')}")


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--encoders", default=",".join(CONFIGS), help="comma-separated, from: " + ", ".join(CONFIGS))
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--clips-per-class", type=int, default=6)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--workers", type=int, default=2, help="decoding processes of the overlapped run")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--record", action="store_true", help="record the table in benchmarks/RESULTS.md")
    ap.add_argument("--pipeline", action="store_true", help="measure decode-only, encode-only and end-to-end clips/s")
    ap.add_argument("--memory", action="store_true", help="measure peak RSS of extractions of N and 4N clips")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of --pipeline/--memory runs")
    ap.add_argument("--repeat", type=int, default=3, help="--pipeline: interleaved repetitions (best of each)")
    ap.add_argument("--audio-rate", type=int, default=16000,
                    help="audio rate of the rendered clips (and of the signal encoder)")
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--_rss-child":
        _rss_child(sys.argv[2:])
        return []
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.encoders.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        ap.error(f"unknown encoders {unknown}; choose from {list(CONFIGS)}")

    rows = []
    with tempfile.TemporaryDirectory(prefix="avcl-bench-") as tmp:
        tmp = Path(tmp)
        root = tmp / "synth"
        render(root, classes=args.classes, clips_per_class=args.clips_per_class, seed=0, seconds=args.seconds,
               audio_rate=args.audio_rate)
        if args.audio_rate != 16000:
            CONFIGS["signal"] = ("signal", {"audio_rate": args.audio_rate})
        manifest = Manifest.load(root / "manifest.jsonl")
        if args.pipeline or args.memory:
            return _special(args, names, manifest, root, tmp)
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
    publish([SECTION, "", SECTION_INTRO, *table, ""], args.record)
    return rows


def _special(args, names, manifest, root, tmp) -> list[dict]:
    out = []
    command = "python benchmarks/bench_extract.py " + " ".join(sys.argv[1:])
    clips = (f"{len(manifest)} synth clips of {args.seconds:g} s ({args.classes} classes, 96 px, 8 fps, "
             f"{args.audio_rate / 1000:g} kHz)")
    if args.pipeline:
        rows = pipeline_rows(names, manifest, root, tmp, args)
        out += rows
        table = [f"`{command}`", "", f"{clips}; best of {args.repeat} interleaved runs. {_machine(args)}.", "",
                 "| encoder | decode-only clips/s | encode-only clips/s | end-to-end clips/s | ÷ min(decode, encode) "
                 "| ÷ serial bound |", "|---|---:|---:|---:|---:|---:|"]
        table += [f"| {r['encoder']} | {r['decode']:.2f} | {r['encode']:.2f} | {r['e2e']:.2f} | x{r['vs_min']:.2f} "
                  f"| x{r['vs_serial']:.2f} |" for r in rows]
        publish([PIPELINE_SECTION, "", *table, "", PIPELINE_NOTE], args.record)
    if args.memory:
        rows = memory_rows(names, manifest, root, tmp, args)
        out += rows
        table = [f"`{command}`", "", f"{clips}, repeated x1 and x4. {_machine(args)}.", "",
                 "| encoder | clips | main process peak RSS (MiB) | largest decoding process peak RSS (MiB) |",
                 "|---|---:|---:|---:|"]
        for r in rows:
            for mult in (1, 4):
                table.append(f"| {r['encoder']} | {r[f'n{mult}']} | {r[mult]['main']:.1f} | {r[mult]['worker']:.1f} |")
            table.append(f"| {r['encoder']} | 4N ÷ N | x{r['main_ratio']:.3f} | x{r['worker_ratio']:.3f} |")
        publish([MEMORY_SECTION, "", *table, ""], args.record)
    return out


PIPELINE_NOTE = ("Decode-only uses the runner's pool of decoding processes; encode-only encodes clips decoded "
                 "beforehand; end-to-end is `extract` (decode, encode across shard boundaries, shards written by the "
                 "writer thread). On a GPU host the encoder does not take CPU from the decoders, so min(decode, "
                 "encode) is the bound; on this shared 2-core machine both stages compete for the cores and the "
                 "serial bound is the one a CPU-only run can be held to.\n")


if __name__ == "__main__":
    main()
