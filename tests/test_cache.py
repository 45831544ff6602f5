import json
import os
import shutil

import numpy as np
import pytest

from avcl_core import cache as C
from avcl_core.manifest import Manifest


def _manifest(n=10, dataset="toy"):
    return Manifest([
        {"sample_id": f"s{i:03d}", "dataset": dataset, "split": "train", "label": i % 3,
         "class_name": f"c{i % 3}", "video": f"v/{i}.mp4"} for i in range(n)
    ])


def _material(**kw):
    return {"encoder": "toy", "variant": "x", "weights": "random-init:0", **kw}


def _fill(store, rng_seed=0):
    rng = np.random.default_rng(rng_seed)
    for i in store.pending_shards():
        assert store.claim(i)
        rows = store.shard_rows(i)
        n = rows.stop - rows.start
        feats = {k: rng.standard_normal((n, *s)).astype(np.float16) for k, s in store.streams.items()}
        store.write_shard(i, feats, np.ones(n, np.uint8), np.full(n, 2.0, np.float32))
    return store.finalize()


def test_create_write_read_roundtrip(tmp_path):
    m = _manifest(10)
    path = C.store_path(tmp_path, "toy", "toy", C.compute_key(_material()))
    st = C.create_store(path, key_material=_material(), manifest=m, streams={"audio": (4, 8), "visual": (2, 5)},
                        rows_per_shard=4)
    assert path.endswith(f"toy/toy-{st.key[:12]}.zarr")
    assert st.n_shards == 3 and st.shard_rows(2) == slice(8, 10)
    with pytest.raises(C.StoreError, match="building"):
        C.open_store(path)
    assert _fill(st)
    ro = C.open_store(path, key=st.key[:12])
    assert ro.read("audio").shape == (10, 4, 8) and ro.read("audio").dtype == np.float16
    assert ro.sample_ids == m.sample_ids
    assert list(ro.labels()) == [i % 3 for i in range(10)]
    np.testing.assert_array_equal(ro.rows_for(["s003", "s001"]), [3, 1])
    with pytest.raises(C.StoreError, match="not in this store"):
        ro.rows_for(["nope"])
    assert ro.attrs["counts"] == {"ok": 10}
    assert C.verify_store(ro) == []


def test_mismatched_key_refused(tmp_path):
    m = _manifest(4)
    path = str(tmp_path / "s.zarr")
    st = C.create_store(path, key_material=_material(), manifest=m, streams={"audio": (2,)})
    _fill(st)
    with pytest.raises(C.StoreError, match="differs from the requested key"):
        C.open_store(path, key="0" * 64)
    with pytest.raises(C.StoreError, match="differs"):
        C.create_store(path, key_material=_material(variant="y"), manifest=m, streams={"audio": (2,)})


def test_key_changes_with_any_material():
    base = C.compute_key(_material())
    assert C.compute_key(_material()) == base
    assert C.compute_key(_material(variant="y")) != base
    assert C.compute_key(_material(preprocess={"fps": 1})) != base


def test_claims_are_exclusive_and_stale_claims_taken_over(tmp_path):
    st = C.create_store(str(tmp_path / "s.zarr"), key_material=_material(), manifest=_manifest(8),
                        streams={"audio": (2,)}, rows_per_shard=4)
    assert st.claim(0)
    other = C.create_store(str(tmp_path / "s.zarr"), key_material=_material(), manifest=_manifest(8),
                           streams={"audio": (2,)})
    # the same live process holds it: a second claimant is refused
    claim = tmp_path / "s.zarr" / C.SHARDS_DIR / "000000.claim"
    holder = json.loads(claim.read_text())
    holder["pid"] = 999_999_999  # a dead process on this host
    claim.write_text(json.dumps(holder))
    assert other.claim(0)  # taken over
    assert not st.claim(0)  # held by a live writer
    other.write_shard(0, {"audio": np.zeros((4, 2))}, np.ones(4), np.ones(4))
    assert not st.claim(0)  # done shards are never claimed again
    assert st.pending_shards() == [1]


def test_verify_names_corrupt_shard(tmp_path):
    path = str(tmp_path / "s.zarr")
    st = C.create_store(path, key_material=_material(), manifest=_manifest(12), streams={"audio": (16, 16)},
                        rows_per_shard=4)
    _fill(st)
    shard_file = tmp_path / "s.zarr" / "audio" / "c" / "1" / "0" / "0"
    data = bytearray(shard_file.read_bytes())
    data[len(data) // 3] ^= 0xFF
    shard_file.write_bytes(bytes(data))
    bad = C.verify_store(C.open_store(path))
    assert [b[0] for b in bad] == [1]
    assert "audio" in bad[0][1]


def test_copied_store_reads_identically(tmp_path):
    path = str(tmp_path / "a" / "s.zarr")
    st = C.create_store(path, key_material=_material(), manifest=_manifest(6), streams={"audio": (3,)})
    _fill(st)
    shutil.copytree(path, tmp_path / "b.zarr")
    a, b = C.open_store(path), C.open_store(str(tmp_path / "b.zarr"))
    assert a.key == b.key
    np.testing.assert_array_equal(a.read("audio"), b.read("audio"))
    url = C.open_store("file://" + str(tmp_path / "b.zarr"))
    np.testing.assert_array_equal(url.read("audio"), a.read("audio"))
    assert sorted(C.find_stores(tmp_path)) == sorted([path, str(tmp_path / "b.zarr")])


def test_multilabel_rows(tmp_path):
    rows = [{"sample_id": "a", "dataset": "d", "split": "train", "label": [0, 2], "class_name": "x;z", "video": "a"},
            {"sample_id": "b", "dataset": "d", "split": "train", "label": 1, "class_name": "y", "video": "b"}]
    st = C.create_store(str(tmp_path / "m.zarr"), key_material=_material(), manifest=Manifest(rows),
                        streams={"audio": (2,)})
    np.testing.assert_array_equal(st.read("labels_multi"), [[0, 2], [1, -1]])
    assert st.attrs["classes"] == ["x", "y", "z"]


def test_an_empty_claim_left_by_a_dead_writer_is_taken_over_once_old(tmp_path):
    st = C.create_store(str(tmp_path / "s.zarr"), key_material=_material(), manifest=_manifest(4),
                        streams={"audio": (2,)}, rows_per_shard=2)
    claim = tmp_path / "s.zarr" / C.SHARDS_DIR / "000001.claim"
    claim.write_text("")  # a writer died between creating and filling its claim
    assert not st.claim(1)  # fresh: it may still be being written
    old = claim.stat().st_mtime - C.EMPTY_CLAIM_TIMEOUT_S - 5
    os.utime(claim, (old, old))
    assert st.claim(1)
    assert json.loads(claim.read_text())["pid"] == os.getpid()


def test_manifest_rejects_bad_times_naming_the_sample():
    row = {"sample_id": "x1", "dataset": "d", "split": "train", "label": 0, "class_name": "a", "video": "x1.mp4"}
    with pytest.raises(Exception, match="x1.*start 'ten'"):
        Manifest([{**row, "start": "ten"}])
    with pytest.raises(Exception, match="x1.*ends"):
        Manifest([{**row, "start": 5.0, "end": 2.0}])
    assert len(Manifest([{**row, "start": 1, "end": 2.5}])) == 1


def test_a_too_short_key_prefix_is_refused(tmp_path):
    st = C.create_store(str(tmp_path / "s.zarr"), key_material=_material(), manifest=_manifest(2), streams={"audio": (2,)})
    _fill(st)
    with pytest.raises(C.StoreError, match="at least 6"):
        C.open_store(str(tmp_path / "s.zarr"), key="")


def test_write_shard_takes_extra_row_arrays_in_their_own_dtype_and_verify_hashes_them(tmp_path):
    st = C.create_store(str(tmp_path / "s.zarr"), key_material=_material(), manifest=_manifest(4),
                        streams={"audio": (2,)}, rows_per_shard=2, extras={"masks": ((3, 3), "uint8")})
    masks = np.arange(4 * 9, dtype=np.uint8).reshape(4, 3, 3)
    for i in (0, 1):
        rows = st.shard_rows(i)
        st.write_shard(i, {"audio": np.ones((2, 2))}, np.ones(2), np.ones(2), extras={"masks": masks[rows]})
    assert st.finalize() and st.read("masks").dtype == np.uint8
    np.testing.assert_array_equal(C.open_store(st.path).read("masks"), masks)
    assert "masks" in st.done_marker(1)["sha256"] and C.verify_store(st) == []
    st.group["masks"][2:4] = 0  # damaged after the fact
    assert [(i, r.split(":")[0]) for i, r in C.verify_store(st)] == [(1, "masks")]
    with pytest.raises(C.StoreError, match="not extra row arrays"):
        st.write_shard(0, {"audio": np.ones((2, 2))}, np.ones(2), np.ones(2), extras={"nope": masks[:2]})
