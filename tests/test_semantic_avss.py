"""AVSBench-semantic in its released layout: palette-index masks read per sampled frame, and
the chain `avcl-data check` -> `avcl-extract` (semantic masks stored) -> `avcl-train --method cmr`
on avss-60-10."""
from __future__ import annotations

import json
import wave
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from avcl_core import manifest as manifest_module
from avcl_core.builders import build_manifest
from avcl_core.builders.avsbench import voc_palette
from avcl_core.cache import open_store
from avcl_core.protocols import load_protocol
from extract.encoders import build_encoder
from extract.masks import PALETTE_FORMAT, mask_spec_for, read_masks

SIGNAL_OPTS = ["-o", "frames_per_clip=5", "-o", "clip_seconds=5.0", "-o", "image_size=32", "-o", "dense_grid=4",
               "-o", "window_seconds=1.0"]
PALETTE = voc_palette(71)


def _clip(root: Path, subset: str, uid: str, split: str, classes: list[int], seed: int) -> None:
    """Five 24x24 frames; masks where class ``classes[j]`` covers columns ``4 j .. 4 j + 3 + k`` of
    frame ``k`` (colour masks in ``labels_rgb``, indices in ``labels_semantic``; v1s train: frame 0
    only; a 2x2 corner of unknown colour in the colour masks); a 5-s wav."""
    rng = np.random.default_rng(seed)
    base = root / subset / uid
    for k in range(5):
        f = base / "frames" / f"{k}.jpg"
        f.parent.mkdir(parents=True, exist_ok=True)
        img = rng.integers(0, 60, (24, 24, 3), dtype=np.uint8)
        for j, c in enumerate(classes):
            img[:, 4 * j: 4 * j + 4 + k] = (40 + 3 * c, 200 - c, 90 + j * 50)
        Image.fromarray(img).save(f, quality=95)
    for k in range(1 if (subset == "v1s" and split == "train") else 5):
        idx = np.zeros((24, 24), np.uint8)
        for j, c in enumerate(classes):
            idx[:, 4 * j: 4 * j + 4 + k] = c
        rgb = PALETTE[idx]
        rgb[:2, -2:] = (1, 2, 3)
        for folder, arr, mode in (("labels_rgb", rgb, "RGB"), ("labels_semantic", idx, "L")):
            f = base / folder / f"{k}.png"
            f.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr, mode).save(f)
    t = np.arange(16000 * 5) / 16000
    with wave.open(str(base / "audio.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((8000 * np.sin(2 * np.pi * (150 + 20 * classes[0]) * t)).astype(np.int16).tobytes())


def expected_index(classes: list[int], k: int, size: int = 24) -> np.ndarray:
    idx = np.zeros((24, 24), np.uint8)
    for j, c in enumerate(classes):
        idx[:, 4 * j: 4 * j + 4 + k] = c
    idx[:2, -2:] = 255
    return idx


#: uid -> (subset, split, palette classes): base classes 1, 2, 3; new classes 61, 62; one clip with 3 and 65
CLIPS = {
    "b1": ("v1s", "train", [1]), "b2": ("v1s", "train", [2]), "b3": ("v1m", "train", [3, 65]),
    "b4": ("v1s", "test", [1]), "b5": ("v1m", "test", [2, 3]),
    "n1": ("v1s", "train", [61]), "n2": ("v1m", "train", [62]), "n3": ("v1s", "test", [61]),
}


@pytest.fixture(scope="module")
def avss_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("avss")
    names = load_protocol("avss-60-10").classes  # background + the 70 classes, palette order
    (root / "label2idx.json").write_text(json.dumps({n: i + 1 for i, n in enumerate(names)}))
    lines = ["vid,uid,s_min,s_sec,a_obj,split,label"]
    for n, (uid, (subset, split, classes)) in enumerate(CLIPS.items()):
        _clip(root, subset, uid, split, classes, n)
        lines.append(f"v{n},{uid},0,0,{'_'.join(names[c] for c in classes)},{split},{subset}")
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    return root


def test_avss_masks_are_palette_indices_of_the_sampled_frames(avss_root):
    m, report = build_manifest("avss", avss_root)
    assert len(m) == len(CLIPS)
    enc = build_encoder("signal", frames_per_clip=5, clip_seconds=5.0, image_size=32, dense_grid=4)
    spec = mask_spec_for(m, enc.preprocess, "avss")
    assert spec.format == PALETTE_FORMAT and spec.size == 224
    spec = mask_spec_for(m, enc.preprocess, "avss", mask_size=24)
    rows = {r["sample_id"]: r for r in m}
    masks, valid = read_masks(rows["b1"], avss_root, spec, enc.preprocess)
    assert valid.tolist() == [1, 0, 0, 0, 0]  # v1s train: frame 0 only
    np.testing.assert_array_equal(masks[0], expected_index([1], 0))
    masks, valid = read_masks(rows["b5"], avss_root, spec, enc.preprocess)
    assert valid.tolist() == [1] * 5
    for k in range(5):  # colour masks mapped back through the palette; an unknown colour is 255
        np.testing.assert_array_equal(masks[k], expected_index([2, 3], k))
    # the index images read the same (no unknown colour there)
    masks2, _ = read_masks(dict(rows["b5"], masks=rows["b5"]["masks"].replace("labels_rgb", "labels_semantic")),
                           avss_root, spec, enc.preprocess)
    np.testing.assert_array_equal(np.where(masks == 255, 0, masks), masks2)
    small = mask_spec_for(m, enc.preprocess, "avss", mask_size=12)
    masks, _ = read_masks(rows["b5"], avss_root, small, enc.preprocess)
    np.testing.assert_array_equal(masks[4], expected_index([2, 3], 4)[1::2, 1::2])  # nearest neighbour


def test_avss_release_layout_checks_extracts_and_trains_cmr_on_avss_60_10(avss_root, tmp_path):
    from avcl_core.cli_data import main as data_main
    from extract.cli import cli as extract_cli
    from train.cli import main as train_main

    out = tmp_path / "avss.jsonl"
    res = CliRunner().invoke(data_main, ["check", "--dataset", "avss", "--root", str(avss_root), "--out", str(out)],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    if not hasattr(manifest_module, "image_sequence"):
        # frames given as a folder: the form the image-folder decoder of this checkout reads
        rows = [json.loads(x) for x in out.read_text().splitlines()]
        for r in rows:
            r["frames"] = r["video"]
        out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = CliRunner().invoke(extract_cli, ["--manifest", str(out), "--dataset", "avss", "--root", str(avss_root),
                                           "--encoder", "signal", *SIGNAL_OPTS, "-o", "mask_size=24", "--workers", "0",
                                           "--cache-dir", str(tmp_path / "cache"), "--no-progress"])
    assert res.exit_code == 0, res.output
    store = next((tmp_path / "cache" / "avss").glob("signal-*.zarr"))
    st = open_store(store)
    assert st.extras["masks"] == ((5, 24, 24), "uint8") and st.key_material["masks"]["format"] == PALETTE_FORMAT
    assert (st.read("status") == 1).all()
    ids = list(st.sample_ids)
    masks, valid = st.read("masks"), st.read("mask_valid")
    np.testing.assert_array_equal(masks[ids.index("n2"), 3], expected_index([62], 3))
    assert valid[ids.index("n1")].tolist() == [1, 0, 0, 0, 0]
    runs = train_main(["--cache", str(store), "--protocol", "avss-60-10", "--method", "cmr", "--epochs", "1",
                       "--set", "head.d_model=32", "--set", "mss_epochs=1", "--out", str(tmp_path / "runs"), "-q"])
    assert [r["status"] for r in runs] == ["ok"], [r.get("traceback") for r in runs]
    d = Path(runs[0]["run_dir"])
    A = np.loadtxt(d / "matrices" / "miou.csv", delimiter=",", skiprows=1)[:, 1:]
    assert A.shape == (2, 2) and np.isfinite(A).all()
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["primary_metric"] == "miou" and cfg["problem"] == "semantic"
    table = (d / "semantic_table.md").read_text()
    assert "channels 0-60" in table and table.count("\n| ") == 3
    # CMR's memory: every class of the training clips; b3 (classes 3 and 65) is a clip of both tasks
    import torch

    ck = torch.load(d / "ckpt_task1.pt", weights_only=True)
    held = {c: v for c, v in ck["memory"]["per_class"] if v}
    assert set(held) == {1, 2, 3, 61, 62, 65} and held[3] == held[65] and len(held[1]) == 1
