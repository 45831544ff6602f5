import json
import os

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from avcl_core import cache as C
from avcl_core.avcil_import import AvcilImportError, FeatureFile, import_avcil, protocol_manifest
from avcl_core.cli_cache import main
from avcl_core.manifest import Manifest

# the tiny protocol: 2 classes, ids a..e; "e" is in the protocol but not in the released files
SPLITS = {"train": [["a", "b"], ["c"]], "test": [["d"], ["e"]]}
LABELS = {"a": 0, "b": 0, "c": 1, "d": 0, "e": 1}
ROW_ORDER = ["a", "b", "c", "d", "e"]  # train then test; by class, then id
RELEASED = ["a", "b", "c", "d"]


@pytest.fixture
def release(tmp_path):
    """AV-CIL-format files: audio dict .npy, visual .h5 and visual dict .npy; plus a protocol JSON."""
    rng = np.random.default_rng(0)
    audio = {sid: rng.standard_normal(768).astype(np.float32) for sid in RELEASED}
    visual = {sid: rng.standard_normal((1568, 768)).astype(np.float32) for sid in RELEASED}
    d = tmp_path / "AVE"
    (d / "audio_pretrained_feature").mkdir(parents=True)
    (d / "visual_pretrained_feature").mkdir()
    np.save(d / "audio_pretrained_feature" / "audio_pretrained_feature_dict.npy", audio)
    np.save(d / "visual_pretrained_feature" / "visual_pretrained_feature_dict.npy", visual)
    with h5py.File(tmp_path / "visual_features.h5", "w") as f:
        for sid, v in visual.items():
            f.create_dataset(sid, data=v)
    proto = tmp_path / "tiny-2x1.json"
    proto.write_text(json.dumps({"name": "tiny-2x1", "dataset": "ave", "classes": ["dog", "cat"],
                                 "tasks": [[0], [1]], "memory": 2, "splits": SPLITS}))
    return {"dir": d, "audio": d / "audio_pretrained_feature" / "audio_pretrained_feature_dict.npy",
            "visual_npy": d / "visual_pretrained_feature" / "visual_pretrained_feature_dict.npy",
            "visual_h5": tmp_path / "visual_features.h5", "protocol": proto,
            "audio_data": audio, "visual_data": visual}


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _stores(root, encoder):
    return [p for p in C.find_stores(root) if os.path.basename(p).startswith(encoder + "-")]


def test_protocol_manifest_rows(release):
    m = protocol_manifest(release["protocol"])
    assert [(r["sample_id"], r["split"], r["label"], r["class_name"], r["video"]) for r in m] == [
        ("a", "train", 0, "dog", "a.mp4"), ("b", "train", 0, "dog", "b.mp4"), ("c", "train", 1, "cat", "c.mp4"),
        ("d", "test", 0, "dog", "d.mp4"), ("e", "test", 1, "cat", "e.mp4")]
    assert m.dataset == "ave" and protocol_manifest(release["protocol"], "ks").dataset == "ks"


def test_import_audio_dict_and_visual_h5(release, tmp_path):
    root = tmp_path / "cache"
    res = _run("import-avcil", "--protocol", release["protocol"], "--audio", release["audio"],
               "--visual", release["visual_h5"], "--trust-pickle", "--root", root, "--quiet")
    assert res.exit_code == 0, res.output
    assert "not in released features: e" in res.output
    [apath], [vpath] = _stores(root, "audiomae"), _stores(root, "videomae")
    assert os.path.dirname(apath) == str(root / "ave")
    audio, visual = C.open_store(apath), C.open_store(vpath)
    assert apath == C.store_path(root, "ave", "audiomae", audio.key)
    assert vpath == C.store_path(root, "ave", "videomae", visual.key)
    for st in (audio, visual):
        assert st.sample_ids == ROW_ORDER
        assert list(st.labels()) == [LABELS[s] for s in ROW_ORDER]
        assert st.attrs["classes"] == ["dog", "cat"]
        assert list(st.row_status()) == [1, 1, 1, 1, C.STATUS_MISSING]
        assert [f["sample_id"] for f in st.failures()] == ["e"]
        assert "not in released features" in st.failures()[0]["reason"]
        m = Manifest.load(os.path.join(st.path, "manifest.jsonl"))
        assert m.sample_ids == ROW_ORDER and [r["split"] for r in m] == ["train"] * 3 + ["test"] * 2
        assert st.key_material["manifest"] == m.hash()
        assert C.compute_key(st.key_material) == st.key
        assert C.verify_store(st) == []
    # audio (N, 1, 768): the released vectors up to float16 rounding (a single cast)
    a = audio.read("audio")
    assert a.shape == (5, 1, 768) and a.dtype == np.float16
    for j, sid in enumerate(RELEASED):
        np.testing.assert_array_equal(a[j, 0], release["audio_data"][sid].astype(np.float16))
    assert not a[4].any()
    # visual (N, 8, 768): mean over the 196 patches of each of the 8 time steps
    v = visual.read("visual")
    assert v.shape == (5, 8, 768) and v.dtype == np.float16 and "visual_dense" not in visual.streams
    for j, sid in enumerate(RELEASED):
        tokens = release["visual_data"][sid].astype(np.float64)
        want = np.stack([tokens[t * 196:(t + 1) * 196].mean(axis=0) for t in range(8)])
        np.testing.assert_allclose(v[j].astype(np.float64), want, rtol=2 ** -10, atol=1e-6)
    # provenance names the source file and its bytes
    prov = visual.attrs["provenance"]
    assert "AV-CIL" in prov["source"] and prov["protocol"] == "tiny-2x1"
    [f] = prov["files"]
    from avcl_core.avcil_import import file_sha256

    assert f["name"] == "visual_features.h5" and f["sha256"] == file_sha256(release["visual_h5"])
    assert f["sha256"] in visual.key_material["weights"]
    # both stores share the manifest, so the trainer can pair their rows
    assert audio.key_material["manifest"] == visual.key_material["manifest"]
    # the cache CLI sees and verifies them
    assert _run("verify", apath).exit_code == 0
    assert "audiomae" in _run("ls", root).output


def test_pickles_are_refused_without_trust(release, tmp_path):
    root = tmp_path / "cache"
    res = _run("import-avcil", "--protocol", release["protocol"], "--audio", release["audio"], "--root", root)
    assert res.exit_code != 0
    assert "--trust-pickle" in res.output and str(release["audio"]) in res.output and "arbitrary code" in res.output
    assert C.find_stores(root) == []
    # HDF5 needs no trust
    res = _run("import-avcil", "--protocol", release["protocol"], "--visual", release["visual_h5"],
               "--root", root, "--quiet")
    assert res.exit_code == 0, res.output
    assert len(_stores(root, "videomae")) == 1 and _stores(root, "audiomae") == []


def test_visual_pickle_with_dense_tokens(release, tmp_path):
    root = tmp_path / "cache"
    out = import_avcil(release["protocol"], visual=release["visual_npy"], cache_root=root, dense=True,
                       trust_pickle=True, rows_per_shard=2)
    st = C.open_store(out["visual"].path)
    assert st.n_shards == 3 and out["visual"].missing == ["e"] and out["visual"].ok == 4
    dense = st.read("visual_dense")
    assert dense.shape == (5, 8, 196, 768) and dense.dtype == np.float16
    for j, sid in enumerate(RELEASED):
        np.testing.assert_array_equal(dense[j], release["visual_data"][sid].reshape(8, 196, 768).astype(np.float16))
    # the dense and pooled stores are different stores (different key)
    plain = import_avcil(release["protocol"], visual=release["visual_npy"], cache_root=root, trust_pickle=True)
    assert plain["visual"].key != out["visual"].key


def test_reimport_is_a_no_op_and_new_features_give_a_new_store(release, tmp_path):
    root = tmp_path / "cache"
    first = import_avcil(release["protocol"], audio=release["audio"], cache_root=root, trust_pickle=True)["audio"]
    again = import_avcil(release["protocol"], audio=release["audio"], cache_root=root, trust_pickle=True)["audio"]
    assert again.already_present and again.path == first.path and again.missing == ["e"]
    changed = dict(release["audio_data"])
    changed["a"] = changed["a"] + 1
    other = tmp_path / "other.npy"
    np.save(other, changed)
    new = import_avcil(release["protocol"], audio=other, cache_root=root, trust_pickle=True)["audio"]
    assert new.key != first.key and len(_stores(root, "audiomae")) == 2


def test_wrong_or_foreign_files_are_named(release, tmp_path):
    root = tmp_path / "cache"
    with pytest.raises(AvcilImportError, match="is this the visual file") as e:
        import_avcil(release["protocol"], visual=release["audio"], cache_root=root, trust_pickle=True)
    assert str(release["audio"]) in str(e.value) and "'a'" in str(e.value)
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f.create_dataset("zzz", data=np.zeros((1568, 768), np.float32))
    with pytest.raises(AvcilImportError, match="none of the 5 sample ids"):
        import_avcil(release["protocol"], visual=foreign, cache_root=root)
    plain = tmp_path / "plain.npy"
    np.save(plain, np.zeros((3, 768), np.float32))
    with pytest.raises(AvcilImportError, match="plain array"):
        FeatureFile(plain)
    assert C.find_stores(root) == []


def test_a_malformed_entry_is_listed_and_the_import_goes_on(release, tmp_path):
    broken = dict(release["audio_data"])
    broken["c"] = np.zeros(512, np.float32)
    path = tmp_path / "broken.npy"
    np.save(path, broken)
    r = import_avcil(release["protocol"], audio=path, cache_root=tmp_path / "cache", trust_pickle=True)["audio"]
    assert r.ok == 3 and r.missing == ["e"] and [sid for sid, _ in r.bad] == ["c"] and "(512,)" in r.bad[0][1]
    st = C.open_store(r.path)
    assert list(st.row_status()) == [1, 1, C.STATUS_UNREADABLE, 1, C.STATUS_MISSING]


def test_from_release_directory(release, tmp_path):
    root = tmp_path / "cache"
    res = _run("import-avcil", "--protocol", release["protocol"], "--from", release["dir"], "--trust-pickle",
               "--root", root, "--quiet")
    assert res.exit_code == 0, res.output
    assert len(_stores(root, "audiomae")) == 1 and len(_stores(root, "videomae")) == 1


def test_shipped_protocol_gives_the_published_rows():
    from avcl_core.protocols import list_protocols

    if "ave-4x7" not in list_protocols():
        pytest.skip("ave-4x7 is not shipped in this checkout")
    m = protocol_manifest("ave-4x7")
    assert len(m) == 3294 + 391 + 394 and m.dataset == "ave"
    assert m.counts() == {"train": 3294, "val": 391, "test": 394}
    assert len(m.classes()) == 28
