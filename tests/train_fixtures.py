"""Gaussian class-conditional feature stores for the training tests.

Class ``i`` has visual identity ``i // 2`` and audio identity ``(i + 1) // 2``
(as in the synth dataset): classes (0,1), (2,3), ... look alike and (1,2), (3,4), ...
sound alike, so audio alone confuses some class pairs, visual alone others,
and only both together tell every class apart. A sample of class ``i`` has

    audio[t]  = mu_a[audio_id(i)]  + clip_noise * e_clip  + token_noise * e_t   (Ta, Da)
    visual[t] = mu_v[visual_id(i)] + clip_noise * e'_clip + token_noise * e'_t  (Tv, Dv)

with identity means ``mu`` drawn once from N(0, sep^2 / D * I) and all ``e`` standard
normal, everything from ``numpy.random.default_rng(seed)``. Features are written
as float16 through :mod:`avcl_core.cache`, next to the store's ``manifest.jsonl``;
a protocol file (classes in index order, ``tasks`` of ``classes_per_task``)
goes to ``<root>/protocols/<name>.json``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from avcl_core import cache as C
from avcl_core.manifest import Manifest


@dataclass
class ToyData:
    store: str  # path of the (audio + visual) store
    manifest: Manifest
    protocol: str  # path of the protocol file
    protocol_name: str
    features: dict = field(default_factory=dict)  # stream -> float16 array written (N, T, D)
    root: Path | None = None  # the folder holding the store and the protocols


def visual_id(i: int) -> int:
    return i // 2


def audio_id(i: int) -> int:
    return (i + 1) // 2


def toy_manifest(n_classes: int, per_split: dict[str, int], dataset: str = "toy") -> Manifest:
    rows = []
    for i in range(n_classes):
        j = 0
        for split in ("train", "val", "test"):
            for _ in range(per_split.get(split, 0)):
                rows.append({"sample_id": f"c{i:02d}-{j:04d}", "dataset": dataset, "split": split, "label": i,
                             "class_name": f"class{i:02d}", "video": f"videos/c{i:02d}/{j:04d}.mp4"})
                j += 1
    return Manifest(rows, source="toy manifest")


def gaussian_features(manifest: Manifest, shapes: dict[str, tuple[int, int]], seed: int = 0, sep: float = 3.0,
                      clip_noise: float = 1.0, token_noise: float = 1.0) -> dict[str, np.ndarray]:
    """Per stream (N, T, D) float32 features of the manifest's rows (see the module docstring)."""
    rng = np.random.default_rng(seed)
    labels = np.array([r["label"] for r in manifest])
    n_cls = int(labels.max()) + 1
    out = {}
    for stream, (T, D) in shapes.items():
        ident = np.array([audio_id(i) if stream == "audio" else visual_id(i) for i in range(n_cls)])
        mu = rng.normal(0.0, sep / np.sqrt(D), size=(ident.max() + 1, D))
        clip = rng.standard_normal((labels.size, 1, D)) * clip_noise / np.sqrt(D)
        tok = rng.standard_normal((labels.size, T, D)) * token_noise / np.sqrt(D)
        out[stream] = (mu[ident[labels]][:, None, :] + clip + tok).astype(np.float32)
    return out


def write_store(path: str | Path, manifest: Manifest, features: dict[str, np.ndarray], *, status=None,
                rows_per_shard: int | None = None, with_manifest: bool = True, split_array: bool = False,
                encoder: str = "gauss", seed: int = 0) -> str:
    """A complete store at ``path`` holding ``features`` (stored as float16); returns its path."""
    path = str(path)
    material = {"encoder": encoder, "variant": "toy", "weights": f"random-init:{seed}",
                "manifest": manifest.hash(), "streams": sorted(features)}
    streams = {k: v.shape[1:] for k, v in features.items()}
    st = C.create_store(path, key_material=material, manifest=manifest, streams=streams,
                        rows_per_shard=rows_per_shard)
    n = len(manifest)
    status = np.ones(n, np.uint8) if status is None else np.asarray(status, np.uint8)
    if split_array:
        arr = st.group.create_array("split", shape=(n,), dtype=str, chunks=(n,))
        arr[:] = np.array([r["split"] for r in manifest], dtype=object)
    for i in st.pending_shards():
        assert st.claim(i)
        rows = st.shard_rows(i)
        feats = {k: v[rows].astype(np.float16) for k, v in features.items()}
        st.write_shard(i, feats, status[rows], np.full(rows.stop - rows.start, 2.0, np.float32))
    assert st.finalize()
    if with_manifest:
        manifest.save(Path(path) / "manifest.jsonl")
    return path


def write_protocol(root: str | Path, name: str, n_classes: int, classes_per_task: int, memory: int,
                   dataset: str = "toy", setting: str = "CIL") -> str:
    d = Path(root) / "protocols"
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{name}.json"
    path.write_text(json.dumps({
        "name": name, "dataset": dataset, "setting": setting, "kind": "classification", "memory": memory,
        "classes": [f"class{i:02d}" for i in range(n_classes)],
        "tasks": [list(range(k, k + classes_per_task)) for k in range(0, n_classes, classes_per_task)],
        "provenance": "Gaussian toy protocol of the tests",
    }, indent=1))
    return str(path)


def make_toy(root: str | Path, n_classes: int = 6, classes_per_task: int = 2, per_split=None,
             audio: tuple[int, int] = (4, 8), visual: tuple[int, int] = (3, 12), memory: int | None = None,
             seed: int = 0, status=None, rows_per_shard: int | None = None, name: str | None = None,
             **noise) -> ToyData:
    """Manifest + one store with ``audio`` and ``visual`` streams + protocol file under ``root``."""
    root = Path(root)
    per_split = per_split or {"train": 12, "val": 4, "test": 6}
    manifest = toy_manifest(n_classes, per_split)
    feats = gaussian_features(manifest, {"audio": audio, "visual": visual}, seed=seed, **noise)
    store = write_store(root / "toy" / f"gauss-{seed}.zarr", manifest, feats, status=status,
                        rows_per_shard=rows_per_shard, seed=seed)
    name = name or f"toy-{n_classes // classes_per_task}x{classes_per_task}"
    memory = 2 * n_classes if memory is None else memory
    proto = write_protocol(root, name, n_classes, classes_per_task, memory)
    return ToyData(store, manifest, proto, name, {k: v.astype(np.float16) for k, v in feats.items()}, root)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """6 classes in 3 tasks of 2, memory 12 (one per test module): (:class:`ToyData`, its FeatureSet, its Protocol)."""
    from avcl_core.protocols import load_protocol
    from train.features import FeatureSet

    t = make_toy(tmp_path_factory.mktemp("toy"), n_classes=6, classes_per_task=2, memory=12)
    return t, FeatureSet.from_stores([t.store]), load_protocol(t.protocol)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models train fastest on one thread, and the test machine's cores are shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Interrupted(RuntimeError):
    """Raised by :func:`interrupt_before_task` to stand for a run killed mid-way."""


def interrupt_before_task(trainer, task: int):
    """Make ``trainer.fit()`` raise :class:`Interrupted` when it reaches ``task``
    (tasks before it finish and are checkpointed as usual)."""
    orig = trainer.method.before_task

    def before_task(t):
        if t == task:
            raise Interrupted(f"interrupted before task {task}")
        orig(t)

    trainer.method.before_task = before_task
    return trainer
