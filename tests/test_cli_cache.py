import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import uuid

import fsspec
import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from avcl_core import cache as C
from avcl_core.archive import PACK_MANIFEST, unpack_store
from avcl_core.cli_cache import main
from avcl_core.manifest import Manifest

STREAMS = {"audio": (2, 8), "visual": (3, 8)}


def _manifest(n=12, dataset="toy"):
    return Manifest([
        {"sample_id": f"s{i:03d}", "dataset": dataset, "split": "train", "label": i % 3,
         "class_name": f"c{i % 3}", "video": f"v/{i}.mp4"} for i in range(n)
    ])


def _build(root, *, dataset="toy", encoder="toy", n=12, seed=0, fail=(), finish=True, extract=None):
    """A store as the extraction runner leaves it: rows of 4 per shard, manifest.jsonl inside."""
    m = _manifest(n, dataset)
    material = {"encoder": encoder, "variant": f"v{seed}", "weights": f"random-init:{seed}", "manifest": m.hash()}
    path = C.store_path(root, dataset, encoder, C.compute_key(material))
    st = C.create_store(path, key_material=material, manifest=m, streams=STREAMS, rows_per_shard=4)
    m.save(os.path.join(path, "manifest.jsonl"))
    if extract is not None:
        st.group.attrs.update({"extract": extract})
    rng = np.random.default_rng(seed)
    for i in st.pending_shards()[: None if finish else 1]:
        assert st.claim(i)
        rows = st.shard_rows(i)
        k = rows.stop - rows.start
        feats = {name: rng.standard_normal((k, *s)).astype(np.float16) for name, s in STREAMS.items()}
        status = np.ones(k, np.uint8)
        failures = []
        for j, row in enumerate(range(rows.start, rows.stop)):
            if row in fail:
                status[j] = C.STATUS_NO_AUDIO
                failures.append(C.ShardFailure(m.sample_ids[row], C.STATUS_NO_AUDIO, "no audio track"))
        st.write_shard(i, feats, status, np.full(k, 2.0, np.float32), failures)
    if finish:
        assert st.finalize()
    return path


def _arrays(path):
    st = C.open_store(path)
    return st, {name: st.read(name) for name in [*STREAMS, "status", "valid_len", "labels", "sample_id"]}


def _assert_same(a_path, b_path):
    a, arrs_a = _arrays(a_path)
    b, arrs_b = _arrays(b_path)
    assert a.key == b.key
    assert a.key_material == b.key_material
    for name in arrs_a:
        assert arrs_a[name].dtype == arrs_b[name].dtype
        np.testing.assert_array_equal(arrs_a[name], arrs_b[name])  # bit-exact


def _flip(file, where=1 / 3):
    data = bytearray(open(file, "rb").read())
    data[int(len(data) * where)] ^= 0xFF
    open(file, "wb").write(bytes(data))


def _run(*args, **kw):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False, **kw)


@pytest.fixture
def store(tmp_path):
    return _build(tmp_path / "cache")


def test_ls_lists_every_store_with_counts_and_status(tmp_path):
    root = tmp_path / "cache"
    done = _build(root, fail={1, 6})
    building = _build(root, dataset="other", encoder="enc", seed=1, finish=False)
    res = _run("ls", root)
    assert res.exit_code == 0, res.output
    lines = {ln.split()[0]: ln for ln in res.output.splitlines()[1:]}
    key_done = C.open_store(done).key[:12]
    assert lines["toy"].split()[:5] == ["toy", "toy", key_done, "10", "2"]
    assert "complete" in lines["toy"] and done in lines["toy"]
    assert "building 1/3 shards" in lines["other"]
    assert lines["other"].split()[3:5] == ["4", "0"]
    rows = [json.loads(ln) for ln in _run("ls", "--json", root).output.splitlines()]
    by_path = {r["path"]: r for r in rows}
    assert by_path[done]["rows_ok"] == 10 and by_path[done]["rows_failed"] == 2
    assert by_path[done]["size_bytes"] > 0
    assert by_path[building]["rows_pending"] == 8
    # the default root comes from AVCL_CACHE
    res = _run("ls", env={"AVCL_CACHE": str(root)})
    assert key_done in res.output


def test_info_shows_key_material_and_arrays(store):
    st = C.open_store(store)
    res = _run("info", "--json", store)
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    assert d["key"] == st.key and d["key_material"] == st.key_material
    assert C.compute_key(d["key_material"]) == d["key"]
    assert d["arrays"]["audio"] == {"shape": [12, 2, 8], "dtype": "float16", "chunks": [4, 2, 8], "shards": [4, 2, 8]}
    assert d["arrays"]["visual"]["shape"] == [12, 3, 8]
    assert d["arrays"]["status"]["dtype"] == "uint8"
    assert d["versions"]["zarr"] == zarr.__version__ and d["host"] and d["created"] and d["completed"]
    assert (d["rows"], d["rows_ok"], d["shards"], d["shards_done"]) == (12, 12, 3, 3)
    text = _run("info", store).output
    assert st.key in text and "random-init:0" in text and "(12, 3, 8)" in text


def test_clean_store_verifies(store):
    res = _run("verify", store)
    assert res.exit_code == 0, res.output
    assert "every chunk verified" in res.output


@pytest.mark.parametrize("array,file,shard", [
    ("audio", "audio/c/1/0/0", 1),
    ("visual", "visual/c/2/0/0", 2),
    ("status", "status/c/0", 0),
    ("valid_len", "valid_len/c/1", 1),
])
def test_verify_names_the_shard_with_a_flipped_byte(store, array, file, shard):
    _flip(os.path.join(store, file))
    res = _run("verify", store)
    assert res.exit_code == 1
    corrupt = [ln for ln in res.output.splitlines() if ln.startswith("CORRUPT")]
    assert len(corrupt) == 1, res.output
    assert f"shard {shard} " in corrupt[0] and f"{array}:" in corrupt[0]
    assert f"corrupt shards {shard}" in res.output


def test_verify_catches_small_whole_arrays_and_edited_attributes(tmp_path):
    a = _build(tmp_path / "a")
    _flip(os.path.join(a, "labels/c/0"), 0.5)
    res = _run("verify", a)
    assert res.exit_code == 1 and "CORRUPT store: labels" in res.output
    b = _build(tmp_path / "b")
    _flip(os.path.join(b, "sample_id/c/0"), 0.9)  # no crc here: caught against manifest.jsonl or on decode
    res = _run("verify", b)
    assert res.exit_code == 1 and "sample_id" in res.output
    d = _build(tmp_path / "d")
    _flip(os.path.join(d, "_shards/000001.done.json"), 0.5)
    res = _run("verify", d)
    assert res.exit_code == 1 and "CORRUPT shard 1" in res.output and "done-marker" in res.output
    c = _build(tmp_path / "c")
    meta = json.load(open(os.path.join(c, "zarr.json")))
    meta["attributes"]["key_material"]["variant"] = "edited"
    json.dump(meta, open(os.path.join(c, "zarr.json"), "w"))
    res = _run("verify", c)
    assert res.exit_code == 1 and "key material hashes to" in res.output


def test_cp_r_copy_reads_identically_and_verifies(store, tmp_path):
    dst = tmp_path / "elsewhere" / "toy"
    dst.mkdir(parents=True)
    subprocess.run(["cp", "-r", store, str(dst)], check=True)
    copy = str(dst / os.path.basename(store))
    _assert_same(store, copy)
    assert _run("verify", copy).exit_code == 0
    assert C.find_stores(tmp_path / "elsewhere") == [copy]


def test_pack_unpack_roundtrip_is_bit_exact(store, tmp_path):
    key = C.open_store(store).key
    res = _run("pack", store, f"{tmp_path}/out/")
    assert res.exit_code == 0, res.output
    archive = tmp_path / "out" / f"toy-toy-{key[:12]}.tar"
    assert archive.is_file()
    with tarfile.open(archive) as tar:
        first = tar.next()
        assert first.name == PACK_MANIFEST
        meta = json.load(tar.extractfile(first))
        assert all(not m.name.endswith(".claim") for m in tar.getmembers())
    assert meta["key"] == key and meta["store"] == f"toy/toy-{key[:12]}.zarr"
    root = tmp_path / "teammate"
    res = _run("unpack", archive, root)
    assert res.exit_code == 0, res.output
    restored = str(root / "toy" / f"toy-{key[:12]}.zarr")
    _assert_same(store, restored)
    assert _run("verify", restored).exit_code == 0
    assert not [p for p in os.listdir(root / "toy") if ".tmp-" in p]
    # unpacking again leaves the identical store alone
    res = _run("unpack", archive, root)
    assert res.exit_code == 0 and "already holds this store" in res.output


def test_unpack_refuses_altered_archives_and_different_stores(store, tmp_path):
    key = C.open_store(store).key
    archive = tmp_path / "a.tar"
    assert _run("pack", store, archive).exit_code == 0
    # 1. key material edited in the archive's manifest: the recomputed key differs
    forged = tmp_path / "forged.tar"
    with tarfile.open(archive) as src, tarfile.open(forged, "w") as dst:
        for m in src:
            data = src.extractfile(m).read()
            if m.name == PACK_MANIFEST:
                meta = json.loads(data)
                meta["key_material"]["weights"] = "something else"
                data = json.dumps(meta).encode()
                m.size = len(data)
            dst.addfile(m, io.BytesIO(data))
    res = _run("unpack", forged, tmp_path / "r1")
    assert res.exit_code != 0 and "archive was altered" in res.output and str(forged) in res.output
    assert not (tmp_path / "r1" / "toy").exists() or not os.listdir(tmp_path / "r1" / "toy")
    # 2. a damaged chunk inside the archive: named, and nothing lands in the cache root
    damaged = tmp_path / "damaged.tar"
    shutil.copy(archive, damaged)
    with tarfile.open(damaged) as tar:
        m = tar.getmember(f"toy/toy-{key[:12]}.zarr/audio/c/1/0/0")
        offset = m.offset_data + m.size // 2
    with open(damaged, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))
    res = _run("unpack", damaged, tmp_path / "r2")
    assert res.exit_code != 0 and "audio/c/1/0/0" in res.output and "sha256" in res.output
    assert not (tmp_path / "r2" / "toy" / f"toy-{key[:12]}.zarr").exists()
    # 3. a different store already at the destination is never overwritten
    root = tmp_path / "r3"
    dest = root / "toy" / f"toy-{key[:12]}.zarr"
    other = _build(tmp_path / "x", seed=5)
    shutil.copytree(other, dest)
    res = _run("unpack", archive, root)
    assert res.exit_code != 0 and "holds a different store" in res.output and str(dest) in res.output
    _assert_same(other, str(dest))


def test_pack_refuses_corrupt_or_incomplete_store(tmp_path):
    path = _build(tmp_path / "c")
    _flip(os.path.join(path, "visual/c/0/0/0"))
    res = _run("pack", path, tmp_path / "x.tar")
    assert res.exit_code != 0 and "fails verification" in res.output and not (tmp_path / "x.tar").exists()
    building = _build(tmp_path / "b", finish=False)
    res = _run("pack", building, tmp_path / "y.tar")
    assert res.exit_code != 0 and "building" in res.output and building in res.output


def test_open_refuses_mismatched_key_and_incomplete_store(store, tmp_path):
    key = C.open_store(store).key
    with pytest.raises(C.StoreError) as e:
        C.open_store(store, key="ab" * 32)
    assert store in str(e.value) and key[:12] in str(e.value) and "abababababab" in str(e.value)
    building = _build(tmp_path / "b", finish=False)
    with pytest.raises(C.StoreError, match=r"building \(1/3 shards done\)"):
        C.open_store(building)
    assert C.open_store(building, allow_incomplete=True).n_rows == 12


def test_fsspec_memory_url_reads_identically(store, tmp_path):
    fs = fsspec.filesystem("memory")
    base = f"/avcl-test-{uuid.uuid4().hex[:8]}"
    name = os.path.basename(store)
    fs.put(store, f"{base}/cache/toy/{name}", recursive=True)
    url = f"memory://{base}/cache/toy/{name}"
    try:
        remote = C.open_store(url, key=C.open_store(store).key)
        _, local = _arrays(store)
        for arr, want in local.items():
            np.testing.assert_array_equal(remote.read(arr), want)
        np.testing.assert_array_equal(remote.rows_for(["s005", "s002"]), [5, 2])
        res = _run("ls", f"memory://{base}/cache")
        assert res.exit_code == 0 and name.removesuffix(".zarr").split("-")[1] in res.output and "complete" in res.output
        d = json.loads(_run("info", "--json", url).output)
        assert d["key"] == remote.key and d["arrays"]["visual"]["shape"] == [12, 3, 8]
        assert _run("verify", url).exit_code == 0
        # pack straight from the URL, unpack locally
        assert _run("pack", url, tmp_path / "m.tar").exit_code == 0
        restored = unpack_store(tmp_path / "m.tar", tmp_path / "r").store
        _assert_same(store, str(restored))
        # a flipped byte in the remote copy is found and named
        chunk = f"{base}/cache/toy/{name}/audio/c/2/0/0"
        data = bytearray(fs.cat(chunk))
        data[len(data) // 3] ^= 0xFF
        fs.pipe(chunk, bytes(data))
        res = _run("verify", url)
        assert res.exit_code == 1 and "CORRUPT shard 2" in res.output
    finally:
        fs.rm(base, recursive=True)


def test_file_url_reads_identically(store):
    url = "file://" + store
    s = C.open_store(url)
    _, local = _arrays(store)
    np.testing.assert_array_equal(s.read("visual"), local["visual"])
    assert _run("verify", url).exit_code == 0


def _fake_extract(tmp_path, monkeypatch, backup, target):
    """An `avcl-extract` on PATH that logs its arguments and restores the damaged shard file."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "extract-args.json"
    script = bindir / "avcl-extract"
    script.write_text(
        f"#!{sys.executable}\nimport json, shutil, sys\n"
        f"json.dump(sys.argv[1:], open({str(log)!r}, 'w'))\n"
        f"shutil.copy({str(backup)!r}, {str(target)!r})\n"
    )
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    return log


def test_verify_repair_reextracts_only_the_corrupt_shards(tmp_path, monkeypatch):
    videos = tmp_path / "videos"
    videos.mkdir()
    path = _build(tmp_path / "cache", extract={"dataset": "toy", "root": str(videos), "manifest": "m.jsonl",
                                               "encoder": {"name": "toy"}})
    target = os.path.join(path, "visual/c/2/0/0")
    backup = tmp_path / "backup"
    shutil.copy(target, backup)
    _flip(target)
    log = _fake_extract(tmp_path, monkeypatch, backup, target)
    res = _run("verify", "--repair", path)
    assert res.exit_code == 0, res.output
    assert json.loads(log.read_text()) == ["--repair", path, "--shards", "2"]
    assert "checking again" in res.output and "every chunk verified" in res.output


def test_verify_repair_says_when_videos_are_unreachable(tmp_path, monkeypatch):
    path = _build(tmp_path / "cache", extract={"dataset": "toy", "root": str(tmp_path / "gone"), "manifest": "m"})
    _flip(os.path.join(path, "audio/c/0/0/0"))
    res = _run("verify", "--repair", path)
    assert res.exit_code != 0
    assert "videos are not reachable" in res.output and str(tmp_path / "gone") in res.output
    no_record = _build(tmp_path / "other")
    _flip(os.path.join(no_record, "audio/c/0/0/0"))
    res = _run("verify", "--repair", no_record)
    assert res.exit_code != 0 and "records no extraction settings" in res.output


@pytest.mark.parametrize("cmd", [[], ["ls"], ["info"], ["verify"], ["unclaim"], ["pack"], ["unpack"], ["import-avcil"]])
def test_every_command_has_help_with_an_example(cmd):
    res = _run(*cmd, "--help")
    assert res.exit_code == 0 and "Example" in res.output


def test_console_script_runs():
    exe = os.path.join(os.path.dirname(sys.executable), "avcl-cache")
    if not os.path.exists(exe):
        pytest.skip("avcl-cache is not installed in this environment")
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True)
    assert "verify" in out.stdout and "import-avcil" in out.stdout


def test_shards_option_reads_lists_and_ranges_and_names_a_bad_value():
    import click

    from avcl_core.cli_cache import parse_shards

    assert parse_shards("3, 7,2-4") == [3, 7, 2, 3, 4] and parse_shards("") is None and parse_shards(None) is None
    with pytest.raises(click.BadParameter, match="'2-x': write shard numbers like 3,7 or 2-5"):
        parse_shards("2-x")
