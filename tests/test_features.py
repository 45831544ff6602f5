"""FeatureSet: streams of complete stores in memory, served by index tensors."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from avcl_core import cache as C
from avcl_core.manifest import Manifest
from train_fixtures import one_torch_thread  # noqa: F401 (autouse fixture)
from train_fixtures import gaussian_features, make_toy, toy_manifest, write_store
from train.features import FeatureSet, FeatureSetError


def test_holds_streams_as_float16_and_gathers_float32_batches(tmp_path):
    toy = make_toy(tmp_path, n_classes=4, rows_per_shard=8)  # several shards
    fs = FeatureSet.from_stores([toy.store])
    n = len(toy.manifest)
    assert len(fs) == n
    assert fs.dims == {"audio": (4, 8), "visual": (3, 12)}
    # resident as stored (half the memory of float32), widened per batch
    assert fs.streams["audio"].dtype == torch.float16 and fs.streams["audio"].shape == (n, 4, 8)
    assert fs.nbytes() == n * (4 * 8 + 3 * 12) * 2
    idx = torch.tensor([5, 0, 17])
    b = fs.batch(idx)
    assert b["audio"].dtype == torch.float32
    # the values are exactly the float16 numbers stored, widened
    np.testing.assert_array_equal(b["visual"].numpy(), toy.features["visual"][[5, 0, 17]].astype(np.float32))
    np.testing.assert_array_equal(b["audio"].numpy(), toy.features["audio"][[5, 0, 17]].astype(np.float32))
    assert fs.batch(idx, ["audio"]).keys() == {"audio"}
    np.testing.assert_array_equal(fs.class_ids, [r["label"] for r in toy.manifest])
    assert list(fs.split_of()[:22]) == ["train"] * 12 + ["val"] * 4 + ["test"] * 6
    assert fs.sources[0].key and fs.sources[0].streams == {"audio": "audio", "visual": "visual"}


def test_rows_with_bad_status_are_excluded_and_counted(tmp_path, caplog):
    status = np.ones(4 * 22, np.uint8)
    status[[3, 30]] = C.STATUS_UNREADABLE
    status[50] = C.STATUS_NO_AUDIO
    toy = make_toy(tmp_path, n_classes=4, status=status)
    with caplog.at_level(logging.WARNING, logger="avcl.train"):
        fs = FeatureSet.from_stores([toy.store])
    assert len(fs) == 85
    assert 3 not in fs.rows and 50 not in fs.rows
    assert "3 of 88 rows excluded" in caplog.text
    assert sum(fs.excluded.values()) == 3 and any("unreadable" in k for k in fs.excluded)
    # FeatureSet indices of manifest rows skip the excluded ones
    np.testing.assert_array_equal(fs.indices_of_rows([2, 3, 4]), [2, 3])
    assert fs.sample_ids[3] == toy.manifest[4]["sample_id"]


def test_streams_from_two_stores_are_matched_by_sample_id(tmp_path):
    m = toy_manifest(3, {"train": 4, "test": 2})
    feats = gaussian_features(m, {"audio": (2, 5), "visual": (3, 6)}, seed=1)
    a_path = write_store(tmp_path / "a.zarr", m, {"audio": feats["audio"]}, encoder="enc-a")
    # the visual store lists the same clips in another order and lacks one of them
    perm = np.random.default_rng(0).permutation(len(m))
    keep = perm[perm != 7]
    m2 = Manifest([m[i] for i in keep])
    status = np.ones(len(m2), np.uint8)
    status[list(keep).index(2)] = C.STATUS_ENCODE_ERROR
    v_path = write_store(tmp_path / "v.zarr", m2, {"visual": feats["visual"][keep]}, encoder="enc-v", status=status)
    fs = FeatureSet.from_stores([a_path, v_path])
    assert 7 not in fs.rows and 2 not in fs.rows and len(fs) == len(m) - 2
    idx = torch.arange(len(fs))
    b = fs.batch(idx)
    want_v = feats["visual"].astype(np.float16).astype(np.float32)[fs.rows]
    np.testing.assert_array_equal(b["visual"].numpy(), want_v)
    assert {s.encoder for s in fs.sources} == {"enc-a", "enc-v"}
    assert fs.excluded == {f"not in {v_path}": 1, f"status not ok in {v_path}": 1}


def test_split_array_is_the_fallback_and_missing_splits_are_an_error(tmp_path):
    m = toy_manifest(2, {"train": 3, "val": 1, "test": 2})
    feats = gaussian_features(m, {"audio": (2, 4)})
    p = write_store(tmp_path / "s.zarr", m, feats, with_manifest=False, split_array=True)
    fs = FeatureSet.from_stores([p])
    assert list(fs.split_of()) == [r["split"] for r in m]
    q = write_store(tmp_path / "q.zarr", m, feats, with_manifest=False)
    with pytest.raises(FeatureSetError, match=r"no split information.*manifest.jsonl"):
        FeatureSet.from_stores([q])


def test_a_manifest_that_does_not_match_the_store_is_refused(tmp_path):
    m = toy_manifest(2, {"train": 3, "test": 2})
    p = write_store(tmp_path / "s.zarr", m, gaussian_features(m, {"audio": (2, 4)}), with_manifest=False)
    Manifest(list(reversed(m.rows))).save(f"{p}/manifest.jsonl")
    with pytest.raises(FeatureSetError, match="row order"):
        FeatureSet.from_stores([p])


def test_clip_level_and_dense_streams_become_token_sequences(tmp_path):
    m = toy_manifest(2, {"train": 2, "test": 1})
    rng = np.random.default_rng(0)
    feats = {"clip": rng.standard_normal((len(m), 7)).astype(np.float32),
             "dense": rng.standard_normal((len(m), 2, 3, 5)).astype(np.float32)}
    p = write_store(tmp_path / "s.zarr", m, feats)
    fs = FeatureSet.from_stores([p], streams={"audio": "clip", "visual": "dense"})
    assert fs.dims == {"audio": (1, 7), "visual": (6, 5)}
    got = fs.batch(torch.tensor([1]))["visual"][0].numpy()
    np.testing.assert_array_equal(got, feats["dense"][1].astype(np.float16).astype(np.float32).reshape(6, 5))


def test_a_mapped_stream_replaces_only_its_default(tmp_path):
    m = toy_manifest(2, {"train": 2, "test": 1})
    feats = gaussian_features(m, {"audio": (2, 4), "visual": (3, 5), "visual_dense": (6, 5)})
    p = write_store(tmp_path / "s.zarr", m, feats)
    fs = FeatureSet.from_stores([p], streams={"visual": "visual_dense"})
    assert fs.dims == {"audio": (2, 4), "visual": (6, 5)}
    assert fs.sources[0].streams == {"audio": "audio", "visual": "visual_dense"}
    only_audio = write_store(tmp_path / "a.zarr", m, {"audio": feats["audio"]})
    assert FeatureSet.from_stores([only_audio]).dims == {"audio": (2, 4)}  # defaults are optional


def test_missing_stream_and_unused_store_are_named(tmp_path):
    toy = make_toy(tmp_path, n_classes=2)
    with pytest.raises(FeatureSetError, match="no store provides stream 'visual_dense'"):
        FeatureSet.from_stores([toy.store], streams={"visual": "visual_dense"})
    with pytest.raises(FeatureSetError, match="provide none of the streams"):
        FeatureSet.from_stores([toy.store, toy.store], streams={"audio": "audio"})
    with pytest.raises(C.StoreError, match="differs from the requested key"):
        FeatureSet.from_stores([toy.store], keys=["0" * 12])
