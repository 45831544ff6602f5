"""Import the feature files released with AV-CIL into complete feature stores.

AV-CIL (Pian et al., "Audio-Visual Class-Incremental Learning", ICCV 2023)
released pre-extracted features for AVE, Kinetics-Sounds and VGGSound-100:

- audio: ``audio_pretrained_feature_dict.npy`` — ``np.save`` of a pickled dict
  ``video id → (768,)`` AudioMAE clip embedding;
- visual: ``visual_pretrained_feature_dict.npy`` (a pickled dict, AVE) or
  ``visual_features.h5`` (one dataset per video id, KS / VGGSound-100) of
  ``(1568, 768)`` VideoMAE tokens per video.

The 1568 VideoMAE tokens are 8 tubelet time steps × 14 × 14 patches, time-major
(token ``t·196 + 14·h + w``). Stores written here (float16):

- ``<root>/<dataset>/audiomae-<key12>.zarr``: ``audio`` (N, 1, 768) — the clip vector;
- ``<root>/<dataset>/videomae-<key12>.zarr``: ``visual`` (N, 8, 768) =
  mean over the 196 patches of each time step (computed in float32), and with
  ``dense`` also ``visual_dense`` (N, 8, 196, 768) — the tokens themselves
  (about 2.4 MB per clip).

Rows follow the protocol's published split lists (train, val, test; within a
split by protocol class index, then sample id); ``label`` is the protocol class
index. Ids absent from a feature file get status ``missing-file`` with reason
"not in released features" and the import goes on. ``valid_len`` is the clip
length AV-CIL used (10 s) for every imported row, 0 for missing ones.

The key material holds the encoder name, the source file's sha256 (standing in
for the weights hash), the pooling, the streams, the dtype and the manifest
hash; the attributes add ``provenance`` (file names, sizes, sha256, protocol,
"released by AV-CIL").
"""
from __future__ import annotations

import hashlib
import os
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .cache import (STATUS_MISSING, STATUS_OK, STATUS_UNREADABLE, FeatureStore, ShardFailure, StoreError,
                    compute_key, create_store, open_store, store_path)
from .manifest import Manifest

RELEASED_BY = "released by AV-CIL (Pian et al., Audio-Visual Class-Incremental Learning, ICCV 2023)"
CLIP_SECONDS = 10.0
AUDIO_DIM = 768
VIDEO_STEPS, VIDEO_PATCHES, VIDEO_DIM = 8, 196, 768
MISSING_REASON = "not in released features"
PICKLE_SUFFIXES = (".npy", ".pkl", ".pickle")
HDF5_SUFFIXES = (".h5", ".hdf5")


class AvcilImportError(StoreError):
    """A feature file or protocol that cannot be imported; the message names it."""


class UntrustedPickleError(AvcilImportError):
    """A pickled feature file opened without ``trust_pickle``."""


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """sha256 hex of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class FeatureFile:
    """Read-only ``video id → array`` view of one released feature file.

    ``.npy`` / ``.pkl`` files hold a pickled dict and are opened only with
    ``trust_pickle=True`` (unpickling runs code stored in the file); ``.h5`` /
    ``.hdf5`` files hold one dataset per video id and need no trust.
    """

    def __init__(self, path: str | os.PathLike, *, trust_pickle: bool = False):
        self.path = Path(path)
        if not self.path.is_file():
            raise AvcilImportError(f"feature file {self.path} does not exist")
        self._h5 = None
        self._dict: dict[str, object] | None = None
        name = self.path.name.lower()
        if name.endswith(HDF5_SUFFIXES):
            import h5py

            try:
                self._h5 = h5py.File(self.path, "r")
            except OSError as e:
                raise AvcilImportError(f"feature file {self.path} is not a readable HDF5 file ({e})") from None
            self._ids = {str(k) for k in self._h5.keys()}
        elif name.endswith(PICKLE_SUFFIXES):
            self._dict = self._load_pickled(trust_pickle)
            self._ids = set(self._dict)
        else:
            raise AvcilImportError(
                f"feature file {self.path}: unknown format; expected a pickled dict "
                f"({', '.join(PICKLE_SUFFIXES)}) or HDF5 ({', '.join(HDF5_SUFFIXES)})"
            )
        self._sha256: str | None = None

    def _load_pickled(self, trust: bool) -> dict[str, object]:
        if self.path.suffix.lower() == ".npy":
            try:  # a plain numeric array loads without unpickling anything
                arr = np.load(self.path, allow_pickle=False)
            except ValueError:
                arr = None
            if arr is not None:
                raise AvcilImportError(
                    f"feature file {self.path} holds a plain array of shape {arr.shape}, not a dict "
                    "video id → features as AV-CIL released them"
                )
        if not trust:
            raise UntrustedPickleError(
                f"feature file {self.path} is a pickled Python object. Unpickling can run arbitrary code "
                "stored in the file, so it is refused by default. If you obtained the file yourself from "
                "AV-CIL's release and trust it, pass --trust-pickle (trust_pickle=True); an HDF5 file with "
                "one dataset per video id needs no such trust."
            )
        try:
            if self.path.suffix.lower() == ".npy":
                obj = np.load(self.path, allow_pickle=True)
                obj = obj.item() if isinstance(obj, np.ndarray) and obj.dtype == object and obj.shape == () else obj
            else:
                with open(self.path, "rb") as f:
                    obj = pickle.load(f)
        except Exception as e:  # noqa: BLE001 - any unpickling failure means the same to the user
            raise AvcilImportError(f"feature file {self.path} cannot be unpickled ({type(e).__name__}: {e})") from None
        if not isinstance(obj, dict):
            raise AvcilImportError(f"feature file {self.path} holds a {type(obj).__name__}, not a dict "
                                   "video id → features")
        return {k.decode() if isinstance(k, bytes) else str(k): v for k, v in obj.items()}

    def __contains__(self, sample_id: str) -> bool:
        return sample_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def ids(self) -> set[str]:
        return set(self._ids)

    def get(self, sample_id: str) -> np.ndarray | None:
        """The stored array of ``sample_id`` as float32, or None when the file lacks it."""
        if sample_id not in self._ids:
            return None
        if self._h5 is not None:
            node = self._h5[sample_id]
            if not hasattr(node, "shape"):
                raise AvcilImportError(f"feature file {self.path}: {sample_id!r} is an HDF5 group, not a dataset")
            return np.asarray(node[()], dtype=np.float32)
        value = self._dict[sample_id]
        if hasattr(value, "detach"):  # torch tensors pickled by the releasing code
            value = value.detach().cpu().numpy()
        return np.asarray(value, dtype=np.float32)

    @property
    def sha256(self) -> str:
        if self._sha256 is None:
            self._sha256 = file_sha256(self.path)
        return self._sha256

    def describe(self, role: str) -> dict:
        """Provenance entry: role, file name, absolute path, size in bytes, sha256."""
        return {"role": role, "name": self.path.name, "path": str(self.path.resolve()),
                "bytes": self.path.stat().st_size, "sha256": self.sha256}

    def close(self) -> None:
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None

    def __enter__(self) -> "FeatureFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- transforms: released array → store rows ------------------------------------------
def audio_rows(v: np.ndarray) -> dict[str, np.ndarray]:
    """AudioMAE clip vector ``(768,)`` or ``(1, 768)`` → ``{"audio": (1, 768)}``."""
    if v.size != AUDIO_DIM or v.ndim > 2:
        raise ValueError(f"shape {v.shape} is not ({AUDIO_DIM},)")
    return {"audio": v.reshape(1, AUDIO_DIM)}


def visual_rows(v: np.ndarray, dense: bool = False) -> dict[str, np.ndarray]:
    """VideoMAE tokens ``(1568, 768)`` (or ``(8, 196, 768)``) → ``visual`` (8, 768) [+ ``visual_dense`` (8, 196, 768)].

    ``visual[t] = mean_p tokens[t, p]`` over the 196 patches of time step ``t``, in float32.
    """
    if v.shape not in ((VIDEO_STEPS * VIDEO_PATCHES, VIDEO_DIM), (VIDEO_STEPS, VIDEO_PATCHES, VIDEO_DIM)):
        raise ValueError(f"shape {v.shape} is not ({VIDEO_STEPS * VIDEO_PATCHES}, {VIDEO_DIM})")
    tokens = v.reshape(VIDEO_STEPS, VIDEO_PATCHES, VIDEO_DIM)
    out = {"visual": tokens.mean(axis=1, dtype=np.float32)}
    if dense:
        out["visual_dense"] = tokens
    return out


def find_release_files(directory: str | os.PathLike) -> dict[str, Path]:
    """The audio / visual feature files in a directory laid out as AV-CIL released it.

    Looks in ``DIR`` and in ``DIR/{audio,visual}_pretrained_feature/``; for the
    visual stream the HDF5 file is preferred (it needs no pickle trust).
    """
    d = Path(directory)
    candidates = {
        "audio": ["audio_pretrained_feature/audio_pretrained_feature_dict.npy", "audio_pretrained_feature_dict.npy"],
        "visual": ["visual_pretrained_feature/visual_features.h5", "visual_features.h5",
                   "visual_pretrained_feature/visual_pretrained_feature_dict.npy", "visual_pretrained_feature_dict.npy"],
    }
    out = {}
    for role, names in candidates.items():
        hit = next((d / n for n in names if (d / n).is_file()), None)
        if hit is not None:
            out[role] = hit
    return out


# -- rows of the stores ---------------------------------------------------------------
def protocol_manifest(protocol: str | os.PathLike, dataset: str | None = None) -> Manifest:
    """Manifest of every sample id in the protocol's published split lists.

    Rows: splits in the order train, val, test; within one by protocol class index,
    then sample id. ``label`` = protocol class index, ``class_name`` its name,
    ``video`` = ``<id>.mp4`` (a placeholder: imported stores are never re-extracted).
    """
    from .protocols import load_protocol

    p = load_protocol(str(protocol))
    where = f"protocol {p.name!r}"
    if p.splits is None or not p.sample_labels:
        raise AvcilImportError(f"{where} lists no per-class sample ids; import-avcil needs the published split lists "
                               "(e.g. ave-4x7, ks-5x6, vs100-10x10)")
    if not p.classes:
        raise AvcilImportError(f"{where} has no class list of its own")
    dataset = dataset or p.dataset
    order = {s: k for k, s in enumerate(("train", "val", "test"))}
    rows = []
    for split in sorted(p.splits, key=lambda s: (order.get(s, 99), s)):
        ids = sorted(p.splits[split])
        unlabelled = [i for i in ids if i not in p.sample_labels]
        if unlabelled:
            raise AvcilImportError(f"{where}: sample {unlabelled[0]!r} of split {split!r} has no class in the lists")
        for sid in sorted(ids, key=lambda i: (p.sample_labels[i], i)):
            c = int(p.sample_labels[sid])
            rows.append({"sample_id": sid, "dataset": dataset, "split": split, "label": c,
                         "class_name": p.classes[c], "video": f"{sid}.mp4"})
    return Manifest(rows, source=f"protocol {p.name}")


@dataclass
class ImportResult:
    """Outcome of importing one feature file into one store."""

    path: str
    key: str
    rows: int
    ok: int
    missing: list[str] = field(default_factory=list)
    bad: list[tuple[str, str]] = field(default_factory=list)
    already_present: bool = False


def _import_stream(
    source: FeatureFile,
    *,
    encoder: str,
    role: str,
    streams: dict[str, tuple[int, ...]],
    transform: Callable[[np.ndarray], dict[str, np.ndarray]],
    pooling: str,
    manifest: Manifest,
    cache_root: str | os.PathLike,
    protocol_name: str,
    rows_per_shard: int | None,
    progress: bool,
) -> ImportResult:
    material = {
        "encoder": encoder,
        "variant": "av-cil-release",
        "weights": f"released-features:sha256:{source.sha256}",
        "pooling": pooling,
        "streams": {k: list(v) for k, v in streams.items()},
        "dtype": "float16",
        "manifest": manifest.hash(),
    }
    key = compute_key(material)
    path = store_path(cache_root, manifest.dataset, encoder, key)
    if os.path.exists(path):
        try:
            done = open_store(path, key=key)
        except StoreError:
            done = None  # unfinished: resume below
        if done is not None:
            return _result(done, already=True)
    first = next((sid for sid in manifest.sample_ids if sid in source), None)
    if first is None:
        raise AvcilImportError(f"feature file {source.path}: none of the {len(manifest)} sample ids of "
                               f"{manifest.source} is in it (e.g. {manifest.sample_ids[0]!r}); wrong dataset?")
    try:  # a systematic format error should stop the import before anything is written
        transform(source.get(first))
    except (ValueError, TypeError) as e:
        raise AvcilImportError(f"feature file {source.path}: {first!r} has {e}; is this the {role} file?") from None
    store = create_store(path, key_material=material, manifest=manifest, streams=streams,
                         rows_per_shard=rows_per_shard)
    store.update_attrs({"provenance": {
        "source": RELEASED_BY,
        "files": [source.describe(role)],
        "protocol": protocol_name,
        "clip_seconds": CLIP_SECONDS,
        "imported": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "tool": "avcl-cache import-avcil",
    }})
    manifest.save(Path(path) / "manifest.jsonl")
    pending = store.pending_shards()
    bar = None
    if progress:
        from tqdm import tqdm

        total = sum(store.shard_rows(i).stop - store.shard_rows(i).start for i in pending)
        bar = tqdm(total=total, desc=f"{encoder} ← {source.path.name}", unit="clip")
    ids = manifest.sample_ids
    try:
        for i in pending:
            if store.claim(i):
                _write_shard(store, i, ids, source, transform, bar)
    finally:
        if bar is not None:
            bar.close()
    if not store.finalize():
        raise AvcilImportError(f"{path}: shards {store.pending_shards()[:5]} are held by another importer; "
                               "run the same command again when it has finished")
    return _result(open_store(path, key=key), already=False)


def _write_shard(store: FeatureStore, i: int, ids: list[str], source: FeatureFile,
                 transform: Callable[[np.ndarray], dict[str, np.ndarray]], bar=None) -> None:
    """Read the released arrays of shard ``i``'s rows one id at a time, write the shard in one go."""
    rows = store.shard_rows(i)
    n = rows.stop - rows.start
    feats = {k: np.zeros((n, *s), dtype=np.float16) for k, s in store.streams.items()}
    status = np.full(n, STATUS_OK, dtype=np.uint8)
    valid = np.full(n, CLIP_SECONDS, dtype=np.float32)
    failures = []
    for j, sid in enumerate(ids[rows]):
        if bar is not None:
            bar.update(1)
        if sid not in source:
            status[j], valid[j] = STATUS_MISSING, 0.0
            failures.append(ShardFailure(sid, STATUS_MISSING, f"{MISSING_REASON} ({source.path.name})"))
            continue
        try:  # one damaged entry (not numbers, wrong shape) is that row's failure, not the import's
            out = transform(source.get(sid))
            for k, a in out.items():
                feats[k][j] = a
            if not all(np.isfinite(feats[k][j]).all() for k in out):
                raise ValueError("values that overflow float16")
        except (ValueError, TypeError) as e:
            for k in feats:
                feats[k][j] = 0
            status[j], valid[j] = STATUS_UNREADABLE, 0.0
            failures.append(ShardFailure(sid, STATUS_UNREADABLE, f"{source.path.name}: {e}"))
    store.write_shard(i, feats, status, valid, failures)


def _result(store: FeatureStore, already: bool) -> ImportResult:
    fails = store.failures()
    missing = [f["sample_id"] for f in fails if MISSING_REASON in f.get("reason", "")]
    bad = [(f["sample_id"], f.get("reason", "")) for f in fails if MISSING_REASON not in f.get("reason", "")]
    ok = int((store.row_status() == STATUS_OK).sum())
    return ImportResult(store.path, store.key, store.n_rows, ok, missing, bad, already)


def import_avcil(
    protocol: str | os.PathLike,
    *,
    audio: str | os.PathLike | None = None,
    visual: str | os.PathLike | None = None,
    cache_root: str | os.PathLike,
    dataset: str | None = None,
    dense: bool = False,
    trust_pickle: bool = False,
    rows_per_shard: int | None = None,
    progress: bool = False,
) -> dict[str, ImportResult]:
    """Import AV-CIL's released ``audio`` and/or ``visual`` feature files into complete stores.

    Returns ``{"audio": ImportResult, "visual": ImportResult}`` for the files given.
    Both stores share one manifest (the protocol's split lists, see
    :func:`protocol_manifest`), saved as ``<store>/manifest.jsonl``. A store that
    is already complete with the same key is left as it is.
    """
    if audio is None and visual is None:
        raise AvcilImportError("nothing to import: give an audio and/or a visual feature file")
    cache_root = str(cache_root).removeprefix("file://")
    if "://" in cache_root:
        raise AvcilImportError(f"{cache_root}: imports write to a local cache root; copy the stores to the URL "
                               "afterwards (see `avcl-cache pack` or any directory copy)")
    manifest = protocol_manifest(protocol, dataset)
    protocol_name = manifest.source.removeprefix("protocol ")
    # open (and trust-check) every file before writing anything
    sources = {}
    try:
        if audio is not None:
            sources["audio"] = FeatureFile(audio, trust_pickle=trust_pickle)
        if visual is not None:
            sources["visual"] = FeatureFile(visual, trust_pickle=trust_pickle)
        out = {}
        common = dict(manifest=manifest, cache_root=cache_root, protocol_name=protocol_name,
                      rows_per_shard=rows_per_shard, progress=progress)
        if "audio" in sources:
            out["audio"] = _import_stream(sources["audio"], encoder="audiomae", role="audio",
                                          streams={"audio": (1, AUDIO_DIM)}, transform=audio_rows,
                                          pooling="clip embedding as released", **common)
        if "visual" in sources:
            streams = {"visual": (VIDEO_STEPS, VIDEO_DIM)}
            if dense:
                streams["visual_dense"] = (VIDEO_STEPS, VIDEO_PATCHES, VIDEO_DIM)
            out["visual"] = _import_stream(
                sources["visual"], encoder="videomae", role="visual", streams=streams,
                transform=lambda v: visual_rows(v, dense=dense),
                pooling="mean over the 196 patch tokens of each of the 8 tubelet time steps", **common)
        return out
    finally:
        for s in sources.values():
            s.close()
