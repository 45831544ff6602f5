"""Long segmentation runs: every method in every setting, and Low-Rank Anchoring against forgetting."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from avcl_core import synth
from avcl_core.manifest import Manifest
from extract.encoders import build_encoder
from extract.runner import extract
from train.cli import main as train_main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def synth12(tmp_path_factory):
    """12 synth classes x 10 clips (6 train, 2 val, 2 test), 32 px, 1 s; signal features with masks."""
    root = tmp_path_factory.mktemp("synth12")
    m = synth.render(root, classes=12, clips_per_class=10, seed=0, workers=1, size=32, seconds=1.0, fps=8,
                     audio_rate=16000)
    enc = build_encoder("signal", frames_per_clip=4, image_size=32, clip_seconds=1.0, dense_grid=4)
    return extract(Manifest.load(m), root, enc, root / "cache", workers=0, progress=False).store


@pytest.mark.parametrize("setting", ["cil", "til", "dil", "taskfree"])
def test_every_segmentation_method_in_every_setting(synth12, tmp_path, setting):
    res = train_main(["--cache", synth12, "--protocol", f"synth-seg-{setting}", "--method",
                      "atlas,finetune,joint,lwf,ewc,si,mas", "--epochs", "1", "--set", "batch_size=16",
                      "--set", "head.d_model=32", "--out", str(tmp_path), "-q"])
    assert [r["status"] for r in res] == ["ok"] * 7, [r.get("error") for r in res]
    res = train_main(["--cache", synth12, "--protocol", f"synth-seg-{setting}", "--method", "finetune",
                      "--head", "avs-static", "--epochs", "1", "--set", "batch_size=16", "--set", "head.d_model=32",
                      "--out", str(tmp_path), "-q"])
    assert res[0]["status"] == "ok", res[0].get("error")
    for r in res:
        assert (Path(r["run_dir"]) / "matrices" / "fscore.csv").is_file()


def test_low_rank_anchoring_forgets_less_than_atlas_without_it(synth12, tmp_path):
    """ATLAS on synth-seg-cil, 10 epochs per task, seeds 0-2, the synth preset's strength vs strength 0.

    Measured (2026-12-03, 2-core machine): average forgetting of pixel mAP
    0.105 without LRA (seeds 0-2: 0.082, 0.087, 0.146) and 0.042 with c = 30
    (0.030, 0.044, 0.052); with the paper's c = 0.3 it is 0.105 (no measurable
    effect at this scale: the SI importances are small next to the task loss).
    """
    forgetting = {}
    for c in ("0", "30"):
        res = train_main(["--cache", synth12, "--protocol", "synth-seg-cil", "--method", "atlas", "--seeds", "0-2",
                          "--epochs", "10", "--set", "batch_size=16", "--set", f"strength={c}",
                          "--set", "head.d_model=64", "--out", str(tmp_path / f"c{c}"), "-q"])
        assert [r["status"] for r in res] == ["ok"] * 3
        forgetting[c] = [r["metrics"]["average_forgetting"] for r in res]
    assert np.mean(forgetting["30"]) < np.mean(forgetting["0"]), forgetting
    assert sum(a < b for a, b in zip(forgetting["30"], forgetting["0"])) >= 2, forgetting
