"""DOCSTRING"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from train.cli import main

pytestmark = pytest.mark.slow
SEEDS = "0,1,2"
COMMON = ["--protocol", "synth-sem-8-2", "--seeds", SEEDS, "--epochs", "40", "--set", "lr=0.003",
          "--set", "batch_size=8", "--set", "head.d_model=64", "-q"]


@pytest.fixture(scope="module")
def sem_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthsem")
    data, cache = root / "data", root / "cache"
    py = sys.executable
    subprocess.run([py, "-c", "from avcl_core import synth; import sys; synth.render(sys.argv[1], classes=12, "
                    "clips_per_class=10, seed=0, size=32, seconds=1.0, fps=8, multi=0.5)", str(data)],
                   check=True, capture_output=True)
    subprocess.run([py, "-m", "extract.cli", "--dataset", "synth", "--root", str(data), "--encoder", "signal",
                    "-o", "frames_per_clip=4", "-o", "image_size=32", "-o", "dense_grid=8", "-o", "clip_seconds=1.0",
                    "-o", "mask_size=32", "--cache-dir", str(cache), "--workers", "0", "--threads", "1"],
                   check=True, capture_output=True)
    (store,) = sorted((cache / "synth").glob("signal-*.zarr"))
    return str(store), root


def _runs(store, out, method, *extra):
    res = main(["--cache", store, "--method", method, "--out", str(out), *COMMON, *extra])
    assert all(r["status"] == "ok" for r in res), [r.get("traceback") for r in res]
    steps = []
    for r in res:
        met = json.loads((Path(r["run_dir"]) / "metrics.json").read_text())
        per = met["per_metric"]
        steps.append([per[m]["step"] for m in ("miou_base", "miou_new", "miou")])
    return np.array(steps, dtype=float)  # (seeds, 3 metrics, steps)


def test_cmr_beats_random_rehearsal_and_finetune_on_synth_sem(sem_store):
    store, root = sem_store
    res = {
        "cmr": _runs(store, root / "runs-cmr", "cmr"),
        "random rehearsal": _runs(store, root / "runs-rand", "cmr", "--set", "mss=false", "--set", "csr=false"),
        "finetune": _runs(store, root / "runs-ft", "finetune"),
    }
    print("\nsynth-sem-8-2, mIoU % (mean over seeds 0,1,2) after each step: base / new / all")
    for name, s in res.items():
        m = s.mean(axis=0)  # new-class mIoU is undefined (NaN) at step 0 for every seed
        cells = [f"{100 * m[0, t]:.1f} / " + ("-" if np.isnan(m[1, t]) else f"{100 * m[1, t]:.1f}") +
                 f" / {100 * m[2, t]:.1f}" for t in range(m.shape[1])]
        print(f"{name:18s} " + " | ".join(cells) + f"   (mean of all: {100 * m[2].mean():.1f})")
    print("per seed, all-class mIoU % after the last step / mean over the steps:")
    for name, s in res.items():
        print(f"{name:18s} " + "  ".join(f"seed {k}: {100 * s[k, 2, -1]:.1f} / {100 * s[k, 2].mean():.1f}"
                                         for k in range(s.shape[0])))
    last = {k: v[:, 2, -1].mean() for k, v in res.items()}
    avg = {k: v[:, 2, :].mean() for k, v in res.items()}
    assert last["cmr"] > last["random rehearsal"] and last["cmr"] > last["finetune"], last
    assert avg["cmr"] > avg["random rehearsal"] and avg["cmr"] > avg["finetune"], avg
