"""Cache and extraction edge cases: concurrent finalize, claim take-over races, per-row bad input."""
import json
import pickle

import numpy as np
import pytest

from avcl_core import cache as C
from avcl_core.avcil_import import import_avcil
from avcl_core.manifest import Manifest
from extract.encoders.base import FeatureEncoder, Preprocess
from extract.runner import extract


def _manifest(n=8):
    return Manifest([
        {"sample_id": f"s{i:03d}", "dataset": "toy", "split": "train", "label": i % 2,
         "class_name": f"c{i % 2}", "video": f"v/{i}.mp4"} for i in range(n)
    ])


MATERIAL = {"encoder": "toy", "variant": "x", "weights": "random-init:0"}


def _write_all(store):
    for i in store.pending_shards():
        assert store.claim(i)
        rows = store.shard_rows(i)
        n = rows.stop - rows.start
        store.write_shard(i, {"audio": np.full((n, 2), i, np.float16)}, np.ones(n, np.uint8), np.ones(n, np.float32))


def test_finalize_keeps_attributes_another_writer_wrote_meanwhile(tmp_path):
    path = str(tmp_path / "s.zarr")
    a = C.create_store(path, key_material=MATERIAL, manifest=_manifest(), streams={"audio": (2,)}, rows_per_shard=4)
    b = C.create_store(path, key_material=MATERIAL, manifest=_manifest(), streams={"audio": (2,)}, rows_per_shard=4)
    _write_all(b)
    b.group.attrs.update({"extract": {"root": "/data"}})  # written by writer b after a opened the store
    assert a.finalize()
    st = C.open_store(path)
    assert st.attrs["extract"] == {"root": "/data"}
    assert st.status == "complete" and st.attrs["counts"] == {"ok": 8}


def test_finalize_does_not_trust_a_stale_complete_status(tmp_path):
    """A handle opened while the store was complete must not skip finalizing after a repair reset it."""
    path = str(tmp_path / "s.zarr")
    a = C.create_store(path, key_material=MATERIAL, manifest=_manifest(), streams={"audio": (2,)}, rows_per_shard=4)
    _write_all(a)
    assert a.finalize()
    stale = C.create_store(path, key_material=MATERIAL, manifest=_manifest(), streams={"audio": (2,)})
    fresh = C.create_store(path, key_material=MATERIAL, manifest=_manifest(), streams={"audio": (2,)})
    fresh.group.attrs.update({"status": "building"})  # a repair reopened it ...
    (tmp_path / "s.zarr" / C.SHARDS_DIR / "000001.done.json").unlink()  # ... and is redoing shard 1
    assert not stale.finalize()  # shard 1 is pending: the store is not complete
    assert C.open_store(path, allow_incomplete=True).status == "building"


def test_stale_claim_take_over_race_gives_the_shard_to_one_writer(tmp_path, monkeypatch):
    """Two writers find the same dead claim; the one that renames it second must not move the
    fresh claim of the first away (that would let both encode and write the shard)."""
    path = str(tmp_path / "s.zarr")
    first = C.create_store(path, key_material=MATERIAL, manifest=_manifest(), streams={"audio": (2,)}, rows_per_shard=4)
    second = C.create_store(path, key_material=MATERIAL, manifest=_manifest(), streams={"audio": (2,)})
    claim = tmp_path / "s.zarr" / C.SHARDS_DIR / "000000.claim"
    claim.parent.mkdir(exist_ok=True)
    import socket

    claim.write_text(json.dumps({"host": socket.gethostname(), "pid": 999_999_999, "time": 0.0}))
    real = C._pid_alive
    state = {"calls": 0, "first_got": None}

    def racing(pid):
        state["calls"] += 1
        if state["calls"] == 1:  # `second` judged the claim dead; `first` takes it over meanwhile
            state["first_got"] = first.claim(0)
        return real(pid)

    monkeypatch.setattr(C, "_pid_alive", racing)
    got = second.claim(0)
    assert state["first_got"] is True
    assert got is False, "both writers hold shard 0"
    assert json.loads(claim.read_text())["pid"] == first.claim_holder(0)["pid"]


def test_import_names_the_sample_with_an_unusable_value_and_goes_on(tmp_path):
    rng = np.random.default_rng(0)
    audio = {sid: rng.standard_normal(768).astype(np.float32) for sid in "abd"}
    audio["c"] = ["not", "numbers"]  # one damaged entry
    f = tmp_path / "audio.pkl"
    f.write_bytes(pickle.dumps(audio))
    proto = tmp_path / "tiny.json"
    proto.write_text(json.dumps({"name": "tiny", "dataset": "ave", "classes": ["dog", "cat"], "tasks": [[0], [1]],
                                 "memory": 2, "splits": {"train": [["a", "b"], ["c"]], "test": [["d"], []]}}))
    res = import_avcil(proto, audio=f, cache_root=tmp_path / "cache", trust_pickle=True)["audio"]
    assert res.ok == 3 and [sid for sid, _ in res.bad] == ["c"]
    assert "audio.pkl" in res.bad[0][1]
    st = C.open_store(res.path)
    assert st.row_status().tolist() == [1, 1, C.STATUS_UNREADABLE, 1]


class _Tiny(FeatureEncoder):
    name = "tiny-review"

    def __init__(self):
        super().__init__()
        self.weights = "none"
        self.preprocess = Preprocess(clip_seconds=1.0, frames_per_clip=2, image_size=8, audio_rate=0)

    def streams(self):
        return {"visual": (2, 3)}

    def encode(self, frames, audio):
        return {"visual": frames.float().mean(dim=(2, 3))}


def test_a_row_decode_cannot_handle_is_named_and_done_shards_are_kept(avcl_media_dir, tmp_path):
    rows = [{"sample_id": f"r{i}", "dataset": "media", "split": "train", "label": 0, "class_name": "c",
             "video": "ok.mp4"} for i in range(4)]
    m = Manifest(rows)
    # Manifest() itself refuses such a row; changed afterwards, it reaches the decoder,
    # which must still name it rather than fail anonymously.
    m.rows[3]["start"] = "ten"
    with pytest.raises(ValueError, match=r"r3.*ok\.mp4.*ten"):
        extract(m, avcl_media_dir, _Tiny(), tmp_path, workers=0, progress=False, rows_per_shard=2)
    [path] = C.find_stores(tmp_path)
    st = C.open_store(path, allow_incomplete=True)
    assert st.done_shards() == {0} and st.pending_shards() == [1]
    assert st.claim_holder(1) is None  # released, so a rerun (after fixing the row) takes it


def test_pack_leaves_out_claim_lock_files(tmp_path):
    import socket
    import tarfile

    from avcl_core.archive import pack_store

    path = str(tmp_path / "toy" / "s.zarr")
    st = C.create_store(path, key_material=MATERIAL, manifest=_manifest(), streams={"audio": (2,)}, rows_per_shard=4)
    claim = tmp_path / "toy" / "s.zarr" / C.SHARDS_DIR / "000000.claim"
    claim.write_text(json.dumps({"host": socket.gethostname(), "pid": 999_999_999, "time": 0.0}))
    _write_all(st)  # takes the dead claim over, leaving its tombstone
    assert st.finalize() and list(claim.parent.glob("000000.claim.stale-*"))
    res = pack_store(path, tmp_path / "out.tar")
    with tarfile.open(res.archive) as tar:
        names = tar.getnames()
    assert any(n.endswith("000000.done.json") for n in names)
    assert not [n for n in names if ".claim" in n]
