"""One-file hand-over of a feature store: ``pack`` into a tar, ``unpack`` into a cache root.

Archive layout (plain, uncompressed tar — the chunks are already zstd-compressed):

- ``AVCL-PACK.json`` (first member): ``format``, ``key``, ``key_material``,
  ``dataset``, ``store`` (the store's place under a cache root,
  ``<dataset>/<encoder>-<key12>.zarr``), file count and bytes, source path, date;
- every file of the store under ``<dataset>/<encoder>-<key12>.zarr/``;
- ``AVCL-PACK.sha256.json`` (last member): sha256 of every store file, so damage
  in transit is named per file.

The default archive name is ``<dataset>-<encoder>-<key12>.tar``, so the key
prefix is visible without opening it. ``tar -xf ARCHIVE -C ROOT`` also restores
the store (plus the two bookkeeping files at ROOT); :func:`unpack_store`
additionally checks the key, refuses to overwrite a different store and
verifies every chunk before the store appears under its final name.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .cache import StoreError, compute_key, open_store
from .verify import check_store

PACK_FORMAT = "avcl-store-pack"
PACK_VERSION = 1
PACK_MANIFEST = "AVCL-PACK.json"
PACK_HASHES = "AVCL-PACK.sha256.json"
_SKIP_SUFFIXES = (".claim", ".claim.lock")


class ArchiveError(StoreError):
    """An archive that cannot be packed or unpacked as asked; the message names it."""


@dataclass(frozen=True)
class PackResult:
    archive: Path
    key: str
    files: int
    bytes: int


@dataclass(frozen=True)
class UnpackResult:
    store: Path
    key: str
    files: int
    already_present: bool


def _store_files(fs, root: str) -> list[str]:
    """Relative paths of the store's files; claim files and temporaries are not part of a store."""
    root = root.rstrip("/")
    out = []
    for p in sorted(fs.find(root)):
        rel = p[len(root) + 1:]
        base = rel.rsplit("/", 1)[-1]
        if base.endswith(_SKIP_SUFFIXES) or ".claim.stale-" in base or ".tmp-" in base:
            continue
        out.append(rel)
    return out


def _store_label(path: str, key: str, dataset: str, encoder: str) -> str:
    """``<dataset>/<name>.zarr``: keep the store's own name when it follows the cache layout."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    if not name.endswith(f"-{key[:12]}.zarr"):
        name = f"{encoder or 'store'}-{key[:12]}.zarr"
    return f"{dataset or 'unknown'}/{name}"


class _HashingReader(io.RawIOBase):
    """File wrapper that feeds every byte read into a sha256."""

    def __init__(self, f):
        self.f = f
        self.sha = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.sha.update(data)
        return data


def _json_member(tar: tarfile.TarFile, name: str, obj: dict) -> None:
    data = json.dumps(obj, indent=1, sort_keys=True).encode("utf-8")
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
    tar.addfile(info, io.BytesIO(data))


def pack_store(path: str, out: str | os.PathLike, *, check: bool = True,
               storage_options: dict | None = None) -> PackResult:
    """Pack the complete store at ``path`` (local or fsspec URL) into one tar file.

    ``out`` is the archive file, or an existing directory (or a path ending in
    ``/``) to receive ``<dataset>-<encoder>-<key12>.tar``. With ``check`` the
    store is verified first and a corrupt store is not packed.
    """
    store = open_store(path, storage_options=storage_options)
    if check:
        problems = check_store(store)
        if problems:
            lines = "; ".join(f"shard {i}: {r}" if i >= 0 else r for i, r in problems[:5])
            raise ArchiveError(f"{path}: not packing a store that fails verification ({len(problems)} problems: {lines})")
    fs, root = _fs_with(store.path, storage_options or {})
    label = _store_label(store.path, store.key, store.dataset, store.encoder)
    as_dir = os.fspath(out).endswith(("/", os.sep))  # checked before Path() drops the slash
    out = Path(out)
    if as_dir or out.is_dir():
        out = out / f"{label.replace('/', '-').removesuffix('.zarr')}.tar"
    out.parent.mkdir(parents=True, exist_ok=True)
    files = _store_files(fs, root)
    sizes = {rel: int(fs.size(f"{root.rstrip('/')}/{rel}")) for rel in files}
    meta = {
        "format": PACK_FORMAT,
        "version": PACK_VERSION,
        "key": store.key,
        "key_material": store.key_material,
        "dataset": store.dataset,
        "encoder": store.encoder,
        "store": label,
        "files": len(files),
        "bytes": sum(sizes.values()),
        "source": store.path,
        "packed": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    hashes = {}
    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            _json_member(tar, PACK_MANIFEST, meta)
            for rel in files:
                info = tarfile.TarInfo(f"{label}/{rel}")
                info.size, info.mtime, info.mode = sizes[rel], int(time.time()), 0o644
                with fs.open(f"{root.rstrip('/')}/{rel}", "rb") as f:
                    reader = _HashingReader(f)
                    tar.addfile(info, reader)
                hashes[rel] = reader.sha.hexdigest()
            _json_member(tar, PACK_HASHES, hashes)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return PackResult(out, store.key, len(files), meta["bytes"])


def _fs_with(path: str, storage_options: dict):
    import fsspec

    return fsspec.core.url_to_fs(path, **storage_options)


def _safe_label(archive: str, label: str) -> PurePosixPath:
    p = PurePosixPath(label)
    if p.is_absolute() or ".." in p.parts or len(p.parts) != 2 or not p.name.endswith(".zarr"):
        raise ArchiveError(f"{archive}: {PACK_MANIFEST} names store {label!r}, not <dataset>/<name>.zarr")
    return p


def read_pack_manifest(archive: str | os.PathLike) -> dict:
    """The ``AVCL-PACK.json`` of ``archive``, after checking that its key material hashes to its key."""
    archive = str(archive)
    try:
        with tarfile.open(archive, "r:*") as tar:
            first = tar.next()
            if first is None or first.name != PACK_MANIFEST:
                raise ArchiveError(f"{archive}: not an avcl store archive (its first member is not {PACK_MANIFEST})")
            meta = json.load(tar.extractfile(first))
    except (tarfile.TarError, OSError, json.JSONDecodeError) as e:
        raise ArchiveError(f"{archive}: cannot read the archive ({type(e).__name__}: {e})") from None
    if meta.get("format") != PACK_FORMAT:
        raise ArchiveError(f"{archive}: {PACK_MANIFEST} has format {meta.get('format')!r}, not {PACK_FORMAT!r}")
    key = str(meta.get("key", ""))
    recomputed = compute_key(meta.get("key_material", {}))
    if recomputed != key:
        raise ArchiveError(f"{archive}: key material hashes to {recomputed[:12]}… but the archive claims key "
                           f"{key[:12]}…; the archive was altered — ask for a fresh copy")
    _safe_label(archive, str(meta.get("store", "")))
    return meta


def unpack_store(archive: str | os.PathLike, root: str | os.PathLike, *, check: bool = True) -> UnpackResult:
    """Restore the store packed in ``archive`` under cache root ``root``.

    Checks, in order: the archive's key material hashes to its key; the place
    ``<root>/<dataset>/<name>.zarr`` holds no different store (the same complete
    store there is left alone); every file's sha256 matches the archive's list;
    the store's own attributes carry the same key; with ``check``, every chunk
    verifies. Files land in a temporary sibling that is renamed into place only
    when all checks pass.
    """
    archive = str(archive)
    meta = read_pack_manifest(archive)
    key = meta["key"]
    label = _safe_label(archive, meta["store"])
    dest = Path(root) / label
    existing = _existing_store(dest, key)
    if existing:
        return UnpackResult(dest, key, 0, True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    prefix = f"{label}/"
    got: dict[str, str] = {}
    want: dict[str, str] | None = None
    try:
        with tarfile.open(archive, "r:*") as tar:
            for m in tar:
                if m.name == PACK_MANIFEST:
                    continue
                if m.name == PACK_HASHES:
                    want = json.load(tar.extractfile(m))
                    continue
                rel = m.name[len(prefix):] if m.name.startswith(prefix) else None
                if rel is None or not rel or ".." in PurePosixPath(rel).parts or PurePosixPath(rel).is_absolute():
                    raise ArchiveError(f"{archive}: member {m.name!r} lies outside the store {label}")
                if m.isdir():
                    continue
                if not m.isfile():
                    raise ArchiveError(f"{archive}: member {m.name!r} is not a regular file")
                target = tmp / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                sha = hashlib.sha256()
                with tar.extractfile(m) as src, open(target, "wb") as dst:
                    while block := src.read(1 << 20):
                        sha.update(block)
                        dst.write(block)
                got[rel] = sha.hexdigest()
        if want is None:
            raise ArchiveError(f"{archive}: {PACK_HASHES} is missing (the archive is truncated)")
        missing = sorted(set(want) - set(got))
        if missing:
            raise ArchiveError(f"{archive}: {len(missing)} files of the store are missing (e.g. {missing[0]})")
        damaged = sorted(rel for rel in got if want.get(rel) != got[rel])
        if damaged:
            raise ArchiveError(f"{archive}: {len(damaged)} files do not match their sha256 "
                               f"(e.g. {label}/{damaged[0]}); the archive was damaged in transit")
        try:
            store = open_store(str(tmp), key=key)
        except StoreError as e:
            raise ArchiveError(f"{archive}: the packed store does not open as key {key[:12]}… ({e})") from None
        if store.key != key:
            raise ArchiveError(f"{archive}: the store inside has key {store.key[:12]}…, the archive claims {key[:12]}…")
        if check:
            problems = check_store(store)
            if problems:
                lines = "; ".join(f"shard {i}: {r}" if i >= 0 else r for i, r in problems[:5])
                raise ArchiveError(f"{archive}: the unpacked store fails verification ({lines})")
        try:
            os.rename(tmp, dest)
        except OSError:  # someone unpacked the same archive meanwhile
            if _existing_store(dest, key):
                return UnpackResult(dest, key, len(got), True)
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return UnpackResult(dest, key, len(got), False)


def _existing_store(dest: Path, key: str) -> bool:
    """True when ``dest`` already holds this complete store; raise when it holds anything else."""
    if not dest.exists():
        return False
    try:
        have = open_store(str(dest), allow_incomplete=True)
    except StoreError:
        raise ArchiveError(f"{dest}: exists and is not a readable feature store; not overwriting it "
                           "(move it away or unpack into another cache root)") from None
    if have.key != key:
        raise ArchiveError(f"{dest}: holds a different store (key {have.key[:12]}…, the archive has {key[:12]}…); "
                           "not overwriting it — unpack into another cache root or remove it first")
    if have.status != "complete":
        raise ArchiveError(f"{dest}: holds an unfinished copy of this store ({have.status}); remove it and unpack again")
    return True
