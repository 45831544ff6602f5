"""Checking a feature store end to end, and repairing corrupt shards.

:func:`check_store` = :func:`avcl_core.cache.verify_store` (every chunk of every
shard decodes — crc32c — has the shape the attributes promise and hashes to the
sha256 in its done-marker) plus the checks that tie a store to its identity:

- the key material in the attributes hashes to the stored key
  (``compute_key(key_material) == key``), so edited attributes are caught;
- ``sample_id`` (and ``labels``, in stores that hold them) agree with
  ``<store>/manifest.jsonl`` when the store carries one, and the manifest hashes to
  the key material's content hash (``content``, :func:`avcl_core.cache.content_hash`)
  or, for stores keyed by the whole manifest, its manifest hash.

A problem is ``(shard, reason)``; ``shard == -1`` means it concerns a whole array
or the attributes and cannot be fixed by re-extracting shards.

:func:`repair_store` re-extracts the corrupt shards by running
``avcl-extract --repair STORE --shards i,j`` as a subprocess (this package never
imports the extraction code), using the settings the store recorded under
``attrs["extract"]`` (``dataset``, ``root``, ``manifest``, encoder options).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass

import numpy as np

from .cache import FeatureStore, StoreError, _is_url, compute_key, content_hash, verify_store
from .manifest import Manifest, ManifestError

MANIFEST_FILE = "manifest.jsonl"
MANIFEST_HASH_FIELDS = ("manifest", "manifest_hash", "manifest_sha256")

Problem = tuple[int, str]


class RepairError(StoreError):
    """A store whose corrupt shards cannot be re-extracted here; the message says why."""


def store_manifest(store: FeatureStore) -> Manifest | None:
    """The ``manifest.jsonl`` saved inside the store (local or fsspec URL), or None."""
    return store.manifest()


def _identity_problems(store: FeatureStore) -> list[Problem]:
    out: list[Problem] = []
    try:
        material = store.key_material
        recomputed = compute_key(material)
    except Exception as e:  # noqa: BLE001 - unreadable attributes are a problem to report, not a crash
        return [(-1, f"attributes: key material unreadable ({type(e).__name__}: {e})")]
    if recomputed != store.key:
        out.append((-1, f"attributes: key material hashes to {recomputed[:12]}…, not to the stored key "
                        f"{store.key[:12]}… (attributes were edited or damaged)"))
    try:
        manifest = store_manifest(store)
    except ManifestError as e:
        return out + [(-1, f"{MANIFEST_FILE}: {e}")]
    if manifest is None:
        return out
    for field in MANIFEST_HASH_FIELDS:
        want = material.get(field)
        if isinstance(want, str) and len(want) == 64 and manifest.hash() != want:
            out.append((-1, f"{MANIFEST_FILE}: hashes to {manifest.hash()[:12]}…, key material says {want[:12]}…"))
    want = material.get("content")
    if isinstance(want, str) and content_hash(manifest) != want:
        out.append((-1, f"{MANIFEST_FILE}: its media and windows hash to {content_hash(manifest)[:12]}…, "
                        f"key material says {want[:12]}…"))
    try:
        ids = store.sample_ids
        labels = store.read("labels") if "labels" in store.group else None
    except Exception:  # noqa: BLE001 - already reported by verify_store as not decoding
        return out
    want_ids = manifest.sample_ids
    if ids != want_ids:
        if len(ids) != len(want_ids):
            out.append((-1, f"sample_id: {len(ids)} rows but {MANIFEST_FILE} has {len(want_ids)}"))
        else:
            j = next(k for k, (a, b) in enumerate(zip(ids, want_ids)) if a != b)
            out.append((-1, f"sample_id: row {j} is {ids[j]!r}, {MANIFEST_FILE} says {want_ids[j]!r}"))
        return out
    if labels is None:
        return out
    first = np.array([r["label"][0] if isinstance(r["label"], list) else r["label"] for r in manifest], np.int64)
    diff = np.flatnonzero(labels.astype(np.int64) != first)
    if diff.size:
        j = int(diff[0])
        out.append((-1, f"labels: row {j} ({ids[j]}) is {int(labels[j])}, {MANIFEST_FILE} says {int(first[j])}"))
    return out


def check_store(store: FeatureStore) -> list[Problem]:
    """Every problem found in ``store``: corrupt shards first (sorted), then whole-store ones."""
    problems = verify_store(store) + _identity_problems(store)
    return sorted(problems, key=lambda p: (p[0] < 0, p[0]))


def corrupt_shards(problems: list[Problem]) -> list[int]:
    """Shard indices named by ``problems`` (whole-store problems excluded)."""
    return sorted({i for i, _ in problems if i >= 0})


def extract_executable() -> str | None:
    """``avcl-extract`` on ``PATH``, else next to this Python (an un-activated virtualenv)."""
    found = shutil.which("avcl-extract")
    if found:
        return found
    beside = os.path.join(os.path.dirname(sys.executable), "avcl-extract")
    return beside if os.path.exists(beside) else None


@dataclass(frozen=True)
class RepairPlan:
    """The command that re-extracts ``shards`` of the store at ``path``."""

    path: str
    shards: tuple[int, ...]
    command: tuple[str, ...]


def plan_repair(store: FeatureStore, shards: list[int]) -> RepairPlan:
    """Check that the shards can be re-extracted here and build the command; raise RepairError if not."""
    if not shards:
        raise RepairError(f"{store.path}: no corrupt shards to repair")
    if _is_url(store.path) and not store.path.startswith("file://"):
        raise RepairError(f"{store.path}: extraction writes only to local stores; copy the store to a local "
                          "directory, repair it there and copy it back")
    record = store.attrs.get("extract")
    if not isinstance(record, dict):
        raise RepairError(
            f"{store.path}: the store records no extraction settings (attrs['extract']), so its shards cannot be "
            "re-extracted (imported stores: run import-avcil again; otherwise copy the store again from its source)"
        )
    root = record.get("root")
    if not root or not os.path.isdir(root):
        raise RepairError(
            f"{store.path}: the videos are not reachable: dataset root {root!r} (recorded in attrs['extract']) "
            f"does not exist on this machine; mount it there, or copy a good store from whoever built it"
        )
    exe = extract_executable()
    if exe is None:
        raise RepairError(f"{store.path}: avcl-extract is not installed here (pip install avcl)")
    local = store.path.removeprefix("file://")
    return RepairPlan(local, tuple(shards), (exe, "--repair", local, "--shards", ",".join(map(str, shards))))


def run_repair(plan: RepairPlan) -> None:
    """Run the plan's command; raise RepairError naming the store when it fails."""
    done = subprocess.run(list(plan.command), check=False)
    if done.returncode != 0:
        raise RepairError(f"{plan.path}: `{' '.join(plan.command)}` exited with status {done.returncode}")
