"""3 seeds trained as one batched model (``--batch-seeds``) vs separate runs, through ``avcl-train``.

Each mode is one ``avcl-train`` command in a fresh process (process start
included, as users run it), on the same store and protocol:

* **batched**: ``--seeds 0,1,2 --batch-seeds`` (one process, one vmapped model);
* **separate processes**: ``--seeds 0,1,2 --jobs 3`` (one worker process per seed);
* **sequential**: ``--seeds 0,1,2`` (one process, the runs one after another).

Stores: a synth-demo-shaped one (12 classes x 20 clips, signal-encoder shapes
audio (8, 128) + visual (8, 241), protocol 4 x 3 classes, memory 24, ``--preset
synth``: d_model 64, no dropout, 150 epochs) and (unless ``--no-ave``) the
AVE-shaped store of ``bench_train_scale.py`` (``guided`` head, dropout 0,
``--ave-epochs`` epochs per task, default 2). The accuracy matrices of the
modes must equal the sequential run's: exactly for separate processes, to
:data:`BATCHED_TOLERANCE` for the batched model (float rounding of batched
matrix products, see ``train/batched.py``; the table gives the difference);
an AssertionError otherwise.

    .venv/bin/python benchmarks/bench_train_seeds.py [--method lll] [--no-ave] [--ave-epochs 2] [--write]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from results import publish  # noqa: E402
from train_fixtures import gaussian_features, toy_manifest, write_protocol, write_store  # noqa: E402

SECTION = "## batched seeds (CPU)"
MODES = {"batched": ["--batch-seeds"], "separate processes (--jobs 3)": ["--jobs", "3"], "sequential": []}


def synth_shaped(root: Path) -> tuple[str, str]:
    store = root / "synth-shaped.zarr"
    proto = write_protocol(root, "synth-shaped-4x3", 12, 3, memory=24)
    if not (store / "manifest.jsonl").is_file():
        m = toy_manifest(12, {"train": 12, "val": 2, "test": 6})
        write_store(store, m, gaussian_features(m, {"audio": (8, 128), "visual": (8, 241)}, seed=0))
    return str(store), proto


def run_mode(store, proto, method, extra, common) -> tuple[float, dict]:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "train.cli", "--cache", store, "--protocol", proto, "--method", method,
               "--seeds", "0,1,2", "-q", "--out", out, *common, *extra]
        t = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
        wall = time.perf_counter() - t
        mats = {}
        for p in sorted(Path(out).glob("*/*/seed*/acc_matrix.csv")):
            mats[p.parent.name] = p.read_text()
    return wall, mats


def _numbers(csv_text: str) -> list[float]:
    out = []
    for line in csv_text.splitlines():
        for cell in line.split(","):
            try:
                out.append(float(cell))
            except ValueError:
                pass
    return out


def max_difference(mats: dict[str, str], ref: dict[str, str]) -> float:
    """Largest absolute difference between two runs' accuracy matrices (inf when the seeds differ)."""
    if sorted(mats) != sorted(ref) or len(ref) != 3:
        return math.inf
    diffs = [max((abs(a - b) for a, b in zip(_numbers(mats[k]), _numbers(ref[k]))), default=0.0) for k in ref]
    return max(diffs)


# batched matrix products may round differently from unbatched ones (train/batched.py), which can flip a
# test clip near a decision boundary; a seed trained on the wrong data or batches differs far more
BATCHED_TOLERANCE = 0.05


def measure(name, store, proto, method, common) -> list[str]:
    res = {mode: run_mode(store, proto, method, extra, common) for mode, extra in MODES.items()}
    ref = res["sequential"][1]
    diff = {mode: max_difference(mats, ref) for mode, (_, mats) in res.items()}
    bad = [mode for mode, d in diff.items() if d > (BATCHED_TOLERANCE if mode == "batched" else 0.0)]
    if bad:  # batching and worker processes must not change what is learnt
        raise AssertionError(f"{name}: accuracy matrices of {', '.join(bad)} differ from the sequential run's "
                             f"(max |difference| {', '.join(f'{diff[m]:.4f}' for m in bad)})")
    b = res["batched"][0]
    rows = [f"| {name} | {mode} | {wall:.1f} | {wall / b:.2f}x | "
            f"{'yes' if diff[mode] == 0 else f'max abs difference {diff[mode]:.4f} (float rounding)'} |"
            for mode, (wall, _) in res.items()]
    return rows


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="lll")
    p.add_argument("--ave", action=argparse.BooleanOptionalAction, default=True,
                   help="also the AVE-shaped store (--no-ave: the synth-shaped one only)")
    p.add_argument("--ave-epochs", type=int, default=2, help="epochs per task on the AVE-shaped store")
    p.add_argument("--data", default=str(Path(tempfile.gettempdir()) / "avcl-bench-ave"))
    p.add_argument("--write", action="store_true", help="record the result in benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    root = Path(args.data)
    root.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()[0]
    store, proto = synth_shaped(root)
    rows = measure("synth-shaped, `--preset synth`", store, proto, args.method,
                   ["--preset", "synth", "--threads", "1"])
    if args.ave:
        from bench_train_scale import ave_shaped

        astore, aproto = ave_shaped(root)
        rows += measure(f"AVE-shaped, `--preset av-cil --epochs {args.ave_epochs} --set head.dropout=0`", astore,
                        aproto, args.method, ["--preset", "av-cil", "--epochs", str(args.ave_epochs),
                                              "--set", "head.dropout=0"])
    lines = [
        SECTION, "",
        f"`benchmarks/bench_train_seeds.py --method {args.method}{' --ave' if args.ave else ''}` "
        f"({time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
        f"load average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end). Wall seconds of one "
        f"`avcl-train --method {args.method} --seeds 0,1,2` command per mode, process start included.",
        "",
        "| store | mode | wall s | time / batched | same accuracy matrices as sequential |",
        "|---|---|---:|---:|---|",
        *rows, "",
    ]
    return publish(lines, args.write)


if __name__ == "__main__":
    main()
