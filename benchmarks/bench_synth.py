"""Synth rendering speed: the default dataset (12 classes x 20 clips of 2 s, 96 px, 8 fps,
16 kHz) rendered with 1 and with 2 worker processes.

Each setting is timed ``--repeats`` times and the fastest run is kept (the machine may
be shared). Prints wall time, clips per second, the CPU seconds used (this process and
its workers), the cores that run actually got (CPU s / wall s) and the 2-worker
speed-up; ``--record`` writes the table into ``benchmarks/RESULTS.md`` under
"## synth rendering" (replacing an earlier such section).

Example::

    python benchmarks/bench_synth.py --record
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

from avcl_core import synth
from results import record_section

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADING = "## synth rendering"


def _cpu_seconds() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def measure(classes: int, clips_per_class: int, workers: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-synth-") as tmp:
        load = os.getloadavg()[0]
        cpu0, t0 = _cpu_seconds(), time.perf_counter()
        synth.render(tmp, classes=classes, clips_per_class=clips_per_class, seed=0, workers=workers)
        wall, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
        size = sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file())
    n = classes * clips_per_class
    return {"workers": workers, "clips": n, "wall_s": wall, "clips_per_s": n / wall, "cpu_s": cpu,
            "load": load, "mb": size / 1e6}


def table(rows: list[dict]) -> str:
    lines = ["| workers | clips | wall s | clips / s | CPU s | cores used | load avg at start |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['workers']} | {r['clips']} | {r['wall_s']:.1f} | {r['clips_per_s']:.1f} | "
                     f"{r['cpu_s']:.1f} | {r['cpu_s'] / r['wall_s']:.2f} | {r['load']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--classes", type=int, default=12)
    ap.add_argument("--clips-per-class", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3, help="runs per setting; the fastest is kept")
    ap.add_argument("--record", action="store_true", help=f"write the table into {RESULTS}")
    args = ap.parse_args(argv)
    rows = [min((measure(args.classes, args.clips_per_class, w) for _ in range(max(1, args.repeats))),
                key=lambda r: r["wall_s"]) for w in (1, 2)]
    out = table(rows)
    speedup = rows[1]["clips_per_s"] / rows[0]["clips_per_s"]
    summary = (f"2 workers vs 1: {speedup:.2f}x; {rows[0]['mb']:.1f} MB written "
               f"({rows[0]['mb'] / rows[0]['clips'] * 1000:.0f} kB per clip with its mask file)")
    print(out)
    print(summary)
    if args.record:
        cpus = synth.default_workers()
        record_section(
            f"{HEADING}\n\n"
            f"`synth.render` of {args.classes} classes x {args.clips_per_class} clips (2 s, 96 px, 8 fps, "
            f"16 kHz; H.264 + AAC + masks); {platform.machine()}, {cpus} CPUs available, fastest of "
            f"{args.repeats} runs per setting, {datetime.date.today().isoformat()}\n\n{out}\n\n{summary}. "
            "CPU s counts this process and its workers; on a shared machine \"cores used\" below the worker "
            "count means other jobs took the rest, and the wall times are pessimistic.\n"
        )
    return rows


if __name__ == "__main__":
    main()
