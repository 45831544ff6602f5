"""The synth dataset: clips that decode as promised, masks on the sounding object,
a valid manifest, protocol files, and byte-for-byte determinism."""
from __future__ import annotations

import json

import av
import decord
import numpy as np
import pytest

from avcl_core import synth
from avcl_core.manifest import Manifest
from avcl_core.paths import manifests_dir
from avcl_core.protocols import load_protocol

# Non-default parameters, so the test sees that every one of them is honoured.
PARAMS = dict(classes=6, clips_per_class=5, size=64, seconds=1.5, fps=6, audio_rate=22050)
N_FRAMES = 9  # 1.5 s x 6 fps


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """Three renders: seed 0 with 2 workers, seed 0 in-process, seed 1 in-process."""
    roots = {}
    for key, seed, workers in (("a", 0, 2), ("b", 0, 1), ("c", 1, 1)):
        out = tmp_path_factory.mktemp(f"synth-{key}")
        path = synth.render(out, seed=seed, workers=workers, **PARAMS)
        assert path == out / "manifest.jsonl"
        roots[key] = out
    return roots


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _frames(path, size=None):
    kw = {"width": size, "height": size} if size else {}
    vr = decord.VideoReader(str(path), **kw)
    return vr.get_batch(list(range(len(vr)))).asnumpy()


def _hue_chroma(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel hue (turns) and chroma of uint8 RGB (..., 3)."""
    x = rgb.astype(np.float64) / 255.0
    mx, mn = x.max(-1), x.min(-1)
    chroma = mx - mn
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    c = np.maximum(chroma, 1e-9)
    hue = np.where(mx == r, ((g - b) / c) % 6, np.where(mx == g, (b - r) / c + 2, (r - g) / c + 4)) / 6
    return hue, chroma


def _circ(a, b):
    d = np.abs(a - b) % 1.0
    return np.minimum(d, 1.0 - d)


# -- classes and protocols ----------------------------------------------------------
def test_class_names_depend_on_the_index_only_and_identities_are_distinct():
    assert synth.class_name(0) == "c00-red-circle-a3"
    assert synth.class_names(12)[:6] == synth.class_names(6)
    names = synth.class_names(synth.MAX_CLASSES)
    assert len(set(names)) == synth.MAX_CLASSES
    table = synth.class_table(synth.MAX_CLASSES)
    pairs = {(r["visual_id"], r["audio_id"]) for r in table}
    assert len(pairs) == synth.MAX_CLASSES  # the audio-visual pair identifies the class
    vis = {r["visual_id"]: json.dumps(r["visual"], sort_keys=True) for r in table}
    aud = {r["audio_id"]: json.dumps(r["audio"], sort_keys=True) for r in table}
    assert len(set(vis.values())) == len(vis)  # distinct ids look different
    assert len(set(aud.values())) == len(aud)  # ... and sound different
    with pytest.raises(ValueError, match="classes"):
        synth.class_names(synth.MAX_CLASSES + 1)


def test_each_modality_alone_confuses_classes_that_the_pair_separates():
    table = synth.class_table(12)
    by_vis, by_aud = {}, {}
    for r in table:
        by_vis.setdefault(r["visual_id"], []).append(r["label"])
        by_aud.setdefault(r["audio_id"], []).append(r["label"])
    assert sorted(by_vis.values()) == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11]]
    assert sorted(by_aud.values()) == [[0], [1, 2], [3, 4], [5, 6], [7, 8], [9, 10], [11]]
    # best possible accuracy of a perfect single-modality classifier, one clip per class
    assert len(by_vis) / 12 == 0.5 and len(by_aud) / 12 == 7 / 12


def test_protocol_shapes_and_shipped_protocols_match_the_generator(tmp_path):
    assert synth.protocol_shapes(12) == [(2, 6), (3, 4), (4, 3), (6, 2)]
    assert synth.protocol_shapes(7) == [(1, 7)]
    written = synth.write_protocols(tmp_path, 12)
    shipped = sorted((manifests_dir() / "protocols").glob("synth-[0-9]*.json"))
    assert [p.name for p in shipped] == sorted(p.name for p in written)
    for p in shipped:
        assert p.read_bytes() == (tmp_path / p.name).read_bytes(), p.name
    p43 = load_protocol("synth-4x3")
    assert p43.dataset == "synth" and p43.setting == "CIL" and p43.memory == 36
    assert p43.tasks == ((0, 1, 2), (3, 4, 5), (6, 7, 8), (9, 10, 11))
    assert list(p43.classes) == synth.class_names(12)
    assert load_protocol("synth-3x4").tasks == ((0, 1, 2, 3), (4, 5, 6, 7), (8, 9, 10, 11))


def test_bad_arguments_are_named(tmp_path):
    for kw, word in ((dict(classes=0), "classes"), (dict(clips_per_class=0), "clips_per_class"),
                     (dict(size=33), "size"), (dict(fps=0), "fps"), (dict(seed=-1), "seed")):
        with pytest.raises(ValueError, match=word):
            synth.render(tmp_path, workers=1, **kw)


# -- rendered files ---------------------------------------------------------------------
def test_manifest_validates_with_splits_paths_and_render_tag(rendered):
    root = rendered["a"]
    m = Manifest.load(root / "manifest.jsonl")
    assert len(m) == 30 and m.dataset == "synth"
    assert m.classes() == synth.class_names(6)
    assert m.counts() == {"train": 18, "val": 6, "test": 6}
    tag = synth.render_tag(6, 0, 64, 1.5, 6, 22050)
    for k, r in enumerate(m):
        i, j = divmod(k, 5)
        assert r["label"] == i and r["class_name"] == synth.class_name(i)
        assert r["sample_id"] == f"c{i:02d}-{j:04d}"
        assert r["split"] == ("train", "train", "train", "val", "test")[j]
        assert r["video"] == f"videos/{r['class_name']}/{r['sample_id']}.mp4"
        assert r["masks"] == f"masks/{r['sample_id']}.npz"
        assert r["subset"] == tag
        assert (root / r["video"]).is_file() and (root / r["masks"]).is_file()
    info = json.loads((root / "synth.json").read_text())
    assert info["seed"] == 0 and info["frames_per_clip"] == N_FRAMES
    assert [c["class_name"] for c in info["class_table"]] == synth.class_names(6)
    assert sorted(p.name for p in (root / "protocols").iterdir()) == ["synth-2x3.json", "synth-3x2.json"]
    p = load_protocol(str(root / "protocols" / "synth-3x2.json"))
    assert p.tasks == ((0, 1), (2, 3), (4, 5)) and p.memory == 18
    assert list(p.classes) == synth.class_names(6)


def test_clips_decode_with_the_promised_codecs_size_fps_and_duration(rendered):
    root = rendered["a"]
    for r in Manifest.load(root / "manifest.jsonl"):
        path = root / r["video"]
        with av.open(str(path)) as c:
            v, a = c.streams.video[0], c.streams.audio[0]
            assert (v.codec_context.name, a.codec_context.name) == ("h264", "aac")
            assert a.sample_rate == 22050 and a.channels == 1
        vr = decord.VideoReader(str(path))
        assert len(vr) == N_FRAMES and vr.get_avg_fps() == pytest.approx(6.0)
        assert vr[0].shape == (64, 64, 3)
        wav = decord.AudioReader(str(path), sample_rate=22050, mono=True)[:].asnumpy()
        # AAC pads the last 1024-sample frame; the content is the promised 1.5 s
        assert wav.shape[0] == 1 and 33075 <= wav.shape[1] <= 33075 + 2048
        assert 0.02 < np.sqrt(np.mean(wav[0, :33075] ** 2)) and np.abs(wav).max() <= 1.0


def test_masks_mark_the_sounding_object_in_every_frame(rendered):
    root = rendered["a"]
    coloured_distractors = 0
    for r in Manifest.load(root / "manifest.jsonl"):
        with np.load(root / r["masks"]) as z:
            masks = z["masks"]
        assert masks.shape == (N_FRAMES, 64, 64) and masks.dtype == np.uint8
        assert set(np.unique(masks)) <= {0, 1}
        assert (masks.sum((1, 2)) > 40).all(), r["sample_id"]  # every frame shows the object
        want = dict(synth.COLOURS)[synth.visual_identity(synth.visual_id(r["label"]))["colour"]]
        hue, chroma = _hue_chroma(_frames(root / r["video"]))
        inside = masks.astype(bool)
        # most mask pixels have the sounding object's colour ...
        on_colour = (chroma > 0.25) & (_circ(hue, want) < 0.06)
        assert on_colour[inside].mean() > 0.8, r["sample_id"]
        # ... and almost every pixel of that colour lies in the mask (edges may blur out by a pixel)
        grown = inside | np.roll(inside, 1, 1) | np.roll(inside, -1, 1) | np.roll(inside, 1, 2) | np.roll(inside, -1, 2)
        assert grown[on_colour].mean() > 0.95, r["sample_id"]
        # a coloured distractor (another colour, strong chroma) stays outside the mask
        other = (chroma > 0.4) & (_circ(hue, want) > 0.12)
        if other.sum() > 100:
            coloured_distractors += 1
            assert (other & inside).sum() < 0.02 * other.sum(), r["sample_id"]
    assert coloured_distractors >= 3  # the check above did run on some clips


def test_masks_follow_the_moving_object(rendered):
    root = rendered["a"]
    moved = 0
    for r in Manifest.load(root / "manifest.jsonl"):
        with np.load(root / r["masks"]) as z:
            m = z["masks"].astype(float)
        ys, xs = np.mgrid[:64, :64]
        cy = (m * ys).sum((1, 2)) / m.sum((1, 2))
        cx = (m * xs).sum((1, 2)) / m.sum((1, 2))
        moved += np.hypot(cx - cx[0], cy - cy[0]).max() > 2.0
    assert moved >= 20  # spinning objects may stay in place; the others move


# -- determinism ---------------------------------------------------------------------------
def test_same_seed_gives_identical_files_whatever_the_workers(rendered):
    a, b = _files(rendered["a"]), _files(rendered["b"])
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []
    m = Manifest.load(rendered["a"] / "manifest.jsonl")
    for r in m.rows[::7]:
        np.testing.assert_array_equal(_frames(rendered["a"] / r["video"]), _frames(rendered["b"] / r["video"]))


def test_another_seed_gives_other_clips_and_another_manifest_hash(rendered):
    ma = Manifest.load(rendered["a"] / "manifest.jsonl")
    mc = Manifest.load(rendered["c"] / "manifest.jsonl")
    assert ma.hash() != mc.hash()  # feature caches keyed on the manifest cannot mix the two
    assert [r["sample_id"] for r in ma] == [r["sample_id"] for r in mc]
    for ra, rc in zip(ma, mc):
        fa, fc = _frames(rendered["a"] / ra["video"]), _frames(rendered["c"] / rc["video"])
        assert np.abs(fa.astype(int) - fc).mean() > 1.0, ra["sample_id"]
        with np.load(rendered["a"] / ra["masks"]) as za, np.load(rendered["c"] / rc["masks"]) as zc:
            assert not np.array_equal(za["masks"], zc["masks"]), ra["sample_id"]


def test_rerender_with_the_same_parameters_reuses_the_folder(tmp_path):
    kw = dict(classes=2, clips_per_class=2, seed=3, workers=1, size=32, seconds=0.5, fps=4)
    path = synth.render(tmp_path, **kw)
    clip = tmp_path / synth.Manifest.load(path).rows[0]["video"]
    stamp = (path.stat().st_mtime_ns, clip.stat().st_mtime_ns)
    assert synth.render(tmp_path, **kw) == path
    assert (path.stat().st_mtime_ns, clip.stat().st_mtime_ns) == stamp  # nothing rewritten
    clip.unlink()  # an incomplete folder is rendered again
    synth.render(tmp_path, **kw)
    assert clip.is_file()
    before = path.read_bytes()
    synth.render(tmp_path, **{**kw, "seed": 4})  # other parameters: a new render
    assert path.read_bytes() != before
