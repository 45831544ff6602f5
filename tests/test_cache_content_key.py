"""Rows keyed by content: one extraction of a VGGSound-layout root serves every protocol cut
from it, and relabelling the csv reuses the store.

The fixture lays out a dataset root as VGGSound ships it (``vggsound.csv`` without a
header: ``youtube_id,start_seconds,label,split``; ``video/<id>_<start:06d>.mp4``) with
6 classes x 3 real mp4 clips (rendered by :mod:`avcl_core.synth`): per class two rows
of the csv's ``train`` split and one of its ``test`` split. Two protocols are cut from it
the way the shipped ones are cut from VGGSound:

- ``vs-shaped`` (like ``vs100-10x10``): 4 classes named as VGGSound names them, 2 tasks,
  per-class split lists whose *val* clips are csv ``train`` rows;
- ``instruments-shaped`` (like ``vgg-instruments-4x9``): 4 classes under their own short
  names (``piano`` for VGGSound's ``playing piano``), matched through the lists, 2 tasks;
  two classes are shared with ``vs-shaped``.
"""
from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from avcl_core import cache as C
from avcl_core import synth
from avcl_core.manifest import Manifest

LABELS = ["dog barking", "cat meowing", "playing piano", "playing violin", "playing drum kit", "playing cello"]
SHORT = {"playing piano": "piano", "playing violin": "violin", "playing drum kit": "drum", "playing cello": "cello"}


def _sid(c: int, j: int) -> str:
    return f"yt{c:03d}x{j:05d}_{10 * j:06d}"


def _csv_rows(root) -> list[list[str]]:
    return [line.split(",") for line in (root / "vggsound.csv").read_text().splitlines()]


def _write_csv(root, rows) -> None:
    (root / "vggsound.csv").write_text("".join(",".join(r) + "\n" for r in rows))


def _protocol(path, name, classes, per_class) -> str:
    """A protocol file: ``per_class[split][k]`` = the ids of protocol class ``k``."""
    path.write_text(json.dumps({"format": "avcl-protocol/1", "name": name, "dataset": "vggsound",
                                "classes": classes, "classes_per_task": 2, "memory": 4, "splits": per_class}))
    return str(path)


@pytest.fixture(scope="module")
def vgg(tmp_path_factory):
    base = tmp_path_factory.mktemp("vggsound_layout")
    src = base / "synth"
    synth.render(src, classes=len(LABELS), clips_per_class=3, seed=1, workers=1, size=32, seconds=1.0, fps=4)
    clips: dict[int, list] = {}
    for r in Manifest.load(src / "manifest.jsonl").rows:
        clips.setdefault(r["label"], []).append(src / r["video"])
    root = base / "vggsound"
    (root / "video").mkdir(parents=True)
    rows = []
    for c, label in enumerate(LABELS):
        for j, clip in enumerate(clips[c]):
            sid = _sid(c, j)
            shutil.copyfile(clip, root / "video" / f"{sid}.mp4")
            ytid, start = sid.rsplit("_", 1)
            rows.append([ytid, str(int(start)), label, "train" if j < 2 else "test"])
    _write_csv(root, rows)

    def lists(classes):
        return {"train": [[_sid(c, 0)] for c in classes], "val": [[_sid(c, 1)] for c in classes],
                "test": [[_sid(c, 2)] for c in classes]}

    vs = _protocol(base / "vs.json", "vs-shaped", LABELS[:4], lists([0, 1, 2, 3]))
    inst = _protocol(base / "inst.json", "instruments-shaped", [SHORT[x] for x in LABELS[2:]], lists([2, 3, 4, 5]))
    return {"root": root, "base": base, "vs": vs, "inst": inst}


def _extract(vgg, cache):
    from extract.cli import cli

    return CliRunner().invoke(cli, ["--dataset", "vggsound", "--root", str(vgg["root"]), "--encoder", "signal",
                                    "-o", "clip_seconds=1.0", "-o", "frames_per_clip=2", "-o", "image_size=32",
                                    "-o", "n_mels=16", "--cache-dir", str(cache), "--workers", "0", "--no-progress",
                                    "--device", "cpu"])


def _train(store, protocol, out, *extra):
    from train.cli import main

    return main(["--cache", str(store), "--protocol", protocol, "--method", "finetune", "--epochs", "1",
                 "--set", "batch_size=8", "--set", "head.d_model=8", "--set", "head.n_heads=2", "--out", str(out),
                 "-q", *extra])


def test_content_hash_ignores_labels_splits_and_names_but_not_media_or_windows():
    row = {"sample_id": "a", "dataset": "d", "split": "train", "label": 0, "class_name": "x", "video": "v/a.mp4",
           "start": 1.0, "end": 3.0}
    base = C.content_hash(Manifest([row]))
    for change in ({"label": 1, "class_name": "y"}, {"split": "test"}, {"subset": "s"}, {"dataset": "e"}):
        assert C.content_hash(Manifest([{**row, **change}])) == base, change
    for change in ({"video": "v/b.mp4"}, {"start": 1.5}, {"end": 2.5}, {"sample_id": "b"}, {"frames": "f/a"}):
        assert C.content_hash(Manifest([{**row, **change}])) != base, change
    two = [row, {**row, "sample_id": "b", "video": "v/b.mp4"}]
    assert C.content_hash(Manifest(two)) != C.content_hash(Manifest(two[::-1]))  # row order is the store's order


def test_one_vggsound_store_trains_both_protocols_and_a_relabelled_csv_reuses_it(vgg, tmp_path):
    cache = tmp_path / "cache"
    res = _extract(vgg, cache)
    assert res.exit_code == 0, res.output
    stores = C.find_stores(cache)
    assert len(stores) == 1 and "ok      18" in res.output
    store = stores[0]
    assert "labels" not in C.open_store(store).group  # labels live in the manifest, not in the features

    # both protocols train from the one store; the vs-shaped one selects on val clips of the csv's train split
    for protocol, extra in ((vgg["vs"], ["--select", "val-seen"]), (vgg["inst"], [])):
        [r] = _train(store, protocol, tmp_path / "runs", *extra)
        assert r["status"] == "ok", r
        name = json.loads(open(protocol).read())["name"]
        met = json.loads((tmp_path / "runs" / name / "finetune" / "seed0" / "metrics.json").read_text())
        assert met["n_test"] == [2, 2]  # one listed test clip per class, 2 classes per task
        cfg = json.loads((tmp_path / "runs" / name / "finetune" / "seed0" / "config.json").read_text())
        assert cfg["caches"][0]["key"] == C.open_store(store).key

    # relabel: the test clip of "dog barking" becomes "cat meowing"; a train clip of "playing cello" moves to test
    marker_times = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*.done.json")}
    rows = _csv_rows(vgg["root"])
    dog_test = next(r for r in rows if r[2] == "dog barking" and r[3] == "test")
    cello_train = next(r for r in rows if r[2] == "playing cello" and r[3] == "train")
    dog_test[2], cello_train[3] = "cat meowing", "test"
    _write_csv(vgg["root"], rows)
    try:
        again = _extract(vgg, cache)
    finally:
        dog_test[2], cello_train[3] = "dog barking", "train"
        _write_csv(vgg["root"], rows)
    assert again.exit_code == 0, again.output
    assert C.find_stores(cache) == [store]  # same key, same path
    assert again.output.startswith(f"already complete: {store}") and "labels/splits:" in again.output
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*.done.json")} == marker_times

    from train.features import FeatureSet

    fs = FeatureSet.from_stores([store])
    relabelled = f"{dog_test[0]}_{int(dog_test[1]):06d}"
    moved = f"{cello_train[0]}_{int(cello_train[1]):06d}"
    names = fs.manifest.classes()
    assert names[fs.class_ids[fs.sample_ids.index(relabelled)]] == "cat meowing"
    assert fs.split_of()[fs.sample_ids.index(moved)] == "test"
    [r] = _train(store, vgg["vs"], tmp_path / "runs2")
    assert r["status"] == "ok", r
