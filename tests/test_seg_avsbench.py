"""AVSBench S4 in its released layout: masks read and aligned per sampled frame, and the whole
chain `avcl-data check` -> `avcl-extract` (masks stored) -> `avcl-train --method atlas` on s4-11-2-cil."""
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
from avcl_core.cache import open_store
from avcl_core.protocols import load_protocol
from extract.encoders import build_encoder
from extract.masks import MaskError, mask_spec_for, read_masks

SIGNAL_OPTS = ["-o", "frames_per_clip=5", "-o", "clip_seconds=5.0", "-o", "image_size=32", "-o", "dense_grid=4",
               "-o", "window_seconds=1.0"]


def _clip(base: Path, split: str, cat: str, name: str, seed: int) -> None:
    """Five 24x24 frames, masks (train: ``_1`` only) whose foreground is the first ``4 k`` columns
    of frame ``k``, and a 5-s wav — the S4 release layout."""
    rng = np.random.default_rng(seed)
    for k in range(1, 6):
        f = base / "s4_data" / "visual_frames" / split / cat / name / f"{name}_{k}.png"
        f.parent.mkdir(parents=True, exist_ok=True)
        img = rng.integers(0, 80, (24, 24, 3), dtype=np.uint8)
        img[:, : 4 * k] = (200 + seed % 50, 40, 40)
        Image.fromarray(img).save(f)
    for k in range(1, 2 if split == "train" else 6):
        f = base / "s4_data" / "gt_masks" / split / cat / name / f"{name}_{k}.png"
        f.parent.mkdir(parents=True, exist_ok=True)
        m = np.zeros((24, 24), np.uint8)
        m[:, : 4 * k] = 255
        Image.fromarray(m, "L").save(f)
    f = base / "s4_data" / "audio_wav" / split / cat / f"{name}.wav"
    f.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(16000 * 5) / 16000
    with wave.open(str(f), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((8000 * np.sin(2 * np.pi * (200 + 40 * (seed % 23)) * t)).astype(np.int16).tobytes())


@pytest.fixture(scope="module")
def s4_root(tmp_path_factory) -> Path:
    """Every S4 category with two train clips and one test clip."""
    root = tmp_path_factory.mktemp("s4")
    base = root / "Single-source"
    base.mkdir()
    cats = load_protocol("s4-11-2-cil").classes
    lines = ["name,start_time,category,split"]
    n = 0
    for cat in sorted(cats):
        for split in ("train", "train", "test"):
            name = f"v{n:03d}"
            _clip(base, split, cat, name, n)
            lines.append(f"{name},0,{cat},{split}")
            n += 1
    (base / "s4_meta_data.csv").write_text("\n".join(lines) + "\n")
    return root


def test_s4_masks_follow_the_sampled_frames_and_train_clips_have_only_the_first(s4_root):
    m, _ = build_manifest("avsbench-s4", s4_root)
    enc = build_encoder("signal", frames_per_clip=5, clip_seconds=5.0, image_size=32, dense_grid=4)
    spec = mask_spec_for(m, enc.preprocess, "avsbench-s4")
    assert spec.size == 224 and spec.frames == 5  # AVSBench's annotation resolution by default
    spec = mask_spec_for(m, enc.preprocess, "avsbench-s4", mask_size=48)
    train = next(r for r in m if r["split"] == "train")
    test = next(r for r in m if r["split"] == "test")
    masks, valid = read_masks(train, s4_root, spec, enc.preprocess)
    assert valid.tolist() == [1, 0, 0, 0, 0] and masks[1:].max() == 0
    assert masks[0].sum() == 48 * 8  # 4 of 24 columns, nearest-resized to 48 px: 8 columns
    masks, valid = read_masks(test, s4_root, spec, enc.preprocess)
    assert valid.tolist() == [1] * 5
    assert [int(x.sum()) for x in masks] == [48 * 8 * k for k in range(1, 6)]
    # sampling 2 frames over the 5 s picks images 2 and 4 (sample times 1.25 s and 3.75 s)
    enc2 = build_encoder("signal", frames_per_clip=2, clip_seconds=5.0, image_size=32, dense_grid=4)
    masks, valid = read_masks(test, s4_root, mask_spec_for(m, enc2.preprocess, "avsbench-s4", 48), enc2.preprocess)
    assert [int(x.sum()) for x in masks] == [48 * 8 * 2, 48 * 8 * 4]
    bad = dict(test, masks=test["masks"].replace("gt_masks", "gt_masks_nowhere"))
    masks, valid = read_masks(bad, s4_root, spec, enc.preprocess)
    assert valid.sum() == 0  # no mask file for any frame: no ground truth, not a crash
    (s4_root / "broken_1.png").write_bytes(b"not a png")
    with pytest.raises(MaskError, match="broken_1.png"):
        read_masks(dict(test, masks="broken_*.png"), s4_root, spec, enc.preprocess)


@pytest.mark.skipif(not hasattr(manifest_module, "image_sequence"),
                    reason="decoding AVSBench frame patterns needs avcl_core.manifest.image_sequence")
def test_s4_release_layout_checks_extracts_with_masks_and_trains_atlas(s4_root, tmp_path):
    from avcl_core.cli_data import main as data_main
    from extract.cli import cli as extract_cli
    from train.cli import main as train_main

    out = tmp_path / "s4.jsonl"
    res = CliRunner().invoke(data_main, ["check", "--dataset", "avsbench-s4", "--root", str(s4_root),
                                         "--out", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(extract_cli, ["--manifest", str(out), "--dataset", "avsbench-s4", "--root", str(s4_root),
                                           "--encoder", "signal", *SIGNAL_OPTS, "-o", "mask_size=32", "--workers", "0",
                                           "--cache-dir", str(tmp_path / "cache"), "--no-progress"])
    assert res.exit_code == 0, res.output
    store = next((tmp_path / "cache" / "avsbench-s4").glob("signal-*.zarr"))
    st = open_store(store)
    assert st.extras["masks"] == ((5, 32, 32), "uint8")
    split = np.array([json.loads(x)["split"] for x in (store / "manifest.jsonl").read_text().splitlines()])
    valid = st.read("mask_valid")
    assert (valid[split == "train"] == [1, 0, 0, 0, 0]).all() and (valid[split == "test"] == 1).all()
    assert (st.read("status") == 1).all()
    runs = train_main(["--cache", str(store), "--protocol", "s4-11-2-cil", "--method", "atlas", "--epochs", "1",
                       "--set", "head.d_model=32", "--out", str(tmp_path / "runs"), "-q"])
    assert runs[0]["status"] == "ok", runs[0].get("traceback")
    d = Path(runs[0]["run_dir"])
    A = np.loadtxt(d / "matrices" / "miou.csv", delimiter=",", skiprows=1)[:, 1:]
    assert A.shape == (7, 7) and np.isfinite(A).all()
    assert json.loads((d / "config.json").read_text())["primary_metric"] == "map"
