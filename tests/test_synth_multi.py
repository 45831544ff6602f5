"""Multi-source synth renders (``synth.render(multi > 0)``): two sounding objects per clip,
class-map masks, their extraction and their semantic channel maps."""
from __future__ import annotations

import numpy as np
import pytest

from avcl_core import synth
from avcl_core.cache import open_store
from avcl_core.manifest import Manifest
from avcl_core.protocols import protocol_from_dict
from extract.encoders import build_encoder
from extract.masks import CLASS_MAP_FORMAT, MASK_FORMAT
from extract.runner import extract
from train.features import FeatureSet
from train.methods import build_method
from train.trainer import Trainer

RENDER = dict(classes=6, clips_per_class=3, seed=0, workers=1, size=32, seconds=0.5, fps=8, audio_rate=16000)


@pytest.fixture(scope="module")
def renders(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthmulti")
    single = synth.render(root / "single", **RENDER)
    multi = synth.render(root / "multi", multi=0.6, **RENDER)
    return root, Manifest.load(single), Manifest.load(multi)


def _masks(root, row):
    with np.load(root / row["masks"]) as z:
        return z["masks"]


def test_multi_render_labels_each_sounding_object_with_its_class(renders):
    root, single, multi = renders
    rows_s = {r["sample_id"]: r for r in single.rows}
    pairs = [r for r in multi.rows if isinstance(r["label"], list)]
    assert 0 < len(pairs) < len(multi.rows)
    for r in multi.rows:
        assert r["subset"].endswith(",multi=0.6") and synth.multi_of(r["subset"]) == 0.6
        m = _masks(root / "multi", r)
        s = rows_s[r["sample_id"]]
        if isinstance(r["label"], list):
            i, k = r["label"]
            assert abs(synth.visual_id(i) - synth.visual_id(k)) > 1
            assert r["class_name"] == f"{synth.class_name(i)};{synth.class_name(k)}"
            assert set(np.unique(m)) == {0, i + 1, k + 1}  # both objects are visible in some frame
            # the same clip index draws its partner from its own stream: the primary object is unchanged
            ms = _masks(root / "single", s)
            assert ((m == i + 1) <= (ms == 1)).all()
            assert (root / "multi" / r["video"]).read_bytes() != (root / "single" / s["video"]).read_bytes()
        else:  # a clip without partner is the single-source clip, its mask a class map
            i = r["label"]
            np.testing.assert_array_equal(m, _masks(root / "single", s) * (i + 1))
            assert (root / "multi" / r["video"]).read_bytes() == (root / "single" / s["video"]).read_bytes()
    assert all(synth.multi_of(r["subset"]) == 0 and "multi" not in r["subset"] for r in single.rows)
    with pytest.raises(ValueError, match="multi"):
        synth.render(root / "bad", multi=1.5, **RENDER)


def test_multi_render_extracts_class_maps_and_semantic_channels_follow_them(renders, tmp_path):
    root, single, multi = renders
    enc = build_encoder("signal", frames_per_clip=4, image_size=32, clip_seconds=0.5, dense_grid=4)
    s = extract(multi, root / "multi", enc, tmp_path / "cache", workers=0, progress=False)
    st = open_store(s.store)
    assert st.key_material["masks"]["format"] == CLASS_MAP_FORMAT
    s1 = extract(single, root / "single", enc, tmp_path / "cache", workers=0, progress=False)
    assert open_store(s1.store).key_material["masks"]["format"] == MASK_FORMAT
    stored = st.read("masks")
    p = protocol_from_dict(synth.sem_protocols(6)[0])  # synth-sem-4-1: background + 4, then 2 steps of 1
    fs = FeatureSet.from_stores([s.store], streams={"visual": "visual_dense"})
    tr = Trainer(fs, p, build_method("finetune", {"epochs": 1, "batch_size": 8}), head="atlas",
                 head_config={"d_model": 16}, seed=0)
    ch = tr.problem.masks.numpy()
    raw = stored[tr.fs.rows]
    # channel = class id + 1 (classes in index order after background): the class maps unchanged
    np.testing.assert_array_equal(ch, raw)
    by_id = {r["sample_id"]: r for r in multi.rows}
    two = [j for j, sid in enumerate(fs.sample_ids) if isinstance(by_id[sid]["label"], list)]
    assert two and any(len(set(np.unique(ch[j])) - {0}) == 2 for j in two)
    # a two-object clip belongs to the tasks of both its classes (overlapped protocol)
    for j in two:
        i, k = by_id[fs.sample_ids[j]]["label"]
        tasks = {t for t in range(tr.T) if j in tr.split_idx[by_id[fs.sample_ids[j]]["split"]][t]}
        want = {int(np.searchsorted(tr.offsets[1:], c + 1, side="right")) for c in (i, k)}
        assert tasks == want
    # binary segmentation of the same store: the mask of every sounding object
    seg = Trainer(fs, protocol_from_dict(synth.seg_protocols(6)[0]), build_method("finetune", {"epochs": 1}),
                  head="atlas", head_config={"d_model": 16}, seed=0)
    np.testing.assert_array_equal(seg.problem.masks_np, (raw != 0).astype(np.uint8))
