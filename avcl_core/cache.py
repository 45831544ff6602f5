"""Feature stores: the one module that knows the Zarr layout of the cache.

A store is one Zarr v3 group per (dataset, encoder configuration) at
``<root>/<dataset>/<encoder>-<key[:12]>.zarr``. Arrays (first axis = manifest
row order):

- one float16 array per feature stream, e.g. ``audio`` (N, Ta, Da),
  ``visual`` (N, Tv, Dv), ``visual_dense`` (N, Tv, P, Dv);
- ``status`` (N,) uint8: 0 pending, 1 ok, > 1 an error code (:data:`STATUS_NAMES`);
- ``valid_len`` (N,) float32: seconds of real content in the clip window
  (the rest is padding);
- ``sample_id`` (N,) str;
- extra row arrays of their own dtype, written with the shard (attribute
  ``extras`` = {name: {"shape", "dtype"}}), e.g. the ground-truth ``masks``
  (N, F, H, W) uint8 and ``mask_valid`` (N, F) uint8 of segmentation datasets.

Stores written by the extractor hold no labels: their rows are keyed by content
(:func:`content_hash`), and labels, class names and splits come from a manifest at
training time, by default ``<store>/manifest.jsonl`` (:meth:`FeatureStore.manifest`).
Stores made with ``create_store(..., labels=True)`` (e.g. AV-CIL imports, whose key
covers the whole manifest) also hold ``labels`` (N,) int32, the manifest class id
(first label of multi-source rows, all of them in ``labels_multi`` (N, L) padded
with -1), and the class list in ``attrs["classes"]``.

Every array is sharded on the row axis with the same ``rows_per_shard``
(shards of about 16–32 MB, smaller inner chunks, zstd + crc32c). The shard is
the unit of work and of writing: a writer encodes all rows of a shard, writes
them in one aligned assignment per array, then writes the shard's done-marker
``_shards/<i>.done.json`` (row range, failures with reasons, a sha256 of every
array's bytes). A crash redoes at most that shard. Writers claim a shard with an
exclusive ``_shards/<i>.claim`` file, so two writers never encode the same shard; a
claim carries a lease that its holder's heartbeat keeps alive (:data:`CLAIM_LEASE_S`),
and a stale claim is taken over from any host (:func:`claim_state`).

The group attributes hold the full key material, ``key``, ``status``
(``building`` → ``complete``), counts, library versions, creation time and host.
A complete store is never modified; readers open read-only and refuse a store
that is incomplete or whose key differs from the one asked for.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import socket
import threading
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import zarr
import zarr.codecs as zc

from .manifest import Manifest, canonical_hash

# 2: rows keyed by content (media, window, sample id; not labels or splits), no labels
# array in extracted stores, the decoder identity in the key material.
SCHEMA_VERSION = 2
MANIFEST_FILE = "manifest.jsonl"
#: The manifest fields the features of a row depend on (:func:`content_hash`).
CONTENT_FIELDS = ("sample_id", "video", "start", "end", "frames", "masks", "audio")
# Formats of the ``masks`` extra (its ``format`` in the key material), written by :mod:`extract.masks`
# and read by the training problems.
#: Binary masks of the sounding object(s): 1 inside, 0 elsewhere; resized nearest-neighbour.
MASK_FORMAT = "binary-nearest/1"
#: Class maps of a multi-source synth render (``avcl_core.synth.render(multi > 0)``): ``class id + 1`` on
#: each sounding object, 0 elsewhere, kept as they are (not binarised) and resized nearest-neighbour.
CLASS_MAP_FORMAT = "synth-class-map-nearest/1"
#: Palette-index semantic masks (AVSS): 0 background, 1..K classes, 255 ignore; resized nearest-neighbour.
PALETTE_FORMAT = "palette-nearest/1"
# The store directory also holds `_shards/` and `manifest.jsonl`, which zarr does not know.
warnings.filterwarnings("ignore", message=r"Object at .* is not recognized as a component of a Zarr hierarchy")
TARGET_SHARD_BYTES = 24 << 20
TARGET_CHUNK_BYTES = 2 << 20
SHARDS_DIR = "_shards"
EMPTY_CLAIM_TIMEOUT_S = 30.0  # an empty claim file this old was left by a writer that died claiming
META_ARRAYS = ("status", "valid_len", "labels", "labels_multi", "sample_id")

STATUS_PENDING = 0
STATUS_OK = 1
STATUS_MISSING = 2
STATUS_UNREADABLE = 3
STATUS_NO_AUDIO = 4
STATUS_NO_VIDEO = 5
STATUS_EMPTY = 6
STATUS_ENCODE_ERROR = 7
#: Failures that retrying may fix (an encoder that ran out of device memory once): a shard
#: with such rows is not final until it has been tried :data:`MAX_ATTEMPTS` times.
#: Missing, unreadable, track-less or empty media fail the same way every time.
RETRYABLE_CODES = frozenset({STATUS_ENCODE_ERROR})
MAX_ATTEMPTS = 3
STATUS_NAMES = {
    STATUS_PENDING: "pending",
    STATUS_OK: "ok",
    STATUS_MISSING: "missing-file",
    STATUS_UNREADABLE: "unreadable",
    STATUS_NO_AUDIO: "no-audio-track",
    STATUS_NO_VIDEO: "no-video-track",
    STATUS_EMPTY: "zero-length",
    STATUS_ENCODE_ERROR: "encode-error",
}


class StoreError(RuntimeError):
    """A store that cannot be used as asked; the message names the store and key."""


def compute_key(material: Mapping) -> str:
    """sha256 of the canonical JSON of the schema version and the key material."""
    return canonical_hash({"schema": SCHEMA_VERSION, **material})


def content_rows(manifest: Manifest) -> list[dict]:
    """Each row of ``manifest`` reduced to :data:`CONTENT_FIELDS` (fields it lacks left out)."""
    return [{k: r[k] for k in CONTENT_FIELDS if r.get(k) not in (None, "")} for r in manifest.rows]


def content_hash(manifest: Manifest) -> str:
    """sha256 of what a store's rows are computed from: per row in order, the sample id,
    the media paths relative to the dataset root (``video``, ``frames``, ``masks``,
    ``audio``) and the window (``start``/``end``).

    Labels, class names, splits and ``subset`` are left out, so relabelling a manifest
    or moving clips between splits keeps the store; so is the dataset root, so a
    dataset moved to another disk keeps it too.
    """
    return canonical_hash(content_rows(manifest))


def store_path(root: str | os.PathLike, dataset: str, encoder: str, key: str) -> str:
    """``<root>/<dataset>/<encoder>-<key12>.zarr``."""
    return f"{str(root).rstrip('/')}/{dataset}/{encoder}-{key[:12]}.zarr"


def plan_rows(row_bytes: int, n_rows: int) -> tuple[int, int]:
    """(rows_per_shard, rows_per_chunk) for rows of ``row_bytes`` bytes.

    Shards aim at :data:`TARGET_SHARD_BYTES`, inner chunks at
    :data:`TARGET_CHUNK_BYTES`; the shard is a whole number of chunks.
    """
    row_bytes = max(1, row_bytes)
    per_chunk = max(1, TARGET_CHUNK_BYTES // row_bytes)
    per_shard = max(per_chunk, (TARGET_SHARD_BYTES // row_bytes) // per_chunk * per_chunk)
    per_shard = min(per_shard, max(per_chunk, -(-n_rows // per_chunk) * per_chunk))
    return int(per_shard), int(per_chunk)


def _versions() -> dict:
    import numcodecs

    out = {"python": platform.python_version(), "numpy": np.__version__, "zarr": zarr.__version__,
           "numcodecs": numcodecs.__version__}
    try:
        import torch

        out["torch"] = torch.__version__
    except ImportError:  # a reader need not have torch
        pass
    return out


def _is_url(path: str) -> bool:
    return "://" in str(path)


def _fs(path: str):
    import fsspec

    return fsspec.core.url_to_fs(str(path))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _array_digest(a: np.ndarray) -> str:
    if a.dtype.kind in "OTU":
        data = "\x00".join(str(x) for x in a.reshape(-1)).encode("utf-8")
    else:
        data = np.ascontiguousarray(a).tobytes()
    return hashlib.sha256(data).hexdigest()


# -- claims and their leases ------------------------------------------------------
#: Seconds a claim stays valid without a heartbeat. Its holder refreshes the claim file's
#: modification time every ``CLAIM_LEASE_S / 10`` s while it works on the shard; a claim
#: not refreshed for longer was left by a writer that died, hung, or lost its host, and
#: any writer on any host takes it over. Generous, because hosts' clocks differ.
CLAIM_LEASE_S = float(os.environ.get("AVCL_CLAIM_LEASE_S", 300))

_held: dict[str, str] = {}  # claim file -> token, for every claim this process holds
_held_lock = threading.Lock()
_heartbeat: threading.Thread | None = None


def _read_claim(path: Path) -> tuple[dict, float] | None:
    """(holder, age of its heartbeat in seconds) of the claim file at ``path``; None if absent.
    An empty or half-written file reads as ``{}``."""
    try:
        text = path.read_text()
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError:
        holder = {}
    return (holder if isinstance(holder, dict) else {}), age


def claim_state(path: Path, holder: dict, age: float) -> str:
    """``'live'``, ``'stale'`` (take it over) or ``'writing'`` (being created right now) for
    a claim file holding ``holder`` whose heartbeat is ``age`` seconds old.

    Stale: its lease expired (no heartbeat for ``holder['lease_s']`` s, any host); or it
    names this host and a process that is not running; or it names this very process
    but is not a claim this process holds (left by an earlier process that had the same
    pid, e.g. a restarted container). An empty claim is stale after
    :data:`EMPTY_CLAIM_TIMEOUT_S`.
    """
    if not holder:
        return "stale" if age > EMPTY_CLAIM_TIMEOUT_S else "writing"
    if age > float(holder.get("lease_s", CLAIM_LEASE_S)):
        return "stale"
    if holder.get("host") == socket.gethostname() and holder.get("pid"):
        pid = int(holder["pid"])
        if pid == os.getpid():
            with _held_lock:
                mine = _held.get(str(path))
            return "live" if mine is not None and mine == holder.get("token") else "stale"
        if not _pid_alive(pid):
            return "stale"
    return "live"


def _take_over(path: Path, dead: dict) -> None:
    """Remove the stale claim ``dead`` at ``path`` unless another writer already did.

    Contenders on any host race through a hard link to a tombstone named after the
    dead claim: only one link succeeds, so a contender that judged the claim dead after
    another had already replaced it with a fresh claim leaves that fresh claim alone.
    """
    try:
        mtime = path.stat().st_mtime_ns
    except FileNotFoundError:
        return
    tomb = path.with_name(f"{path.name}.stale-{dead.get('token') or dead.get('pid') or 'empty'}-"
                          f"{dead.get('time', mtime) if dead else mtime}")
    try:
        os.link(path, tomb)
    except (FileExistsError, FileNotFoundError):
        return  # another contender took it over, or it was released
    try:
        now = json.loads(tomb.read_text() or "{}")
    except (FileNotFoundError, json.JSONDecodeError):
        now = {}
    if now != dead:  # the file at path changed between our look and the link: not ours to remove
        with contextlib.suppress(FileNotFoundError):
            tomb.unlink()
        return
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _beat() -> None:
    """Refresh the claims this process holds every ``CLAIM_LEASE_S / 10`` s; ends when none is held."""
    global _heartbeat
    last = time.monotonic()
    while True:
        time.sleep(min(0.25, CLAIM_LEASE_S / 10))
        with _held_lock:
            if not _held:
                _heartbeat = None
                return
            items = list(_held.items())
        if time.monotonic() - last < CLAIM_LEASE_S / 10:
            continue
        last = time.monotonic()
        for path, token in items:
            got = _read_claim(Path(path))
            if got is not None and got[0].get("token") == token:
                with contextlib.suppress(FileNotFoundError):
                    os.utime(path)
            else:  # released, or taken over after our lease expired
                with _held_lock:
                    if _held.get(path) == token:
                        del _held[path]


def _hold(path: Path, token: str) -> None:
    global _heartbeat
    with _held_lock:
        _held[str(path)] = token
        if _heartbeat is None or not _heartbeat.is_alive():
            _heartbeat = threading.Thread(target=_beat, name="avcl-claim-heartbeat", daemon=True)
            _heartbeat.start()


def _write_json_atomic(target: Path, obj) -> None:
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(obj, sort_keys=True))
        tmp.replace(target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@dataclass(frozen=True)
class ShardFailure:
    sample_id: str
    code: int
    reason: str


class FeatureStore:
    """An open feature store. Use :func:`open_store` (read) or :func:`create_store` (write)."""

    def __init__(self, path: str, group: zarr.Group, writable: bool = False):
        self.path = str(path)
        self.group = group
        self.writable = writable
        self._fs, self._root = _fs(self.path)
        self._attrs_cache: dict | None = None

    # -- identity ---------------------------------------------------------------
    @property
    def attrs(self) -> dict:
        if self._attrs_cache is None or self.writable:
            self._attrs_cache = dict(self.group.attrs)
        return self._attrs_cache

    @property
    def key(self) -> str:
        return self.attrs["key"]

    @property
    def key_material(self) -> dict:
        return self.attrs["key_material"]

    @property
    def status(self) -> str:
        return self.attrs.get("status", "building")

    @property
    def n_rows(self) -> int:
        return int(self.attrs["n_rows"])

    @property
    def rows_per_shard(self) -> int:
        return int(self.attrs["rows_per_shard"])

    @property
    def n_shards(self) -> int:
        return -(-self.n_rows // self.rows_per_shard)

    @property
    def streams(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v) for k, v in self.attrs["streams"].items()}

    @property
    def extras(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Extra row arrays: name -> (per-row shape, dtype); empty for stores without them."""
        return {k: (tuple(v["shape"]), str(v["dtype"])) for k, v in (self.attrs.get("extras") or {}).items()}

    @property
    def dataset(self) -> str:
        return self.attrs.get("dataset", "")

    @property
    def encoder(self) -> str:
        return self.key_material.get("encoder", "")

    def shard_rows(self, i: int) -> slice:
        if not 0 <= i < self.n_shards:
            raise IndexError(f"{self.path}: shard {i} out of range 0..{self.n_shards - 1}")
        return slice(i * self.rows_per_shard, min(self.n_rows, (i + 1) * self.rows_per_shard))

    def __repr__(self) -> str:
        return f"FeatureStore({self.path!r}, key={self.key[:12]}, status={self.status})"

    # -- reading ----------------------------------------------------------------
    def read(self, name: str, rows: np.ndarray | slice | None = None) -> np.ndarray:
        """Read a whole array (shard-sized reads), optionally taking ``rows`` after."""
        if name not in self.group:
            raise StoreError(f"{self.path}: no array {name!r}; it has {sorted(self.group.array_keys())}")
        arr = self.group[name]
        if isinstance(rows, slice):
            return arr[rows]
        data = arr[...]
        return data if rows is None else data[np.asarray(rows)]

    @property
    def sample_ids(self) -> list[str]:
        return [str(x) for x in self.read("sample_id")]

    def labels(self) -> np.ndarray:
        """Class id of each row: the ``labels`` array when the store has one, else the
        first label of each row of the store's manifest (:meth:`manifest`)."""
        if "labels" in self.group:
            return self.read("labels")
        manifest = self.manifest()
        if manifest is None:
            raise StoreError(f"{self.path}: no labels array and no {MANIFEST_FILE}; "
                             "labels come from the manifest the store was extracted with")
        return first_labels(manifest)

    def manifest(self) -> Manifest | None:
        """The manifest saved in the store (``<store>/manifest.jsonl``: sample ids in row
        order, labels and splits of the latest extraction run on the store), or None."""
        from .manifest import ManifestError

        path = f"{self._root.rstrip('/')}/{MANIFEST_FILE}"
        try:
            with self._fs.open(path, "r", encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            return None
        rows = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ManifestError(f"{self.path}/{MANIFEST_FILE}:{lineno}: not valid JSON ({e.msg})") from None
        return Manifest(rows, source=f"{self.path}/{MANIFEST_FILE}")

    def row_status(self) -> np.ndarray:
        return self.read("status")

    def rows_for(self, sample_ids: Iterable[str]) -> np.ndarray:
        """Row indices of ``sample_ids`` in order; a clear error lists ids not in the store."""
        index = {s: i for i, s in enumerate(self.sample_ids)}
        ids = list(sample_ids)
        missing = [s for s in ids if s not in index]
        if missing:
            raise StoreError(
                f"{self.path}: {len(missing)} sample ids are not in this store (e.g. {', '.join(missing[:5])})"
            )
        return np.fromiter((index[s] for s in ids), dtype=np.int64, count=len(ids))

    # -- shard bookkeeping ------------------------------------------------------
    def _marker(self, i: int, kind: str) -> str:
        return f"{self._root.rstrip('/')}/{SHARDS_DIR}/{i:06d}.{kind}"

    def done_marker(self, i: int) -> dict | None:
        try:
            with self._fs.open(self._marker(i, "done.json"), "r") as f:
                return json.load(f)
        except FileNotFoundError:
            return None

    def done_shards(self) -> set[int]:
        try:
            names = self._fs.ls(f"{self._root.rstrip('/')}/{SHARDS_DIR}", detail=False)
        except FileNotFoundError:
            return set()
        out = set()
        for n in names:
            base = n.rsplit("/", 1)[-1]
            if base.endswith(".done.json"):
                out.add(int(base.split(".")[0]))
        return out

    def pending_shards(self) -> list[int]:
        done = self.done_shards()
        return [i for i in range(self.n_shards) if i not in done]

    def attempts(self, i: int) -> int:
        """How many times shard ``i`` was tried and deferred (its retry marker), 0 if never."""
        try:
            with self._fs.open(self._marker(i, "retry.json"), "r") as f:
                return int(json.load(f).get("attempts", 0))
        except FileNotFoundError:
            return 0
        except ValueError:  # a damaged retry marker counts as one attempt
            return 1

    def defer_shard(self, i: int, failures: Iterable[ShardFailure], attempts: int | None = None,
                    release: bool = True) -> dict:
        """Leave shard ``i`` pending for a retry: write its retry marker (``attempts``, default
        one more than before; the failures) and release this writer's claim. No row is written."""
        self._require_writable()
        n = self.attempts(i) + 1 if attempts is None else int(attempts)
        marker = {"shard": i, "attempts": n, "host": socket.gethostname(), "pid": os.getpid(),
                  "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "failed": [{"sample_id": f.sample_id, "code": f.code, "reason": f.reason} for f in failures]}
        _write_json_atomic(Path(self._marker(i, "retry.json")), marker)
        if release:
            self.release(i)
        return marker

    def retryable_shards(self) -> list[int]:
        """Done shards whose done-marker lists rows failed for a reason retrying may fix."""
        out = []
        for i in sorted(self.done_shards()):
            try:
                marker = self.done_marker(i) or {}
            except ValueError:  # a damaged marker is verify_store's to report
                continue
            if any(f.get("code") in RETRYABLE_CODES for f in marker.get("failed", [])):
                out.append(i)
        return out

    # -- writing ----------------------------------------------------------------
    def _require_writable(self) -> None:
        if not self.writable:
            raise StoreError(f"{self.path}: opened read-only")
        if _is_url(self.path) and not self.path.startswith("file://"):
            raise StoreError(f"{self.path}: extraction writes to a local directory; copy the store afterwards")

    def claim(self, i: int) -> bool:
        """Claim shard ``i`` for this process; False if done or held by a live writer.

        The claim file holds host, pid, a random token and the lease length
        (:data:`CLAIM_LEASE_S`); a thread of this process refreshes its modification
        time (the heartbeat) until :meth:`release` or :meth:`write_shard`. A stale
        claim (:func:`claim_state`: lease expired on any host, a dead process on this
        host, this pid but not this process's claim) is taken over atomically.
        """
        self._require_writable()
        if self.done_marker(i) is not None:
            return False
        path = Path(self._marker(i, "claim"))
        path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(20):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                got = _read_claim(path)
                if got is None:
                    continue
                state = claim_state(path, *got)
                if state == "stale":
                    _take_over(path, got[0])
                    continue
                if state == "writing":
                    time.sleep(0.05)
                    continue
                return False
            token = uuid.uuid4().hex
            me = {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time(), "token": token,
                  "lease_s": CLAIM_LEASE_S}
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            _hold(path, token)
            if self.done_marker(i) is not None:  # finished by another writer meanwhile
                self.release(i)
                return False
            return True
        return False

    def holds(self, i: int) -> bool:
        """Whether this process still holds its claim on shard ``i`` (not taken over)."""
        path = Path(self._marker(i, "claim"))
        with _held_lock:
            token = _held.get(str(path))
        got = _read_claim(path)
        return token is not None and got is not None and got[0].get("token") == token

    def release(self, i: int) -> None:
        """Remove this process's claim on shard ``i`` (a claim another writer took over is left)."""
        path = Path(self._marker(i, "claim"))
        with _held_lock:
            token = _held.pop(str(path), None)
        got = _read_claim(path)
        if got is not None and got[0].get("token") in (None, token):  # ours (or a token-less one), not a successor's
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def claim_holder(self, i: int) -> dict | None:
        """The claim file of shard ``i`` (host, pid, token, lease_s, time), or None."""
        got = _read_claim(Path(self._marker(i, "claim")))
        return None if got is None else got[0]

    def claims(self) -> dict[int, tuple[dict, float, str]]:
        """Every claimed shard: ``{i: (holder, heartbeat age in s, claim_state)}``."""
        out = {}
        for p in sorted(Path(self._root, SHARDS_DIR).glob("*.claim")):
            got = _read_claim(p)
            if got is not None:
                out[int(p.name.split(".")[0])] = (*got, claim_state(p, *got))
        return out

    def unclaim(self, shards: Iterable[int] | None = None) -> dict[int, tuple[dict, float, str]]:
        """Remove the claims on ``shards`` (default: all) whoever holds them; returns what was removed."""
        self._require_writable()
        want = None if shards is None else {int(i) for i in shards}
        removed = {}
        for i, info in self.claims().items():
            if want is None or i in want:
                with contextlib.suppress(FileNotFoundError):
                    Path(self._marker(i, "claim")).unlink()
                removed[i] = info
        return removed

    def write_shard(
        self,
        i: int,
        features: Mapping[str, np.ndarray],
        status: np.ndarray,
        valid_len: np.ndarray,
        failures: Iterable[ShardFailure] = (),
        extras: Mapping[str, np.ndarray] | None = None,
    ) -> dict:
        """Write all rows of shard ``i`` (one aligned assignment per array), then its done-marker.

        ``extras`` holds the shard's rows of every extra array of the store (:attr:`extras`)."""
        self._require_writable()
        rows = self.shard_rows(i)
        n = rows.stop - rows.start
        digests = {}
        unknown = set(extras or {}) - set(self.extras)
        if unknown:
            raise StoreError(f"{self.path}: shard {i}: {sorted(unknown)} are not extra row arrays of this store")
        for name, shape in self.streams.items():
            if name not in features:
                raise StoreError(f"{self.path}: shard {i} lacks stream {name!r}")
            data = np.asarray(features[name], dtype=self.group[name].dtype)
            if data.shape != (n, *shape):
                raise StoreError(f"{self.path}: shard {i} stream {name!r} has shape {data.shape}, expected {(n, *shape)}")
            self.group[name][rows] = data
            digests[name] = _array_digest(data)
        for name, (shape, dtype) in self.extras.items():
            data = np.asarray((extras or {}).get(name, np.zeros((n, *shape), dtype)), dtype=dtype)
            if data.shape != (n, *shape):
                raise StoreError(f"{self.path}: shard {i} array {name!r} has shape {data.shape}, expected {(n, *shape)}")
            self.group[name][rows] = data
            digests[name] = _array_digest(data)
        status = np.asarray(status, dtype=np.uint8)
        valid_len = np.asarray(valid_len, dtype=np.float32)
        if status.shape != (n,) or valid_len.shape != (n,):
            raise StoreError(f"{self.path}: shard {i} status/valid_len must have {n} rows")
        self.group["status"][rows] = status
        self.group["valid_len"][rows] = valid_len
        digests["status"] = _array_digest(status)
        digests["valid_len"] = _array_digest(valid_len)
        marker = {
            "shard": i,
            "attempts": self.attempts(i) + 1,
            "rows": [rows.start, rows.stop],
            "ok": int((status == STATUS_OK).sum()),
            "failed": [{"sample_id": f.sample_id, "code": f.code, "reason": f.reason} for f in failures],
            "sha256": digests,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        _write_json_atomic(Path(self._marker(i, "done.json")), marker)
        with contextlib.suppress(FileNotFoundError):
            Path(self._marker(i, "retry.json")).unlink()
        self.release(i)
        return marker

    def refresh(self) -> "FeatureStore":
        """Re-read the group metadata. zarr keeps the attributes read at open time and
        rewrites the whole document on update, so a writer refreshes before updating;
        otherwise its stale copy would undo what other writers (or a repair) wrote since."""
        self._require_writable()
        self.group = zarr.open_group(self.path, mode="r+")
        self._attrs_cache = None
        return self

    def update_attrs(self, values: Mapping) -> None:
        """Set some group attributes, keeping every other writer's."""
        self.refresh().group.attrs.update(dict(values))
        self._attrs_cache = None

    def finalize(self) -> bool:
        """Mark the store complete when every shard is done; returns whether it is."""
        self.refresh()  # neither a stale status nor stale attributes of this handle may win
        if self.status == "complete":
            return True
        if self.pending_shards():
            return False
        status = self.read("status")
        counts = {STATUS_NAMES.get(int(c), str(int(c))): int((status == c).sum()) for c in np.unique(status)}
        self.group.attrs.update(dict(status="complete", counts=counts,
                                     completed=time.strftime("%Y-%m-%dT%H:%M:%S%z")))
        self._attrs_cache = None
        return True

    def failures(self) -> list[dict]:
        """Every failed row with its reason, from the done-markers."""
        out = []
        for i in sorted(self.done_shards()):
            out.extend(self.done_marker(i).get("failed", []))
        return out

    def size_bytes(self) -> int:
        try:
            return int(self._fs.du(self._root, total=True))
        except Exception:  # noqa: BLE001 - a listing error must not break `ls`
            return -1


def create_store(
    path: str | os.PathLike,
    *,
    key_material: Mapping,
    manifest: Manifest,
    streams: Mapping[str, tuple[int, ...]],
    dtype: str = "float16",
    rows_per_shard: int | None = None,
    extras: Mapping[str, tuple[tuple[int, ...], str]] | None = None,
    labels: bool = True,
) -> FeatureStore:
    """Create a building store at ``path``, or reopen it to resume when its key matches.

    ``extras``: extra row arrays, name -> (per-row shape, dtype), sharded like the streams.
    ``labels``: also store the manifest's labels (``labels``, ``labels_multi``) and
    class list (``attrs["classes"]``); only for stores whose key covers them.

    Creation is atomic: the group is built in a temporary sibling directory and
    renamed into place, so two extractors starting at once end up sharing one store.
    """
    path = str(path)
    if _is_url(path) and not path.startswith("file://"):
        raise StoreError(f"{path}: extraction writes to a local directory; copy the store afterwards")
    path = path.removeprefix("file://")
    key = compute_key(key_material)
    if os.path.exists(path):
        return _reopen_for_writing(path, key)
    n = len(manifest)
    if n == 0:
        raise StoreError(f"{path}: the manifest has no rows")
    extras = {k: (tuple(int(x) for x in s), str(dt)) for k, (s, dt) in (extras or {}).items()}
    row_bytes = sum(int(np.prod(s)) for s in streams.values()) * np.dtype(dtype).itemsize
    row_bytes += sum(int(np.prod(s)) * np.dtype(dt).itemsize for s, dt in extras.values())
    per_shard, per_chunk = plan_rows(row_bytes, n)
    if rows_per_shard:
        per_shard, per_chunk = rows_per_shard, min(per_chunk, rows_per_shard)
        while per_shard % per_chunk:
            per_chunk -= 1
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    group = zarr.open_group(tmp, mode="w")
    compressors = [zc.ZstdCodec(level=3), zc.Crc32cCodec()]
    for name, shape in streams.items():
        shape = tuple(int(x) for x in shape)
        group.create_array(name, shape=(n, *shape), dtype=dtype, chunks=(per_chunk, *shape),
                           shards=(per_shard, *shape), compressors=compressors, fill_value=0)
    for name, (shape, dt) in extras.items():
        group.create_array(name, shape=(n, *shape), dtype=dt, chunks=(per_chunk, *shape),
                           shards=(per_shard, *shape), compressors=compressors, fill_value=0)
    for name, dt in (("status", "uint8"), ("valid_len", "float32")):
        group.create_array(name, shape=(n,), dtype=dt, chunks=(per_shard,), shards=(per_shard,),
                           compressors=compressors, fill_value=0)
    if labels:
        _write_labels(group, manifest, compressors)
    ids = group.create_array("sample_id", shape=(n,), dtype=str, chunks=(n,))
    ids[:] = np.array(manifest.sample_ids, dtype=object)
    group.attrs.update(
        {
            "schema": SCHEMA_VERSION,
            "key": key,
            "key_material": dict(key_material),
            "status": "building",
            "dataset": manifest.dataset,
            **({"classes": manifest.classes()} if labels else {}),
            "n_rows": n,
            "rows_per_shard": per_shard,
            "rows_per_chunk": per_chunk,
            "streams": {k: list(v) for k, v in streams.items()},
            "dtype": dtype,
            **({"extras": {k: {"shape": list(s), "dtype": dt} for k, (s, dt) in extras.items()}} if extras else {}),
            "versions": _versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": socket.gethostname(),
        }
    )
    os.makedirs(os.path.join(tmp, SHARDS_DIR), exist_ok=True)
    try:
        os.rename(tmp, path)
    except OSError:  # another writer created it first: use theirs
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return _reopen_for_writing(path, key)


def first_labels(manifest: Manifest) -> np.ndarray:
    """int64 (N,): each row's class id (the first one of a multi-source row)."""
    return np.array([r["label"][0] if isinstance(r["label"], list) else r["label"] for r in manifest.rows],
                    dtype=np.int64)


def _write_labels(group: zarr.Group, manifest: Manifest, compressors) -> None:
    n = len(manifest)
    labels = [r["label"] for r in manifest]
    group.create_array("labels", shape=(n,), dtype="int32", chunks=(n,),
                       compressors=compressors)[:] = first_labels(manifest).astype(np.int32)
    if any(isinstance(lab, list) for lab in labels):
        width = max(len(lab) if isinstance(lab, list) else 1 for lab in labels)
        multi = np.full((n, width), -1, dtype=np.int32)
        for j, lab in enumerate(labels):
            lab = lab if isinstance(lab, list) else [lab]
            multi[j, : len(lab)] = lab
        group.create_array("labels_multi", shape=multi.shape, dtype="int32", chunks=multi.shape,
                           compressors=compressors)[:] = multi


def _reopen_for_writing(path: str, key: str) -> FeatureStore:
    try:
        group = zarr.open_group(path, mode="r+")
        have = group.attrs.get("key")
    except Exception as e:  # noqa: BLE001 - any unreadable group is reported the same way
        raise StoreError(f"{path}: exists but is not a readable feature store ({e})") from None
    if have != key:
        raise StoreError(
            f"{path}: store key {str(have)[:12]}… differs from the requested key {key[:12]}…; "
            "remove the directory or choose another cache root"
        )
    return FeatureStore(path, group, writable=True)


def open_store(
    path: str | os.PathLike,
    *,
    key: str | None = None,
    allow_incomplete: bool = False,
    storage_options: dict | None = None,
) -> FeatureStore:
    """Open a store read-only by path or fsspec URL (``file://``, ``memory://``, ``s3://`` …).

    Refuses a store whose key differs from ``key`` (a prefix is accepted) and a
    store that is not complete unless ``allow_incomplete``.
    """
    path = str(path)
    try:
        group = zarr.open_group(path, mode="r", storage_options=storage_options) if _is_url(path) \
            else zarr.open_group(path, mode="r")
    except FileNotFoundError:
        raise StoreError(f"{path}: no feature store here") from None
    except Exception as e:  # noqa: BLE001
        raise StoreError(f"{path}: not a readable feature store ({type(e).__name__}: {e})") from None
    store = FeatureStore(path, group, writable=False)
    if key is not None and len(key) < 6:
        raise StoreError(f"{path}: asked for key {key!r}; give at least 6 hex digits of the store key")
    if "key" not in store.attrs:
        raise StoreError(f"{path}: a Zarr group without avcl key attributes, not a feature store")
    if key is not None and not store.key.startswith(key):
        raise StoreError(f"{path}: store key {store.key[:12]}… differs from the requested key {key[:12]}…")
    if store.status != "complete" and not allow_incomplete:
        done = len(store.done_shards())
        raise StoreError(
            f"{path}: store is {store.status} ({done}/{store.n_shards} shards done); "
            "finish it with avcl-extract (same arguments) or pass allow_incomplete"
        )
    return store


def find_stores(root: str | os.PathLike) -> list[str]:
    """Paths of every ``*.zarr`` store below ``root`` (local or fsspec URL)."""
    fs, base = _fs(str(root))
    out = []
    try:
        found = fs.glob(f"{base.rstrip('/')}/**/*.zarr")
    except FileNotFoundError:
        return []
    for p in sorted(found):
        if ".tmp-" in p:
            continue
        if fs.exists(f"{p}/zarr.json"):
            out.append(p if not _is_url(str(root)) else f"{str(root).split('://')[0]}://{p}")
    return out


def verify_store(store: FeatureStore) -> list[tuple[int, str]]:
    """Re-read every shard of every array; return ``(shard, reason)`` for each corrupt one.

    Checks that each chunk decodes (crc32c), that shapes match the attributes
    and that the bytes hash to the sha256 in the shard's done-marker.
    """
    bad: list[tuple[int, str]] = []
    names = list(store.streams) + list(store.extras) + ["status", "valid_len"]
    shapes = {**store.streams, **{k: s for k, (s, _) in store.extras.items()}}
    for i in range(store.n_shards):
        rows = store.shard_rows(i)
        try:
            marker = store.done_marker(i)
        except ValueError as e:  # damaged marker (JSON / UTF-8 decode errors are ValueErrors)
            bad.append((i, f"done-marker unreadable ({type(e).__name__}: {e})"))
            continue
        if marker is None:
            bad.append((i, "no done-marker (shard never finished)"))
            continue
        for name in names + sorted(set(marker.get("sha256", {})) - set(names)):
            if name not in store.group:
                bad.append((i, f"{name}: array missing (its shard digest is in the done-marker)"))
                continue
            try:
                data = store.group[name][rows]
            except Exception as e:  # noqa: BLE001 - any decode failure is corruption
                bad.append((i, f"{name}: chunk does not decode ({type(e).__name__}: {e})"))
                continue
            want_shape = (rows.stop - rows.start, *shapes.get(name, ()))
            if data.shape != want_shape:
                bad.append((i, f"{name}: shape {data.shape} != {want_shape}"))
            elif marker.get("sha256", {}).get(name) not in (None, _array_digest(data)):
                bad.append((i, f"{name}: sha256 differs from the done-marker"))
    for name in [a for a in ("labels", "labels_multi", "sample_id") if a in store.group]:
        try:
            store.group[name][...]
        except Exception as e:  # noqa: BLE001
            bad.append((-1, f"{name}: does not decode ({type(e).__name__}: {e})"))
    return bad
