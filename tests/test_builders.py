"""Manifest builders on small copies of each released layout, broken rows and files included."""
from __future__ import annotations

import glob
import json
import wave
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from avcl_core.builders import BuildError, build_manifest, check_manifest
from avcl_core.builders.avsbench import voc_palette
from avcl_core.builders.common import (
    DUPLICATE, LABEL_DIFFERS, MALFORMED, MISSING, NO_AUDIO, NO_SPLIT, OFF_PALETTE, UNKNOWN_CLASS, UNREADABLE,
)
from avcl_core.manifest import Manifest
from avcl_core.protocols import load_protocol

MP4_HEADER = b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom" + b"\x00" * 64


def fake_mp4(path: Path) -> None:
    """A file with a valid MP4 header (passes the cheap probe; deep decoding rejects it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(MP4_HEADER)


def garbage(path: Path, data: bytes = b"this is not a media file at all") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def png(path: Path, value=(0, 0, 0), size=8, mode="RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (size, size), value).save(path)


def jpg(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (10, 20, 30)).save(path, format="JPEG")


def wav(path: Path, seconds=0.1, rate=16000) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.zeros(int(seconds * rate), dtype=np.int16).tobytes())


def real_mp4(path: Path, audio: bool = True) -> None:
    """A 4-frame 32x32 H.264 clip (+ AAC when ``audio``) written with PyAV."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as c:
        v = c.add_stream("libx264", rate=4)
        v.width = v.height = 32
        v.pix_fmt = "yuv420p"
        a = c.add_stream("aac", rate=16000) if audio else None
        for i in range(4):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 40 * i, np.uint8), format="rgb24")
            for pkt in v.encode(frame):
                c.mux(pkt)
        for pkt in v.encode():
            c.mux(pkt)
        if a is not None:
            samples = np.zeros((1, 16000), dtype=np.float32)
            af = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
            af.sample_rate = 16000
            for pkt in a.encode(af):
                c.mux(pkt)
            for pkt in a.encode():
                c.mux(pkt)


def problems(report, kind):
    return "\n".join(report.problems.get(kind, []))


# -- AVE ------------------------------------------------------------------------
def _ave_ids():
    p = load_protocol("ave-4x7")
    cat = p.class_index("Cat")
    cat_id = sorted(s for s, c in p.sample_labels.items() if c == cat)[0]
    return cat_id


def make_ave(root: Path) -> dict:
    cat_id = _ave_ids()  # AV-CIL lists this id as 'Cat'
    ann = [
        "Category&VideoID&Quality&StartTime&EndTime",
        "Cat&aaaaaaaaaa1&good&0&10",
        "Bark&bbbbbbbbbb2&good&2&8",
        "Cat&ccccccccc3x&good&0&10",          # video missing
        "Bark&ddddddddd4x&good&0&10",         # video is garbage
        "Cat&eeeeeeeee5x&good&0&10",          # video is empty
        "Helicopter&hhhhhhhhhh6&good&0&10",   # in no split list
        "Cat&broken-line-only-three&good",    # malformed
        f"Bark&{cat_id}&good&0&4",            # two events in one video; AV-CIL says Cat
        f"Cat&{cat_id}&good&5&9",
    ]
    root.mkdir(parents=True, exist_ok=True)
    (root / "Annotations.txt").write_bytes(("\n".join(ann) + "\n").encode() + b"Cat&\xff\xfebad&good&0&1\n")
    (root / "trainSet.txt").write_text("Cat&aaaaaaaaaa1&good&0&10\nCat&ccccccccc3x&good&0&10\n"
                                       f"Bark&{cat_id}&good&0&4\nBark&ddddddddd4x&good&0&10\n")
    (root / "valSet.txt").write_text("Bark&bbbbbbbbbb2&good&2&8\nCat&eeeeeeeee5x&good&0&10\n")
    (root / "testSet.txt").write_text("Cat&aaaaaaaaaa1&good&0&10\n")  # also in train: conflict
    for vid in ("aaaaaaaaaa1", "bbbbbbbbbb2", "hhhhhhhhhh6", cat_id):
        fake_mp4(root / "AVE" / f"{vid}.mp4")
    garbage(root / "AVE" / "ddddddddd4x.mp4")
    garbage(root / "AVE" / "eeeeeeeee5x.mp4", b"")
    return {"cat_id": cat_id}


def test_ave_builder_reports_every_problem_and_keeps_the_rest(tmp_path):
    info = make_ave(tmp_path)
    m, r = build_manifest("ave", tmp_path)
    by_id = {row["sample_id"]: row for row in m}
    assert set(by_id) == {"aaaaaaaaaa1", "bbbbbbbbbb2", info["cat_id"]}
    assert by_id["aaaaaaaaaa1"] == {"sample_id": "aaaaaaaaaa1", "dataset": "ave", "split": "train", "label": 1,
                                    "class_name": "Cat", "video": "AVE/aaaaaaaaaa1.mp4"}
    assert m.classes() == ["Bark", "Cat"]   # ids index the sorted names of the classes kept
    assert by_id[info["cat_id"]]["class_name"] == "Cat"    # the AV-CIL label wins over the first annotation
    assert r.counts == {"train": 2, "val": 1, "test": 0}
    assert r.count(MISSING) == 1 and "ccccccccc3x: AVE/ccccccccc3x.mp4" in problems(r, MISSING)
    assert r.count(UNREADABLE) == 2
    assert "ddddddddd4x" in problems(r, UNREADABLE) and "eeeeeeeee5x: AVE/eeeeeeeee5x.mp4 (empty file)" in problems(r, UNREADABLE)
    assert "hhhhhhhhhh6" in problems(r, NO_SPLIT)
    assert r.count(MALFORMED) == 2
    assert "Annotations.txt:8" in problems(r, MALFORMED) and "Annotations.txt:11: not valid UTF-8" in problems(r, MALFORMED)
    assert "aaaaaaaaaa1: listed in train and test" in problems(r, DUPLICATE)
    assert f"{info['cat_id']}: annotated as 'Bark', 'Cat'" in problems(r, DUPLICATE)
    assert r.dropped == 4 and r.annotated == 7   # distinct videos annotated
    text = r.format(examples=1)
    assert "unreadable file: 2" in text and "... and 1 more" in text and "train 2  val 1  test 0" in text


def test_ave_protocol_selects_the_built_rows(tmp_path):
    info = make_ave(tmp_path)
    m, _ = build_manifest("ave", tmp_path)
    p = load_protocol("ave-4x7")
    sel = p.select(m, "train")
    assert [m[i]["sample_id"] for i in sel] == [info["cat_id"]]   # the others are not in the AV-CIL lists


def test_missing_annotation_file_is_named(tmp_path):
    with pytest.raises(BuildError, match="Annotations.txt"):
        build_manifest("ave", tmp_path)
    with pytest.raises(BuildError, match="vggsound.csv"):
        build_manifest("vggsound", tmp_path)
    with pytest.raises(BuildError, match="s4_meta_data.csv"):
        build_manifest("avsbench-s4", tmp_path)
    with pytest.raises(BuildError, match="metadata.csv"):
        build_manifest("avss", tmp_path)
    with pytest.raises(BuildError, match="no builder for dataset 'avee'"):
        build_manifest("avee", tmp_path)
    with pytest.raises(BuildError, match="not a folder"):
        build_manifest("ave", tmp_path / "nope")


# -- VGGSound family ------------------------------------------------------------
def test_vggsound_builder(tmp_path):
    (tmp_path / "vggsound.csv").write_text(
        "abcdefghijk,30,dog barking,train\n"
        'abcdefghijl,0,"subway, metro, underground",test\n'
        "only,two\n"
        "xyzxyzxyzxy,notanumber,cat,train\n"
        "qqqqqqqqqqq,10,cat,validation\n"
        "abcdefghijk,30,dog barking,train\n"
        "missingvid1,20,cat,train\n"
    )
    fake_mp4(tmp_path / "video" / "abcdefghijk_000030.mp4")
    fake_mp4(tmp_path / "video" / "abcdefghijl_000000.mp4")
    m, r = build_manifest("vggsound", tmp_path)
    assert [row["sample_id"] for row in m] == ["abcdefghijk_000030", "abcdefghijl_000000"]
    assert m[1]["class_name"] == "subway, metro, underground" and m[1]["video"] == "video/abcdefghijl_000000.mp4"
    assert m.classes() == ["dog barking", "subway, metro, underground"]
    assert r.count(MALFORMED) == 3 and "vggsound.csv:3" in problems(r, MALFORMED)
    assert "vggsound.csv:4: start seconds 'notanumber'" in problems(r, MALFORMED)
    assert r.count(DUPLICATE) == 1 and r.count(MISSING) == 1 and "missingvid1_000020" in problems(r, MISSING)


def _listed(name, per_split=1):
    p = load_protocol(name)
    out = []
    for split in ("train", "val", "test"):
        out += [(sid, split, p.classes[p.sample_labels[sid]]) for sid in sorted(p.splits[split])[:per_split]]
    return p, out


def test_vs100_builder_takes_splits_and_classes_from_the_lists(tmp_path):
    p, listed = _listed("vs100-10x10", 2)
    lines = [f"{sid[:11]},{int(sid[12:])},\"{cls}\",{'test' if split == 'test' else 'train'}"
             for sid, split, cls in listed]
    lines[0] = lines[0].rsplit(",", 2)[0] + ",some other label,train"
    (tmp_path / "vggsound.csv").write_text("\n".join(lines) + "\n")
    for sid, _, _ in listed[1:]:
        fake_mp4(tmp_path / "video" / f"{sid}.mp4")
    m, r = build_manifest("vs100", tmp_path)
    assert {(row["sample_id"], row["split"], row["class_name"]) for row in m} == set(listed[1:])
    order = ("train", "val", "test")
    assert [order.index(row["split"]) for row in m] == sorted(order.index(row["split"]) for row in m)
    assert all(p.classes[row["label"]] == row["class_name"] for row in m)   # class ids = the AV-CIL order
    assert r.count(MISSING) == 61195 - 5 and listed[0][0] in problems(r, MISSING)
    assert r.count(LABEL_DIFFERS) == 1 and "'some other label'" in problems(r, LABEL_DIFFERS)
    lm = p.label_map(m)
    assert all(lm[row["label"]] == row["label"] for row in m)
    assert len(p.select(m, "val")) == 2


def test_vgg_instruments_builder(tmp_path):
    p, listed = _listed("vgg-instruments-4x9", 1)
    for sid, _, _ in listed:
        fake_mp4(tmp_path / "video" / f"{sid}.mp4")
    m, r = build_manifest("vgg-instruments", tmp_path)
    assert {(row["sample_id"], row["split"], row["class_name"]) for row in m} == set(listed)
    assert r.counts == {"train": 1, "val": 1, "test": 1}
    assert len(p.select(m, "test", range(4))) == 1


def test_ks_builder_finds_videos_in_any_kinetics_layout(tmp_path):
    p, listed = _listed("ks-5x6", 2)
    (a, _, cls_a), (b, _, _), (c, _, _), (d, _, _) = listed[:4]
    fake_mp4(tmp_path / "train" / cls_a / f"{a}_000010_000020.mp4")
    fake_mp4(tmp_path / "val" / f"{b}.mp4")
    garbage(tmp_path / "k400" / f"{c}_000001_000011.webm", b"\x1a\x45\xdf\xa3" + b"\x00" * 32)
    fake_mp4(tmp_path / "a" / f"{d}.mp4")
    fake_mp4(tmp_path / "b" / f"{d}_000000_000010.mp4")
    m, r = build_manifest("ks", tmp_path)
    videos = {row["sample_id"]: row["video"] for row in m}
    assert videos == {a: f"train/{cls_a}/{a}_000010_000020.mp4", b: f"val/{b}.mp4",
                      c: f"k400/{c}_000001_000011.webm", d: f"a/{d}.mp4"}
    assert all(len(s) == 11 for s in videos)
    assert r.count(DUPLICATE) == 1 and d in problems(r, DUPLICATE)
    assert r.count(MISSING) == 19220 + 1947 + 1958 - 4


def test_vgg_sources_builder(tmp_path):
    (tmp_path / "vggsound.csv").write_text(
        "aaaaaaaaaaa,10,dog barking,train\nbbbbbbbbbbb,20,cat purring,test\nccccccccccc,0,lawn mowing,train\n"
    )
    (tmp_path / "metadata").mkdir()
    (tmp_path / "metadata" / "vggss.json").write_text(json.dumps([
        {"file": "x", "class": "dog barking"}, {"file": "y", "class": "cat purring"},
        {"file": "z", "class": "tuning fork"}, {"file": "w"},
    ]))
    for sid in ("aaaaaaaaaaa_000010", "bbbbbbbbbbb_000020", "ccccccccccc_000000"):
        fake_mp4(tmp_path / "video" / f"{sid}.mp4")
    m, r = build_manifest("vgg-sources", tmp_path)
    assert [row["class_name"] for row in m] == ["dog barking", "cat purring"]
    assert m.classes() == ["cat purring", "dog barking"]
    assert "'tuning fork'" in problems(r, UNKNOWN_CLASS) and r.count(MALFORMED) == 1


# -- AVSBench -------------------------------------------------------------------
def _s4_clip(base: Path, split, cat, name, skip=(), corrupt=()):
    for i in range(1, 6):
        f = base / "s4_data" / "visual_frames" / split / cat / name / f"{name}_{i}.png"
        if f"frame{i}" not in skip:
            png(f)
    for i in range(1, (2 if split == "train" else 6)):
        f = base / "s4_data" / "gt_masks" / split / cat / name / f"{name}_{i}.png"
        garbage(f) if f"mask{i}" in corrupt else png(f, 255, mode="L")
    if "audio" not in skip:
        wav(base / "s4_data" / "audio_wav" / split / cat / f"{name}.wav")


def test_s4_builder(tmp_path):
    base = tmp_path / "Single-source"
    base.mkdir()
    (base / "s4_meta_data.csv").write_text(
        "name,start_time,category,split\n"
        "clipA,0,dog_barking,train\n"
        "clipB,1,cat_meowing,val\n"
        "clipC,0,dog_barking,test\n"
        "clipD,2,cat_meowing,train\n"
        "clipE,0,cat_meowing,training\n"
        "clipF,0\n"
    )
    _s4_clip(base, "train", "dog_barking", "clipA")
    _s4_clip(base, "val", "cat_meowing", "clipB")
    _s4_clip(base, "test", "dog_barking", "clipC", skip=("frame3",))
    _s4_clip(base, "train", "cat_meowing", "clipD", corrupt=("mask1",))
    m, r = build_manifest("avsbench-s4", tmp_path)
    assert [row["sample_id"] for row in m] == ["clipA", "clipB"]
    a = m[0]
    assert a["label"] == 1 and a["class_name"] == "dog_barking" and a["subset"] == "s4"
    assert a["audio"] == "Single-source/s4_data/audio_wav/train/dog_barking/clipA.wav"
    assert len(glob.glob(str(tmp_path / a["frames"]))) == 5
    assert len(glob.glob(str(tmp_path / a["masks"]))) == 1           # train: only the first frame's mask
    assert len(glob.glob(str(tmp_path / m[1]["masks"]))) == 5
    assert "clipC: Single-source/s4_data/visual_frames/test/dog_barking/clipC/clipC_3.png" in problems(r, MISSING)
    assert "clipD" in problems(r, UNREADABLE) and "not a PNG file" in problems(r, UNREADABLE)
    assert r.count(MALFORMED) == 2 and "s4_meta_data.csv:6" in problems(r, MALFORMED)
    # the built manifest passes the check of a given manifest with the same outcome
    m2, r2 = check_manifest(m, tmp_path)
    assert m2.rows == m.rows and not r2.problems
    # S4 protocol: the class of a clip is its category
    p = load_protocol("s4-11-2-cil")
    t = p.task_of_class(p.class_index("dog_barking"))
    assert p.select(m, "train", [t]).tolist() == [0]


def test_s4_root_may_be_the_single_source_folder(tmp_path):
    (tmp_path / "s4_meta_data.csv").write_text("name,start_time,category,split\nclipA,0,dog_barking,train\n")
    _s4_clip(tmp_path, "train", "dog_barking", "clipA")
    m, r = build_manifest("avsbench-s4", tmp_path)
    assert len(m) == 1 and m[0]["audio"] == "s4_data/audio_wav/train/dog_barking/clipA.wav"


def test_ms3_builder(tmp_path):
    base = tmp_path / "Multi-sources"
    base.mkdir()
    (base / "ms3_meta_data.csv").write_text("video_id,split\nvidA,train\nvidB,test\nvidC,val\n")
    for vid, split in (("vidA", "train"), ("vidB", "test"), ("vidC", "val")):
        for i in range(1, 6):
            png(base / "ms3_data" / "visual_frames" / vid / f"{vid}.mp4_{i}.png")
            png(base / "ms3_data" / "gt_masks" / split / vid / f"{vid}_{i}.png", 0, mode="P")
        if vid != "vidB":
            wav(base / "ms3_data" / "audio_wav" / split / f"{vid}.wav")
    m, r = build_manifest("avsbench-ms3", tmp_path)
    assert [row["sample_id"] for row in m] == ["vidA", "vidC"]
    assert m[0]["class_name"] == "sounding" and m[0]["label"] == 0
    assert m[0]["frames"] == "Multi-sources/ms3_data/visual_frames/vidA/vidA.mp4_*.png"
    assert "vidB: Multi-sources/ms3_data/audio_wav/test/vidB.wav" in problems(r, MISSING)
    p = load_protocol("ms3-taskfree")
    assert sorted(np.concatenate([p.select(m, "train", [t]) for t in range(50)]).tolist()) == [0]


def _avss_clip(root, subset, uid, split, n_frames, n_masks, skip=(), mask_colour=(0, 0, 0)):
    base = root / subset / uid
    for i in range(n_frames):
        jpg(base / "frames" / f"{i}.jpg")
    for i in range(n_masks):
        if f"mask{i}" not in skip:
            png(base / "labels_rgb" / f"{i}.png", mask_colour)
            png(base / "labels_semantic" / f"{i}.png", 0, mode="L")
    if "audio" not in skip:
        wav(base / "audio.wav")


def make_avss(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "label2idx.json").write_text(json.dumps({"background": 1, "accordion": 2, "dog": 3, "man": 4}))
    (root / "metadata.csv").write_text(
        "vid,uid,s_min,s_sec,a_obj,split,label\n"
        "v1,uid1,0,0,man_dog,train,v2\n"
        "v2,uid2,0,0,accordion,train,v1s\n"
        "v3,uid3,0,0,dog,test,v1s\n"
        "v4,uid4,0,0,off-the-screen,val,v1m\n"
        "v5,uid5,0,0,tuba_dog,train,v2\n"
        "v6,uid6,0,0,dog,train,v3\n"
    )
    _avss_clip(root, "v2", "uid1", "train", 10, 10, mask_colour=(1, 2, 3))  # off-palette colour
    _avss_clip(root, "v1s", "uid2", "train", 5, 1, mask_colour=tuple(int(x) for x in voc_palette(2)[1]))
    _avss_clip(root, "v1s", "uid3", "test", 5, 5, skip=("mask4",))
    _avss_clip(root, "v1m", "uid4", "val", 5, 5)
    _avss_clip(root, "v2", "uid5", "train", 10, 10)


def test_avss_builder(tmp_path):
    make_avss(tmp_path)
    m, r = build_manifest("avss", tmp_path)
    by_id = {row["sample_id"]: row for row in m}
    assert sorted(by_id) == ["uid1", "uid2", "uid4", "uid5"]
    assert by_id["uid1"]["label"] == [3, 2] and by_id["uid1"]["class_name"] == "man;dog"
    assert by_id["uid2"]["label"] == [1] and by_id["uid2"]["subset"] == "v1s"
    assert by_id["uid4"]["label"] == [0] and by_id["uid4"]["class_name"] == "background"
    assert by_id["uid5"]["label"] == [2]
    assert by_id["uid1"]["audio"] == "v2/uid1/audio.wav"
    assert len(glob.glob(str(tmp_path / by_id["uid1"]["frames"]))) == 10
    assert "uid3: v1s/uid3/labels_rgb/4.png" in problems(r, MISSING)
    assert "'tuba'" in problems(r, UNKNOWN_CLASS) and "metadata.csv:7" in problems(r, MALFORMED)
    assert m.classes()[:4] == ["background", "accordion", "dog", "man"]
    assert r.count(OFF_PALETTE) == 0  # palette checks decode masks: only with deep=True


def test_avss_deep_check_reports_off_palette_masks(tmp_path):
    make_avss(tmp_path)
    m, r = build_manifest("avss", tmp_path, deep=True)
    assert len(m) == 4
    off = problems(r, OFF_PALETTE)
    assert r.count(OFF_PALETTE) == 10 and "uid1: v2/uid1/labels_rgb/0.png has 64 pixels" in off and "(1,2,3)" in off
    assert "uid2" not in off


def test_voc_palette():
    pal = voc_palette(71)
    assert pal[0].tolist() == [0, 0, 0] and pal[1].tolist() == [128, 0, 0] and pal[2].tolist() == [0, 128, 0]
    assert pal[8].tolist() == [64, 0, 0] and len({tuple(c) for c in pal.tolist()}) == 71


# -- deep probes and given manifests --------------------------------------------
def test_deep_probe_decodes_videos(tmp_path):
    (tmp_path / "vggsound.csv").write_text(
        "aaaaaaaaaaa,0,x,train\nbbbbbbbbbbb,0,x,train\nccccccccccc,0,x,test\n"
    )
    real_mp4(tmp_path / "video" / "aaaaaaaaaaa_000000.mp4")
    real_mp4(tmp_path / "video" / "bbbbbbbbbbb_000000.mp4", audio=False)
    fake_mp4(tmp_path / "video" / "ccccccccccc_000000.mp4")
    m, r = build_manifest("vggsound", tmp_path)
    assert len(m) == 3 and not r.problems                      # headers all look fine
    m, r = build_manifest("vggsound", tmp_path, deep=True)
    assert [row["sample_id"] for row in m] == ["aaaaaaaaaaa_000000", "bbbbbbbbbbb_000000"]
    assert "ccccccccccc_000000" in problems(r, UNREADABLE)
    assert "bbbbbbbbbbb_000000" in problems(r, NO_AUDIO)       # kept: extraction marks it


def test_check_manifest_of_your_own(tmp_path):
    fake_mp4(tmp_path / "clips" / "one.mp4")
    garbage(tmp_path / "clips" / "two.mp4")
    for i in range(3):
        png(tmp_path / "frames" / "one" / f"{i}.png")
    (tmp_path / "masks" / "empty").mkdir(parents=True)
    rows = [
        {"sample_id": "one", "dataset": "mine", "split": "train", "label": 0, "class_name": "a",
         "video": "clips/one.mp4", "frames": "frames/one/*.png"},
        {"sample_id": "two", "dataset": "mine", "split": "test", "label": 1, "class_name": "b",
         "video": "clips/two.mp4"},
        {"sample_id": "three", "dataset": "mine", "split": "test", "label": 1, "class_name": "b",
         "video": "clips/three.mp4"},
        {"sample_id": "four", "dataset": "mine", "split": "val", "label": 0, "class_name": "a",
         "video": "clips/one.mp4", "masks": "masks/empty"},
    ]
    m = Manifest(rows, source="mine.jsonl")
    out, r = check_manifest(m, tmp_path)
    assert [row["sample_id"] for row in out] == ["one"]
    assert "two: clips/two.mp4 (not a MP4 file" in problems(r, UNREADABLE)
    assert "three: clips/three.mp4" in problems(r, MISSING) and "four: masks/empty/" in problems(r, MISSING)
    assert r.counts == {"train": 1, "val": 0, "test": 0} and r.dropped == 3
