"""Every builder's manifest decodes: each dataset's released layout, written with real media,
built into a manifest and run through ``decode_row`` row by row."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from avcl_core.builders import build_manifest
from avcl_core.manifest import image_sequence, natural_key
from extract.decode import decode_row
from extract.encoders.base import Preprocess

from conftest import frame_value, write_test_mp4
from test_builders import _listed

VIDEO_PP = Preprocess(clip_seconds=1.0, frames_per_clip=4, image_size=16, audio_rate=16000)
GREYS = [10, 30, 50, 70, 90, 110, 130, 150, 170, 190]  # image i of a sequence is flat grey GREYS[i]


def image(path: Path, grey: int, suffix: str = "png") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((24, 32, 3), grey, np.uint8)).save(path, quality=100) if suffix == "jpg" else \
        Image.fromarray(np.full((24, 32, 3), grey, np.uint8)).save(path)


def wav(path: Path, seconds: float) -> None:
    import scipy.io.wavfile

    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * 16000)) / 16000
    scipy.io.wavfile.write(path, 16000, (0.5 * np.sin(2 * np.pi * 440 * t) * 32767).astype(np.int16))


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return write_test_mp4(tmp_path_factory.mktemp("tpl") / "clip.mp4")


def video_layouts(root: Path, clip: Path) -> dict[str, Path]:
    """AVE, VGGSound, VS100, VGG-Instruments, VGG-Sound Sources and Kinetics-Sounds folders, two clips each."""
    out = {}

    def put(rel: str, base: Path) -> None:
        (base / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(clip, base / rel)

    ave = root / "ave"
    ave.mkdir()
    lines = ["Cat&aaaaaaaaaa1&good&0&10", "Bark&bbbbbbbbbb2&good&2&8"]
    (ave / "Annotations.txt").write_text("Category&VideoID&Quality&StartTime&EndTime\n" + "\n".join(lines) + "\n")
    (ave / "trainSet.txt").write_text(lines[0] + "\n")
    (ave / "valSet.txt").write_text("")
    (ave / "testSet.txt").write_text(lines[1] + "\n")
    for vid in ("aaaaaaaaaa1", "bbbbbbbbbb2"):
        put(f"AVE/{vid}.mp4", ave)
    out["ave"] = ave

    vgg = root / "vggsound"
    vgg.mkdir()
    (vgg / "vggsound.csv").write_text("abcdefghijk,30,dog barking,train\nabcdefghijl,0,cat purring,test\n")
    put("video/abcdefghijk_000030.mp4", vgg)
    put("video/abcdefghijl_000000.mp4", vgg)
    out["vggsound"] = vgg

    src = root / "vgg-sources"
    shutil.copytree(vgg, src)
    (src / "metadata").mkdir()
    (src / "metadata" / "vggss.json").write_text(json.dumps([{"file": "x", "class": "dog barking"},
                                                             {"file": "y", "class": "cat purring"}]))
    out["vgg-sources"] = src

    for name, protocol in (("vs100", "vs100-10x10"), ("vgg-instruments", "vgg-instruments-4x9")):
        base = root / name
        _, listed = _listed(protocol, 1)
        for sid, _, _ in listed[:2]:
            put(f"video/{sid}.mp4", base)
        if name == "vs100":
            (base / "vggsound.csv").write_text("".join(
                f"{sid[:11]},{int(sid[12:])},\"{cls}\",{'test' if split == 'test' else 'train'}\n"
                for sid, split, cls in listed[:2]))
        out[name] = base

    ks = root / "ks"
    _, listed = _listed("ks-5x6", 1)
    (a, _, cls_a), (b, _, _) = listed[:2]
    put(f"train/{cls_a}/{a}_000010_000020.mp4", ks)
    put(f"val/{b}.mp4", ks)
    out["ks"] = ks
    return out


def image_layouts(root: Path) -> dict[str, Path]:
    """AVSBench S4, MS3 and AVSS folders in their released layouts (frames grey GREYS[i] in time order)."""
    s4 = root / "s4"
    base = s4 / "Single-source"
    base.mkdir(parents=True)
    (base / "s4_meta_data.csv").write_text("name,start_time,category,split\nclipA,0,dog_barking,train\n"
                                           "clip[B],1,cat_meowing,test\n")
    for name, split, cat in (("clipA", "train", "dog_barking"), ("clip[B]", "test", "cat_meowing")):
        for i in range(1, 6):
            image(base / "s4_data" / "visual_frames" / split / cat / name / f"{name}_{i}.png", GREYS[i - 1])
        for i in range(1, 2 if split == "train" else 6):
            image(base / "s4_data" / "gt_masks" / split / cat / name / f"{name}_{i}.png", 255)
        wav(base / "s4_data" / "audio_wav" / split / cat / f"{name}.wav", 5.0)

    ms3 = root / "ms3"
    base = ms3 / "Multi-sources"
    base.mkdir(parents=True)
    (base / "ms3_meta_data.csv").write_text("video_id,split\nvidA,train\nvidB,val\n")
    for vid, split in (("vidA", "train"), ("vidB", "val")):
        for i in range(1, 6):
            image(base / "ms3_data" / "visual_frames" / vid / f"{vid}.mp4_{i}.png", GREYS[i - 1])
            image(base / "ms3_data" / "gt_masks" / split / vid / f"{vid}_{i}.png", 0)
        wav(base / "ms3_data" / "audio_wav" / split / f"{vid}.wav", 5.0)

    avss = root / "avss"
    avss.mkdir()
    (avss / "label2idx.json").write_text(json.dumps({"background": 1, "dog": 2, "man": 3}))
    (avss / "metadata.csv").write_text("vid,uid,s_min,s_sec,a_obj,split,label\n"
                                       "v1,uid1,0,0,man_dog,train,v2\nv2,uid2,0,0,dog,test,v1s\n"
                                       "v3,uid3,0,0,man,val,v1m\n")
    for subset, uid, n in (("v2", "uid1", 10), ("v1s", "uid2", 5), ("v1m", "uid3", 5)):
        for i in range(n):
            image(avss / subset / uid / "frames" / f"{i}.jpg", GREYS[i], "jpg")
            image(avss / subset / uid / "labels_rgb" / f"{i}.png", 0)
            image(avss / subset / uid / "labels_semantic" / f"{i}.png", 0)
        wav(avss / subset / uid / "audio.wav", float(n))
    return {"avsbench-s4": s4, "avsbench-ms3": ms3, "avss": avss}


@pytest.fixture(scope="module")
def layouts(tmp_path_factory, clip):
    root = tmp_path_factory.mktemp("layouts")
    return {**video_layouts(root, clip), **image_layouts(root)}


@pytest.mark.parametrize("dataset", ["ave", "vggsound", "vs100", "vgg-instruments", "vgg-sources", "ks"])
def test_video_builders_rows_decode(layouts, dataset):
    manifest, report = build_manifest(dataset, layouts[dataset])
    assert len(manifest) == 2, report.format()
    for row in manifest:
        out = decode_row(row, layouts[dataset], VIDEO_PP)
        assert out.ok, out.reason
        assert out.frames.shape == (4, 16, 16, 3) and out.audio.shape == (16000,)
        # times 0.125 .. 0.875 s at 10 fps show frames 1, 3, 6, 8
        np.testing.assert_allclose(out.frames.reshape(4, -1).mean(1), [frame_value(k) for k in (1, 3, 6, 8)],
                                   atol=3)
        assert np.abs(out.audio[2000:14000]).max() == pytest.approx(0.5, abs=0.05)
        assert out.valid_len == pytest.approx(1.0)


@pytest.mark.parametrize("dataset, n_ok", [("avsbench-s4", 2), ("avsbench-ms3", 2), ("avss", 3)])
def test_image_sequence_builders_rows_decode(layouts, dataset, n_ok):
    manifest, report = build_manifest(dataset, layouts[dataset])
    assert len(manifest) == n_ok, report.format()
    for row in manifest:
        n = 10 if row.get("subset") == "v2" else 5  # AVSS v2 clips are 10 s, the others 5 s, 1 frame/s
        pp = Preprocess(clip_seconds=float(n), frames_per_clip=n, image_size=16, audio_rate=16000)
        out = decode_row(row, layouts[dataset], pp)
        assert out.ok, out.reason
        assert out.frames.shape == (n, 16, 16, 3) and out.audio.shape == (16000 * n,)
        # frame k at (k + 1/2) s is image k: the pattern's files in time order
        np.testing.assert_allclose(out.frames.reshape(n, -1).mean(1), GREYS[:n], atol=1)
        assert np.abs(out.audio).max() == pytest.approx(0.5, abs=0.01)
        assert out.valid_len == pytest.approx(n)
        masks = image_sequence(row["masks"], layouts[dataset])
        assert len(masks) == (1 if dataset == "avsbench-s4" and row["split"] == "train" else n)


def test_image_sequences_are_in_natural_order_for_patterns_and_folders(tmp_path):
    for i in range(1, 13):
        image(tmp_path / "seq" / f"x_{i}.png", 10 * i)
    (tmp_path / "seq" / "notes.txt").write_text("not an image")
    want = [tmp_path / "seq" / f"x_{i}.png" for i in range(1, 13)]
    assert image_sequence("seq/x_*.png", tmp_path) == want
    assert image_sequence("seq", tmp_path) == want
    assert image_sequence(str(tmp_path / "seq")) == want
    assert image_sequence("seq/y_*.png", tmp_path) == [] and image_sequence("nope", tmp_path) == []
    assert sorted(["a10", "a9", "a10b", "b1"], key=natural_key) == ["a9", "a10", "a10b", "b1"]
    pp = Preprocess(clip_seconds=12.0, frames_per_clip=12, image_size=8)
    for frames in ("seq/x_*.png", "seq"):
        out = decode_row({"sample_id": "s", "video": "seq", "frames": frames}, tmp_path, pp)
        assert out.ok, out.reason
        np.testing.assert_allclose(out.frames.reshape(12, -1).mean(1), [10 * i for i in range(1, 13)], atol=1)
    missing = decode_row({"sample_id": "s", "video": "seq", "frames": "seq/z_*.png"}, tmp_path, pp)
    assert missing.status != 1 and "z_*.png" in missing.reason


def test_s4_layout_extracts_to_a_store_whose_rows_are_all_ok(layouts, tmp_path):
    from click.testing import CliRunner

    from avcl_core.cache import STATUS_OK, open_store
    from extract.cli import cli

    res = CliRunner().invoke(cli, ["--dataset", "avsbench-s4", "--root", str(layouts["avsbench-s4"]), "--encoder",
                                   "signal", "-o", "clip_seconds=5.0", "-o", "frames_per_clip=5", "-o",
                                   "image_size=32", "--cache-dir", str(tmp_path), "--workers", "0", "--no-progress"])
    assert res.exit_code == 0, res.output
    (path,) = sorted((tmp_path / "avsbench-s4").glob("signal-*.zarr"))
    store = open_store(path)
    assert store.status == "complete" and sorted(store.sample_ids) == ["clipA", "clip[B]"]
    assert (store.row_status() == STATUS_OK).all()
    visual = store.read("visual")
    assert visual.shape[:2] == (2, 5) and np.all(np.abs(visual).sum(axis=(1, 2)) > 0)
