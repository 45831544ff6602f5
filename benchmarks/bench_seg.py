"""CPU time per epoch of ``atlas`` on an AVSBench-S4-sized store.

A store with S4's per-clip shapes is written through the cache API
(:mod:`avcl_core.cache`): ``visual_dense`` (5 frames x 196 ViT-B/16 patch tokens x
768) and ``audio_seconds`` (5 PANN per-second tokens x 2048), float16, with
ground-truth ``masks`` (5 x 224 x 224, uint8) and ``mask_valid`` (S4 train:
first frame only; test: all five), and a manifest over S4's 23 categories.
Features are Gaussian (the time does not depend on their values).

Measured: one epoch of the ``atlas`` method (head ``atlas`` with its defaults:
d_model 256, LoRA r 8, decoder to 56 x 56 logits upsampled to 224; batch 16,
AdamW) on the training clips of task 0 of ``s4-11-2-cil``, and one evaluation
pass (five metrics) over the test clips; both reported per clip and scaled to
S4's 3,452 training clips (740 test clips). The store has ``--rows`` clips
(default 160; the whole S4 store would need ~13 GiB of float32 features in
memory, more than this shared machine has) — per-clip time does not depend on
the store size, since batches are index gathers. The baseline of the ratio is
the same epoch with the decoder's logits at the full 224 x 224 resolution
(``logit_stride`` 1: convolution stages 14 -> 28 -> 56 -> 112 -> 224), the
design the quarter-resolution decoder replaces.

    .venv/bin/python benchmarks/bench_seg.py [--rows 160] [--threads 2] [--write]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from avcl_core import cache as C  # noqa: E402
from avcl_core.manifest import Manifest  # noqa: E402
from avcl_core.protocols import load_protocol  # noqa: E402
from results import publish  # noqa: E402
from train.features import FeatureSet  # noqa: E402
from train.methods import build_method  # noqa: E402
from train.trainer import Trainer  # noqa: E402

SECTION = "## segmentation: atlas on an S4-sized store (CPU)"
S4_TRAIN, S4_TEST = 3452, 740
FRAMES, TOKENS, DV, TA, DA, MASK = 5, 196, 768, 5, 2048, 224


def write_s4_like_store(path: Path, rows: int, seed: int = 0) -> str:
    """A complete store of S4 shapes; every category has a test clip and a train clip,
    the remaining rows are train clips of task 0's categories."""
    classes = sorted(load_protocol("s4-11-2-cil").classes)
    base = set(load_protocol("s4-11-2-cil").classes[:11])
    rng = np.random.default_rng(seed)
    spec = [(c, "test") for c in classes] + [(c, "train") for c in classes]
    base_list = [c for c in classes if c in base]
    spec += [(base_list[i % len(base_list)], "train") for i in range(rows - len(spec))]
    man = Manifest.from_rows([{"sample_id": f"s{i:05d}", "dataset": "avsbench-s4", "split": sp,
                               "label": classes.index(c), "class_name": c, "video": f"v/s{i:05d}"}
                              for i, (c, sp) in enumerate(spec)], source="bench")
    streams = {"visual_dense": (FRAMES, TOKENS, DV), "audio_seconds": (TA, DA)}
    extras = {"masks": ((FRAMES, MASK, MASK), "uint8"), "mask_valid": ((FRAMES,), "uint8")}
    st = C.create_store(str(path), key_material={"encoder": "bench", "manifest": man.hash(),
                                                 "masks": {"size": MASK, "frames": FRAMES}},
                        manifest=man, streams=streams, extras=extras)
    for i in range(st.n_shards):
        r = st.shard_rows(i)
        n = r.stop - r.start
        feats = {k: rng.standard_normal((n, *s), dtype=np.float32).astype(np.float16) for k, s in streams.items()}
        yy, xx = np.mgrid[:MASK, :MASK]
        masks = np.zeros((n, FRAMES, MASK, MASK), np.uint8)
        for j in range(n):
            cy, cx, rad = rng.integers(60, 164, 2).tolist() + [int(rng.integers(20, 60))]
            masks[j] = ((yy - cy) ** 2 + (xx - cx) ** 2 < rad ** 2)[None]
        valid = np.array([[1, 0, 0, 0, 0] if spec[r.start + j][1] == "train" else [1] * 5 for j in range(n)], np.uint8)
        st.write_shard(i, feats, np.ones(n, np.uint8), np.full(n, 5.0, np.float32),
                       extras={"masks": masks, "mask_valid": valid})
    st.finalize()
    man.save(Path(path) / "manifest.jsonl")
    return str(path)


def time_epoch(store: str, head_cfg: dict, threads: int) -> dict:
    torch.set_num_threads(threads)
    fs = FeatureSet.from_stores([store], streams={"visual": "visual_dense", "audio": "audio_seconds"})
    method = build_method("atlas", {"epochs": 1})
    tr = Trainer(fs, load_protocol("s4-11-2-cil"), method, head="atlas", head_config=head_cfg, seed=0)
    tr.task = -1
    t0 = time.process_time(), time.perf_counter()
    tr._train_task(0, None)
    t1 = time.process_time(), time.perf_counter()
    n_train = int(tr.split_idx["train"][0].size)
    idx = np.concatenate(tr.split_idx["test"])
    tr.problem._task_sums(idx)
    t2 = time.process_time(), time.perf_counter()
    return {"train_clips": n_train, "train_cpu": t1[0] - t0[0], "train_wall": t1[1] - t0[1],
            "test_clips": int(idx.size), "eval_cpu": t2[0] - t1[0], "eval_wall": t2[1] - t1[1]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=160)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write", action="store_true", help="record the result in benchmarks/RESULTS.md")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        store = write_s4_like_store(Path(tmp) / "s4like.zarr", a.rows)
        quarter = time_epoch(store, {}, a.threads)
        full = time_epoch(store, {"decoder_channels": [128, 64, 32, 16], "logit_stride": 1}, a.threads)
    per = lambda r, k, n: r[k] / r[n]  # noqa: E731
    lines = [SECTION, "",
             f"`{' '.join(['.venv/bin/python', 'benchmarks/bench_seg.py'] + (argv or sys.argv[1:]))}`, "
             f"{time.strftime('%Y-%m-%d')}, {platform.machine()} {platform.processor() or ''} "
             f"({torch.get_num_threads()} torch threads, shared 2-core machine), torch {torch.__version__}.",
             "", "| decoder | train s/clip (CPU) | epoch of 3,452 clips (CPU s) | eval s/clip (CPU) | "
             "eval of 740 clips (CPU s) | train wall s/clip |", "|---|---:|---:|---:|---:|---:|"]
    for name, r in (("logits at 56², upsampled (default)", quarter), ("convs up to 224² (baseline)", full)):
        lines.append(f"| {name} | {per(r, 'train_cpu', 'train_clips'):.4f} | "
                     f"{per(r, 'train_cpu', 'train_clips') * S4_TRAIN:.0f} | {per(r, 'eval_cpu', 'test_clips'):.4f} | "
                     f"{per(r, 'eval_cpu', 'test_clips') * S4_TEST:.0f} | {per(r, 'train_wall', 'train_clips'):.4f} |")
    ratio = per(full, "train_cpu", "train_clips") / per(quarter, "train_cpu", "train_clips")
    lines += ["", f"- CPU time per epoch of `atlas` on S4 (3,452 training clips, 5 frames x 196 x 768 visual "
                  f"tokens, 5 x 2048 audio tokens, 224² masks): **{per(quarter, 'train_cpu', 'train_clips') * S4_TRAIN:.0f} s**, "
                  f"measured on {quarter['train_clips']} clips and scaled per clip.",
              f"- the quarter-resolution decoder vs convolutions up to 224²: **{ratio:.1f}x** less CPU time per epoch.",
              f"- raw: {json.dumps({'quarter': quarter, 'full': full})}"]
    publish(lines, a.write)


if __name__ == "__main__":
    main()
