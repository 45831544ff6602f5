"""Training-loop throughput: FeatureSet index batches vs a per-sample Dataset/DataLoader.

Both loops read the same feature store (Gaussian features shaped like the
``signal`` encoder's: audio (8, 128), visual (8, 241), float16) and run the same
training step (``guided`` head with the synth preset's width, Adam,
cross-entropy) on batches of 256:

* **FeatureSet**: the store loaded once into float32 tensors; a batch is
  ``randperm`` slice -> ``index_select`` per stream.
* **per-sample baseline**: the store's float16 arrays in memory behind a
  ``torch.utils.data.Dataset`` whose ``__getitem__`` converts one clip to
  float32 tensors; ``DataLoader(shuffle=True, num_workers=0)`` collates them —
  the usual pattern of per-clip feature loaders.

Reported: samples/s of the full training step and of data loading alone, and
their ratios. ``--write`` records the table under "training (CPU)" in
``benchmarks/RESULTS.md`` (replacing an earlier version of that section).

    .venv/bin/python benchmarks/bench_train.py [--rows 4096] [--epochs 3] [--threads 1] [--write]
"""
from __future__ import annotations

import argparse
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from train.features import FeatureSet  # noqa: E402
from train.heads import build_head  # noqa: E402
from train.trainer import CILModel  # noqa: E402
from train_fixtures import gaussian_features, toy_manifest, write_store  # noqa: E402

SECTION = "## training (CPU)"


class PerSampleDataset(torch.utils.data.Dataset):
    """One clip per ``__getitem__``: float16 rows -> float32 tensors (the baseline)."""

    def __init__(self, audio: np.ndarray, visual: np.ndarray, labels: np.ndarray) -> None:
        self.audio, self.visual, self.labels = audio, visual, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return (torch.from_numpy(self.audio[i].astype(np.float32)),
                torch.from_numpy(self.visual[i].astype(np.float32)), int(self.labels[i]))


def make_store(tmp: Path, rows: int, classes: int = 12) -> str:
    per = rows // classes
    m = toy_manifest(classes, {"train": per})
    feats = gaussian_features(m, {"audio": (8, 128), "visual": (8, 241)}, seed=0)
    return write_store(tmp / "bench.zarr", m, feats)


def new_model(fs_dims, classes):
    torch.manual_seed(0)
    model = CILModel(build_head("guided", fs_dims, {"d_model": 64, "dropout": 0.0}), classes)
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def step(model, opt, x, y):
    loss = F.cross_entropy(model(x)["logits"], y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def bench_featureset(fs, labels, epochs, bs, train: bool) -> float:
    model, opt = new_model(fs.dims, int(labels.max()) + 1)
    y_all = torch.as_tensor(labels)
    gen = torch.Generator().manual_seed(0)
    n = len(fs)
    t = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for s in range(0, n, bs):
            idx = order[s: s + bs]
            x = fs.batch(idx)
            if train:
                step(model, opt, x, y_all[idx])
    return epochs * n / (time.perf_counter() - t)


def bench_dataloader(ds, dims, epochs, bs, train: bool) -> float:
    model, opt = new_model(dims, int(ds.labels.max()) + 1)
    loader = torch.utils.data.DataLoader(ds, batch_size=bs, shuffle=True, num_workers=0,
                                         generator=torch.Generator().manual_seed(0))
    t = time.perf_counter()
    for _ in range(epochs):
        for a, v, y in loader:
            if train:
                step(model, opt, {"audio": a, "visual": v}, y)
    return epochs * len(ds) / (time.perf_counter() - t)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--write", action="store_true", help="record the result in benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = make_store(Path(tmp), args.rows)
        t = time.perf_counter()
        fs = FeatureSet.from_stores([path])
        load_s = time.perf_counter() - t
        from avcl_core.cache import open_store

        st = open_store(path)
        ds = PerSampleDataset(st.read("audio"), st.read("visual"), st.labels())
    labels = fs.class_ids
    res = {}
    for train in (False, True):
        fs_rate = bench_featureset(fs, labels, args.epochs, args.batch_size, train)
        dl_rate = bench_dataloader(ds, fs.dims, args.epochs, args.batch_size, train)
        res[train] = (fs_rate, dl_rate)
    cpu = platform.processor() or platform.machine()
    lines = [
        SECTION,
        "",
        f"`benchmarks/bench_train.py --rows {args.rows} --epochs {args.epochs} --threads {args.threads}` "
        f"({time.strftime('%Y-%m-%d')}, {cpu}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}; "
        "shared machine, so absolute numbers vary with its load). "
        f"{len(fs)} clips, audio (8, 128) + visual (8, 241) float16 features, batches of {args.batch_size}, "
        "`guided` head (d_model 64), Adam, cross-entropy.",
        "",
        "| loop | FeatureSet (samples/s) | per-sample Dataset + DataLoader (samples/s) | ratio |",
        "|---|---:|---:|---:|",
        f"| data loading only | {res[False][0]:,.0f} | {res[False][1]:,.0f} | {res[False][0] / res[False][1]:.1f}x |",
        f"| training step (forward + backward + Adam) | {res[True][0]:,.0f} | {res[True][1]:,.0f} | "
        f"{res[True][0] / res[True][1]:.2f}x |",
        "",
        f"Loading the store into the FeatureSet once (float16 -> float32): {load_s:.2f} s.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        out = ROOT / "benchmarks" / "RESULTS.md"
        old = out.read_text() if out.exists() else "# Benchmark results\n\n"
        pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
        new = pattern.sub(text + "\n", old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text + "\n"
        out.write_text(new)
    return text


if __name__ == "__main__":
    main()
