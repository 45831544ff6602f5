"""A store someone else built trains to the same numbers: copied, packed, read through a URL, or imported."""
from __future__ import annotations

import json
import shutil

import fsspec
import h5py
import numpy as np
import pytest

from train_fixtures import one_torch_thread  # noqa: F401 (autouse fixture)
from train_fixtures import make_toy
from avcl_core import cache as C
from avcl_core.archive import pack_store, unpack_store
from avcl_core.avcil_import import import_avcil
from train.cli import main

FAST = ["--method", "finetune,lwf", "--epochs", "2", "--set", "batch_size=16", "--set", "head.d_model=16",
        "--set", "head.n_heads=2", "-q"]


def _train(store, protocol, out):
    res = main(["--cache", str(store), "--protocol", str(protocol), "--out", str(out), *FAST])
    assert [r["status"] for r in res] == ["ok", "ok"]
    return [np.asarray(r["acc_matrix"]) for r in res]


def test_copied_packed_and_url_stores_train_to_the_same_numbers(tmp_path):
    toy = make_toy(tmp_path / "toy", n_classes=4, classes_per_task=2, memory=8)
    reference = _train(toy.store, toy.protocol, tmp_path / "runs-original")

    copied = tmp_path / "copy" / "toy.zarr"
    shutil.copytree(toy.store, copied)  # cp -r
    packed = pack_store(toy.store, tmp_path / "packs")
    unpacked = unpack_store(packed.archive, tmp_path / "teammate-cache")
    assert unpacked.key == C.open_store(toy.store).key
    fs = fsspec.filesystem("memory")
    fs.put(toy.store, "/shared/toy.zarr", recursive=True)
    for i, store in enumerate([copied, unpacked.store, f"file://{copied}", "memory:///shared/toy.zarr"]):
        got = _train(store, toy.protocol, tmp_path / f"runs-{i}")
        for a, b in zip(reference, got):
            np.testing.assert_array_equal(a, b)


def test_imported_avcil_features_train_through_avcl_train(tmp_path):
    rng = np.random.default_rng(0)
    classes = ["dog", "cat", "bird", "car"]
    ids = {(c, s, j): f"{c}{s}{j}" for c in range(4) for s in ("train", "test") for j in range(4 if s == "train" else 2)}
    splits = {s: [[ids[(c, s2, j)] for (c2, s2, j) in ids if c2 == c and s2 == s] for c in range(4)]
              for s in ("train", "test")}
    means_a = rng.standard_normal((4, 768)).astype(np.float32) * 2
    means_v = rng.standard_normal((4, 768)).astype(np.float32) * 2
    audio, visual_file = {}, tmp_path / "visual_features.h5"
    with h5py.File(visual_file, "w") as f:
        for (c, _, _), sid in ids.items():
            audio[sid] = means_a[c] + 0.3 * rng.standard_normal(768).astype(np.float32)
            f.create_dataset(sid, data=means_v[c] + 0.3 * rng.standard_normal((1568, 768)).astype(np.float32))
    audio_file = tmp_path / "audio_pretrained_feature_dict.npy"
    np.save(audio_file, audio)
    proto = tmp_path / "tiny-2x2.json"
    proto.write_text(json.dumps({"name": "tiny-2x2", "dataset": "ks", "classes": classes,
                                 "tasks": [[0, 1], [2, 3]], "memory": 4, "splits": splits}))

    stores = import_avcil(proto, audio=audio_file, visual=visual_file, cache_root=tmp_path / "cache",
                          trust_pickle=True)
    res = main(["--cache", stores["audio"].path, "--cache", stores["visual"].path, "--protocol", str(proto),
                "--out", str(tmp_path / "runs"), "--method", "joint", "--epochs", "30",
                "--set", "head.d_model=16", "--set", "head.n_heads=2", "-q"])
    assert res[0]["status"] == "ok"
    A = np.asarray(res[0]["acc_matrix"])
    assert A.shape == (2, 2)
    # well-separated classes: the imported features carry the labels through to the trainer
    assert A[1, 0] >= 0.75 and A[1, 1] >= 0.75
    cfg = json.loads((tmp_path / "runs" / "tiny-2x2" / "joint" / "seed0" / "config.json").read_text())
    assert {c["key"] for c in cfg["caches"]} == {stores["audio"].key, stores["visual"].key}
