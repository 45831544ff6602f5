"""CMR against random rehearsal of the same memory on a synth-sem protocol, paired over many seeds.

The slow test (``tests/test_cmr_slow.py``) compares them on 3 seeds; the seed-to-seed
spread of one method's mIoU there is several points, as large as the differences.
This script runs more seeds and reports, per step, the paired difference
``cmr - random rehearsal`` (all-class mIoU, the same seed = the same base model),
with its mean, standard deviation, a bootstrap 95 % interval of the mean and the
number of seeds CMR is ahead in.

Data: the slow test's multi-source render (12 classes, ``multi=0.5``, 32-pixel
frames, 1 s; ``--clips-per-class`` clips per class, 60 / 20 / 20 % train / val /
test) and ``signal`` features (4 frames, 8 x 8 dense grid, 32-pixel masks), built
once under ``--data`` and reused. Training: the slow test's settings (40 epochs per
task, lr 0.003, batches of 8, ``head.d_model=64``). Each variant is one
``avcl-train`` process over all seeds, ``--jobs`` of them at a time with
``--threads`` torch threads each. ``--ablations`` adds ``mss`` only and ``csr`` only.

    .venv/bin/python benchmarks/bench_cmr_synth.py [--seeds 0-9] [--protocol synth-sem-twin-8-2]
        [--clips-per-class 10] [--split test] [--ablations] [--write]

``--split val`` evaluates on the val clips instead (a copy of the protocol whose test
list is the val clips), as used to choose settings without looking at the test clips.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from results import publish  # noqa: E402

SECTION = "## CMR against random rehearsal on synth-sem (CPU)"
TRAIN = ["--epochs", "40", "--set", "lr=0.003", "--set", "batch_size=8", "--set", "head.d_model=64", "-q"]
VARIANTS = {
    "cmr": [],
    "random rehearsal": ["--set", "mss=false", "--set", "csr=false"],
    "mss only": ["--set", "csr=false"],
    "csr only": ["--set", "mss=false"],
}


def build_store(data: Path, clips_per_class: int) -> tuple[str, Path]:
    """(signal store, manifest) of the multi-source render under ``data``, built when missing."""
    root = data / f"synth-multi-{clips_per_class}"
    if not (root / "manifest.jsonl").is_file():
        from avcl_core import synth

        synth.render(root, classes=12, clips_per_class=clips_per_class, seed=0, size=32, seconds=1.0, fps=8,
                     multi=0.5)
    stores = sorted((root / "cache" / "synth").glob("signal-*.zarr"))
    if not stores:
        subprocess.run([sys.executable, "-m", "extract.cli", "--dataset", "synth", "--root", str(root), "--encoder",
                        "signal", "-o", "frames_per_clip=4", "-o", "image_size=32", "-o", "dense_grid=8", "-o",
                        "clip_seconds=1.0", "-o", "mask_size=32", "--cache-dir", str(root / "cache"), "--workers",
                        "0", "--threads", "1", "--no-progress"], cwd=ROOT, check=True)
        stores = sorted((root / "cache" / "synth").glob("signal-*.zarr"))
    return str(stores[-1]), root / "manifest.jsonl"


def val_protocol(name: str, manifest: Path, out: Path) -> str:
    """A copy of protocol ``name`` whose test list is the render's val clips (its train list unchanged)."""
    from avcl_core.manifest import Manifest
    from avcl_core.protocols import load_protocol

    d = load_protocol(name).to_dict()
    m = Manifest.load(manifest)
    ids = {s: m.split(s).sample_ids for s in ("train", "val", "test")}
    d.update(name=f"{d['name']}-val", splits={"train": ids["train"], "val": ids["test"], "test": ids["val"]})
    path = out / f"{d['name']}.json"
    path.write_text(json.dumps(d))
    return str(path)


def seeds_of(spec: str) -> list[int]:
    if "-" in spec and "," not in spec:
        a, b = spec.split("-")
        return list(range(int(a), int(b) + 1))
    return [int(s) for s in spec.split(",")]


def steps_of(out: Path, seeds: list[int]) -> np.ndarray:
    """(seeds, steps) all-class mIoU of one variant's runs under ``out``."""
    rows = []
    for s in seeds:
        (met,) = list(out.glob(f"*/*/seed{s}/metrics.json"))
        rows.append(json.loads(met.read_text())["per_metric"]["miou"]["step"])
    return np.asarray(rows, dtype=float)


def class_iou(run: Path) -> dict[str, np.ndarray]:
    """Class name -> IoU after each step (NaN before the class is seen) of one run directory."""
    from train.report_semantic import read_class_iou

    names, vals = read_class_iou(run / "semantic_class_iou.csv")
    return dict(zip(names, vals))


def csr_targets(cmr: Path, rnd: Path, seeds: list[int], T: int) -> tuple[np.ndarray, np.ndarray]:
    """(seeds, T - 1) paired IoU differences cmr - random rehearsal after each incremental step ``t``,
    averaged over the old classes CSR weighted most before ``t`` (as many as the step brings new
    classes, by collision share in ``cmr_task<t>.json``) and over the other old classes."""
    top, rest = np.full((len(seeds), T - 1), np.nan), np.full((len(seeds), T - 1), np.nan)
    for i, s in enumerate(seeds):
        (a,), (b,) = list(cmr.glob(f"*/*/seed{s}")), list(rnd.glob(f"*/*/seed{s}"))
        ia, ib = class_iou(a), class_iou(b)
        steps = [line.split(",") for line in (a / "semantic_steps.csv").read_text().splitlines()[1:]]
        for t in range(1, T):
            share = json.loads((a / f"cmr_task{t}.json").read_text())["csr"]["share"]
            n_new = int(steps[t][1]) - int(steps[t - 1][1])
            ranked = sorted(share, key=lambda c: -share[c])
            d = {c: ia[c][t] - ib[c][t] for c in ranked}
            top[i, t - 1] = np.nanmean([d[c] for c in ranked[:n_new]])
            rest[i, t - 1] = np.nanmean([d[c] for c in ranked[n_new:]])
    return top, rest


def paired(d: np.ndarray, rng: np.random.Generator, n_boot: int = 10000) -> tuple[float, float, float, float]:
    """(mean, std, bootstrap 2.5 %, 97.5 %) of the mean of the paired differences ``d``."""
    boot = d[rng.integers(0, d.size, size=(n_boot, d.size))].mean(axis=1)
    return float(d.mean()), float(d.std(ddof=1)) if d.size > 1 else 0.0, *np.percentile(boot, [2.5, 97.5]).tolist()


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0-9", help="e.g. 0-9 or 0,1,2")
    p.add_argument("--protocol", default="synth-sem-twin-8-2")
    p.add_argument("--clips-per-class", type=int, default=10)
    p.add_argument("--split", default="test", choices=("test", "val"))
    p.add_argument("--ablations", action="store_true", help="also run mss only and csr only")
    p.add_argument("--jobs", type=int, default=2, help="variants trained at the same time")
    p.add_argument("--threads", type=int, default=1, help="torch threads per variant")
    p.add_argument("--data", default=str(Path(tempfile.gettempdir()) / "avcl-bench-cmr"),
                   help="where the render and its store are built (reused)")
    p.add_argument("--keep", default=None, help="train into this folder and keep the run directories "
                   "(semantic_class_iou.csv, cmr_task<t>.json) instead of a temporary one")
    p.add_argument("--write", action="store_true", help="record the result in benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    seeds = seeds_of(args.seeds)
    data = Path(args.data)
    data.mkdir(parents=True, exist_ok=True)
    store, manifest = build_store(data, args.clips_per_class)
    names = list(VARIANTS) if args.ablations else ["cmr", "random rehearsal"]
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(args.keep) if args.keep else Path(scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        proto = args.protocol if args.split == "test" else val_protocol(args.protocol, manifest, tmp)
        cmds = {n: [sys.executable, "-m", "train.cli", "--cache", store, "--protocol", proto, "--method", "cmr",
                    "--seeds", ",".join(map(str, seeds)), "--threads", str(args.threads), "--out",
                    str(tmp / n.replace(" ", "-")), *TRAIN, *VARIANTS[n]] for n in names}
        pending, running = list(names), {}
        while pending or running:
            while pending and len(running) < args.jobs:
                n = pending.pop(0)
                running[n] = subprocess.Popen(cmds[n], cwd=ROOT, stdout=subprocess.DEVNULL)
            time.sleep(1)
            for n, proc in list(running.items()):
                if proc.poll() is not None:
                    if proc.returncode:
                        raise SystemExit(f"bench_cmr_synth: {n} failed (exit {proc.returncode}): {' '.join(cmds[n])}")
                    del running[n]
        res = {n: steps_of(tmp / n.replace(" ", "-"), seeds) for n in names}
        top, rest = csr_targets(tmp / "cmr", tmp / "random-rehearsal", seeds, res["cmr"].shape[1])
    minutes = (time.perf_counter() - t0) / 60
    rng = np.random.default_rng(0)
    T = res["cmr"].shape[1]
    default = args.clips_per_class == 10 and args.split == "test" and args.protocol == "synth-sem-twin-8-2"
    heading = SECTION if default else \
        f"{SECTION[:-1]}; {args.protocol}, {args.clips_per_class} clips per class, {args.split} clips)"
    lines = [
        heading, "",
        f"`benchmarks/bench_cmr_synth.py --seeds {args.seeds} --protocol {args.protocol} --clips-per-class "
        f"{args.clips_per_class} --split {args.split}{' --ablations' if args.ablations else ''}"
        f"{' --keep ' + args.keep if args.keep else ''}` "
        f"({time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"load average at the start {load0:.1f}; {minutes:.0f} min"
        f"{'; finished runs in --keep reused' if args.keep else ''}). Multi-source synth render "
        f"(12 classes, {args.clips_per_class} clips per class), {len(seeds)} seeds, 40 epochs per task; "
        f"all-class mIoU % on the {args.split} clips after each step, mean (sd) over the seeds:", "",
        "| variant | " + " | ".join(f"step {t}" for t in range(T)) + " | mean over steps |",
        "|---|" + "---:|" * (T + 1),
    ]
    for n, s in res.items():
        lines.append(f"| {n} | " + " | ".join(f"{100 * s[:, t].mean():.1f} ({100 * s[:, t].std(ddof=1):.1f})"
                                                for t in range(T)) + f" | {100 * s.mean():.1f} |")
    lines += ["", f"Paired difference cmr - random rehearsal (points), per step and for the mean over the steps: "
              "mean, sd, bootstrap 95 % interval of the mean, seeds with cmr ahead:", "",
              "| | mean | sd | 95 % interval | cmr ahead |", "|---|---:|---:|---|---:|"]
    diff = res["cmr"] - res["random rehearsal"]
    for label, d in [*[(f"step {t}", diff[:, t]) for t in range(1, T)], ("mean over steps", diff.mean(axis=1))]:
        m, sd, lo, hi = paired(100 * d, rng)
        lines.append(f"| {label} | {m:+.1f} | {sd:.1f} | [{lo:+.1f}, {hi:+.1f}] | {int((d > 0).sum())} / {d.size} |")
    lines += ["", "Where CSR acts: the paired IoU difference cmr - random rehearsal (points) after each step on the "
              "old classes CSR weighted most before it (as many as the step brings new classes, ranked by their "
              "share of the old model's collisions) and on the other old classes:", "",
              "| | classes | mean | sd | 95 % interval | cmr ahead |", "|---|---|---:|---:|---|---:|"]
    for t in range(1, T):
        for label, d in (("most collisions", top[:, t - 1]), ("other old classes", rest[:, t - 1])):
            m, sd, lo, hi = paired(100 * d, rng)
            lines.append(f"| step {t} | {label} | {m:+.1f} | {sd:.1f} | [{lo:+.1f}, {hi:+.1f}] | "
                         f"{int((d > 0).sum())} / {d.size} |")
    lines.append("")
    return publish(lines, args.write)


if __name__ == "__main__":
    main()
