"""The extraction runner: manifest rows → decoded clips → frozen encoder → feature store shards.

One store per (dataset, encoder configuration), at
``store_path(cache_dir, dataset, encoder.name, key)`` with ``key = compute_key(key_material(...))``:
the encoder's key material (name, variant, weights hash, preprocessing, layers,
compute precision) + the decoder's identity + the numerics settings of the device
(TF32 on CUDA) + the content hash of the manifest (sample ids, media paths, windows;
:func:`avcl_core.cache.content_hash`). Labels, class names and splits are not in the
key: rerunning with a relabelled manifest reuses the store and only replaces its
``manifest.jsonl``, which is where training reads labels and splits.

Work is done shard by shard (the store's unit of work and of writing):

1. claim a pending shard (an exclusive claim file with a lease kept alive by a
   heartbeat thread; a stale claim is taken over, see :meth:`FeatureStore.claim`), so
   concurrent extractors on any number of hosts never encode the same shard;
2. decode its rows in a pool of worker processes (:func:`extract.decode.decode_row`),
   a bounded number of clips ahead, so decoding overlaps encoding; the processes are
   replaced every :data:`CLIPS_PER_DECODE_WORKER` clips each, so a decoder's leak is bounded;
3. encode ``batch_size`` decoded clips per call, across shard boundaries (frozen
   encoder, ``torch.inference_mode()``; pinned host memory and non-blocking copies on
   CUDA; the encoders autocast themselves on CUDA), cast every stream to float16;
4. hand each complete shard to a writer thread: ``write_shard`` (all rows, then the
   done-marker), which releases the claim — writing overlaps encoding.

Clips that fail to decode are written as zeros with their status code and listed in
the shard's done-marker. A shard with a clip the encoder failed on is not written but
deferred to the next run, up to :data:`~avcl_core.cache.MAX_ATTEMPTS` attempts. An
OSError while writing (a full disk) stops the run with the store and its free space
(:class:`StoreWriteError`); written shards are kept. When no shard is pending the
store is finalized (``status = complete``); if other live writers still hold shards,
the last one finalizes.

A row's features do not depend on which process or run wrote it, up to the encoder's
floating-point dependence on batch composition (batches span shards): with
``batch_size=1`` and fixed ``threads`` a rerun is bit-identical.

Besides the cache's attributes, the store records under ``attrs["extract"]`` how to
redo a shard (:func:`repair`): dataset, absolute root, source manifest path, encoder
name and build options; the manifest used is saved as ``<store>/manifest.jsonl``.
"""
from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import signal
import sys
import time
from collections import deque
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
import zarr

from avcl_core.cache import (MAX_ATTEMPTS, RETRYABLE_CODES, STATUS_ENCODE_ERROR, STATUS_NAMES, STATUS_OK,
                             STATUS_UNREADABLE, FeatureStore, ShardFailure, StoreError, compute_key,
                             content_hash, create_store, open_store, store_path, verify_store)
from avcl_core.manifest import Manifest
from extract.decode import DecodedClip, decode_row, decoder_identity, quiet_decoder_logs
from extract.encoders.base import FeatureEncoder
from extract.masks import MaskError, MaskSpec, mask_spec_for, read_masks, spec_of_store

log = logging.getLogger("avcl.extract")

STORE_MANIFEST = "manifest.jsonl"
MAX_EXAMPLES = 5
#: A run whose failed rows exceed this fraction of the rows it wrote says so loudly.
LOUD_FAILURE_FRACTION = 0.01


class StoreWriteError(StoreError):
    """Writing to the store failed (disk full, I/O error); finished shards are kept."""


def write_error(store: FeatureStore, what: str, err: OSError) -> StoreWriteError:
    """A :class:`StoreWriteError` naming the store, what failed, the OS error and the free space."""
    import errno
    import shutil

    try:
        free = shutil.disk_usage(store.path).free
        space = f"{free / 2**30:.2f} GiB ({free} bytes) free on its filesystem"
    except OSError:
        space = "free space unknown"
    name = errno.errorcode.get(err.errno, "") if err.errno else ""
    cause = "the disk is full" if err.errno in (errno.ENOSPC, errno.EDQUOT) else "an I/O error"
    return StoreWriteError(
        f"{store.path}: {what} failed: {cause} ({name + ': ' if name else ''}{err.strerror or err}); {space}. "
        "Shards already written are kept: free space (or fix the disk) and run the same command again")


# -- results -------------------------------------------------------------------
@dataclass
class ShardResult:
    """What one writer did to one shard."""

    shard: int
    rows: int
    ok: int
    failures: list[ShardFailure]
    seconds: float
    pid: int = field(default_factory=os.getpid)
    deferred: bool = False  # rows failed for a reason retrying may fix: nothing written, the shard stays pending
    lost: bool = False  # the claim was taken over (lease expired) before the write: nothing written


@dataclass
class Summary:
    """Outcome of one extraction run (counts are for rows this run wrote)."""

    store: str
    key: str
    n_rows: int
    n_shards: int
    ok: int = 0
    failed: dict[int, int] = field(default_factory=dict)
    examples: list[ShardFailure] = field(default_factory=list)
    skipped_shards: int = 0
    skipped_rows: int = 0
    shards_written: list[int] = field(default_factory=list)
    seconds: float = 0.0
    already_complete: bool = False
    complete: bool = False
    waiting: list[int] = field(default_factory=list)
    task_errors: list[str] = field(default_factory=list)
    note: str = ""
    relabelled: bool = False
    deferred: list[int] = field(default_factory=list)
    deferred_rows: int = 0
    lost: list[int] = field(default_factory=list)
    store_counts: dict[str, int] = field(default_factory=dict)  # rows per status of a complete store

    @property
    def clips(self) -> int:
        return self.ok + sum(self.failed.values())

    @property
    def n_failed(self) -> int:
        return sum(self.failed.values())

    @property
    def clips_per_s(self) -> float:
        return self.clips / self.seconds if self.seconds > 0 else 0.0

    @property
    def failed_fraction(self) -> float:
        return self.n_failed / self.clips if self.clips else 0.0

    @property
    def all_failed(self) -> bool:
        """Rows were processed and not one of them is ok (nor waits for a retry); for a
        store found complete, not one of its rows is ok."""
        if self.already_complete:
            return sum(self.store_counts.values()) > 0 and not self.store_counts.get("ok")
        return self.clips > 0 and self.ok == 0 and not self.deferred

    def add(self, result: ShardResult) -> None:
        if result.lost:
            self.lost.append(result.shard)
            return
        if result.deferred:
            self.deferred.append(result.shard)
            self.deferred_rows += result.rows
            for f in result.failures:
                if f.code in RETRYABLE_CODES and len(self.examples) < MAX_EXAMPLES:
                    self.examples.append(f)
            return
        self.ok += result.ok
        for f in result.failures:
            self.failed[f.code] = self.failed.get(f.code, 0) + 1
            if len(self.examples) < MAX_EXAMPLES:
                self.examples.append(f)
        self.shards_written.append(result.shard)

    def format(self) -> str:
        relabel = (f"\nlabels/splits: the store's {STORE_MANIFEST} now holds this run's manifest "
                   "(labels, class names or splits changed; the features depend on neither)" if self.relabelled else "")
        if self.already_complete:
            stored = {k: v for k, v in self.store_counts.items() if k != "ok"}
            failed, total = sum(stored.values()), sum(self.store_counts.values())
            warn = (f"\nWARNING: {failed} of {total} rows of this store failed ("
                    + ", ".join(f"{k} {v}" for k, v in sorted(stored.items()))
                    + f"); their reasons: avcl-cache info --failures {self.store}"
                    if total and failed / total > LOUD_FAILURE_FRACTION else "")
            return f"already complete: {self.store} (key {self.key[:12]}…); features reused" + warn + relabel
        codes = ", ".join(f"{STATUS_NAMES.get(c, c)} {n}" for c, n in sorted(self.failed.items()))
        lines = [
            f"store   {self.store}",
            f"key     {self.key}",
            f"status  {'complete' if self.complete else 'building'}"
            + (f" (shards {_ranges(self.waiting)} still held by other writers; the last one finalizes)"
               if self.waiting else ""),
            f"ok      {self.ok}",
            f"failed  {self.n_failed}" + (f" ({codes})" if codes else ""),
            f"skipped {self.skipped_rows} rows ({self.skipped_shards} shards already done)",
            f"speed   {self.clips_per_s:.2f} clips/s ({self.clips} clips, {len(self.shards_written)} shards "
            f"in {self.seconds:.1f} s)",
        ]
        if self.deferred:
            lines.append(f"retry   {self.deferred_rows} rows ({len(self.deferred)} shards: {_ranges(self.deferred)}) "
                         "had rows the encoder failed on (e.g. out of device memory); they were not written and "
                         "are retried by the next run of the same command")
        if self.lost:
            lines.append(f"lost    shards {_ranges(self.lost)}: this writer's claim expired and another writer "
                         "took them over (the heartbeat stopped for longer than the lease); not written here")
        loud = self.failed_fraction > LOUD_FAILURE_FRACTION
        if loud:
            lines.insert(0, f"WARNING: {self.n_failed} of {self.clips} rows failed ({100 * self.failed_fraction:.1f} %): "
                            f"{codes}" + ("; NO row is usable" if self.all_failed else ""))
        for f in self.examples:
            lines.append(f"  e.g. {f.sample_id} [{STATUS_NAMES.get(f.code, f.code)}]: {f.reason}")
        if loud:
            lines.append(f"WARNING: {self.n_failed} of {self.clips} rows failed; every failed row and its reason: "
                         f"avcl-cache info --failures {self.store}")
        for err in self.task_errors:
            lines.append(f"  task error: {err}")
        if self.note:
            lines.append(self.note)
        return "\n".join(lines) + relabel


def _ranges(ix: Iterable[int]) -> str:
    ix = sorted(ix)
    return ",".join(map(str, ix[:20])) + ("…" if len(ix) > 20 else "")


# -- store helpers -------------------------------------------------------------
def device_numerics(device: torch.device) -> dict:
    """Settings of this process that change float32 results on ``device``: on CUDA whether
    matmuls and convolutions run in TF32 (torch's switches, as they are when the run
    starts); nothing on CPU, whose float32 kernels have no such switch."""
    if device.type != "cuda":
        return {}
    return {"tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
            "tf32_cudnn": bool(torch.backends.cudnn.allow_tf32),
            "float32_matmul_precision": torch.get_float32_matmul_precision()}


def key_material(encoder: FeatureEncoder, manifest: Manifest, dataset: str | None = None,
                 masks: MaskSpec | None = None) -> dict:
    """The store's key material: what the features depend on and nothing else.

    The encoder's own material, ``decoder`` (:func:`extract.decode.decoder_identity`),
    ``numerics`` (:func:`device_numerics` of the encoder's device, when not empty) and
    ``content`` (:func:`avcl_core.cache.content_hash`: sample ids, media paths relative
    to the root, windows), and ``masks`` (the ground-truth mask spec, :mod:`extract.masks`)
    when the store carries masks. ``dataset`` names the store's folder and is not part of it.
    """
    material = {**encoder.key_material(), "decoder": decoder_identity(), "content": content_hash(manifest)}
    numerics = device_numerics(encoder_device(encoder))
    if numerics:
        material["numerics"] = numerics
    if masks is not None:
        material["masks"] = masks.as_dict()
    return material


def open_writable(path: str, key: str | None = None) -> FeatureStore:
    """Open an existing store for writing (any status); checks ``key`` when given."""
    try:
        group = zarr.open_group(str(path), mode="r+")
        have = group.attrs.get("key")
    except Exception as e:  # noqa: BLE001 - any unreadable group is reported the same way
        raise StoreError(f"{path}: not a writable feature store ({type(e).__name__}: {e})") from None
    if have is None:
        raise StoreError(f"{path}: a Zarr group without avcl key attributes, not a feature store")
    if key is not None and have != key:
        raise StoreError(f"{path}: store key {str(have)[:12]}… differs from the expected key {key[:12]}…")
    return FeatureStore(str(path), group, writable=True)


def save_manifest(store: FeatureStore, manifest: Manifest) -> bool:
    """Make ``manifest`` the store's ``manifest.jsonl`` (atomic replace); True when this
    changed the labels, class names or splits recorded there before.

    The caller guarantees that ``manifest`` has the store's content (same key), so
    only what the key leaves out can differ; the features are not touched.
    """
    target = Path(store.path) / STORE_MANIFEST
    before = None
    if target.exists():
        try:
            before = Manifest.load(target).rows
        except ValueError:  # damaged: replaced below
            before = []
        if before == manifest.rows:
            return False
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    manifest.save(tmp)
    os.replace(tmp, target)
    return before is not None


def prepare_store(
    manifest: Manifest,
    encoder: FeatureEncoder,
    cache_dir: str | os.PathLike,
    *,
    dataset: str | None = None,
    rows_per_shard: int | None = None,
    info: Mapping | None = None,
    mask_size: int | None = None,
) -> FeatureStore:
    """Create (or reopen to resume) the store for ``manifest`` x ``encoder`` under ``cache_dir``.

    A segmentation dataset's store also holds its ground-truth masks
    (:func:`extract.masks.mask_spec_for`; ``mask_size`` overrides their default side).

    Saves the manifest as ``<store>/manifest.jsonl`` (:func:`save_manifest`; a
    relabelled manifest replaces the one there) and records ``info`` under
    ``attrs["extract"]`` when the store does not have them yet.
    """
    return _prepare(manifest, encoder, cache_dir, dataset=dataset, rows_per_shard=rows_per_shard, info=info,
                    mask_size=mask_size)[0]


def _prepare(manifest, encoder, cache_dir, *, dataset, rows_per_shard, info,
             mask_size=None) -> tuple[FeatureStore, bool]:
    dataset = dataset or manifest.dataset
    masks = mask_spec_for(manifest, encoder.preprocess, dataset, mask_size)
    material = key_material(encoder, manifest, masks=masks)
    key = compute_key(material)
    path = store_path(cache_dir, dataset, encoder.name, key)
    store = create_store(path, key_material=material, manifest=manifest, streams=encoder.streams(),
                         dtype=encoder.stored_dtype, rows_per_shard=rows_per_shard, labels=False,
                         extras=masks.arrays() if masks is not None else None)
    relabelled = save_manifest(store, manifest)
    if store.status != "complete" and "extract" not in store.attrs:
        store.update_attrs({"extract": dict(info or {"dataset": dataset, "encoder": encoder.name})})
    return store, relabelled


# -- decoding pool -------------------------------------------------------------
def _exit_with_parent(parent: int) -> None:
    # A forked worker keeps the pool's pipes open itself, so it never sees its parent die:
    # without this, a SIGKILLed extraction would leave its decoding processes behind for good.
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            os._exit(0)


def _init_decode_worker() -> None:
    # one thread per decoding process: the processes are the parallelism
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    quiet_decoder_logs()
    import threading

    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), name="avcl-parent-watch", daemon=True).start()


def decode_pool(workers: int) -> Executor | None:
    """``workers`` decoding processes (threads inside a daemonic process, e.g. a dask worker,
    which may not start children); None for ``workers == 0`` (decode inline)."""
    if workers <= 0:
        return None
    if mp.current_process().daemon:
        return ThreadPoolExecutor(workers, initializer=quiet_decoder_logs)
    # fork: workers start instantly; they only decode and resize with one torch thread
    return ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"), initializer=_init_decode_worker)


#: Decoding processes are replaced after this many clips each (on average), like
#: ``max_tasks_per_child``: memory a decoding library leaks per clip (decord's audio
#: reader did) cannot grow without bound in a long extraction.
CLIPS_PER_DECODE_WORKER = 32


class _Decoders:
    """Decoding jobs on a pool of ``workers`` processes (None: in this process).

    A decoder that crashes its process (a segfault on a corrupt file) breaks the
    pool: the pool is replaced and every clip whose job was lost is decoded again
    alone in a fresh process; the clip that crashes that one too is
    ``STATUS_UNREADABLE`` and the run goes on.
    """

    def __init__(self, workers: int, root, preprocess, clips_per_worker: int | None = None):
        self.workers, self.root, self.pp = workers, root, preprocess
        self.pool = decode_pool(workers)
        self.recycle_after = max(1, workers) * (clips_per_worker or CLIPS_PER_DECODE_WORKER)
        self.submitted = 0
        self.recycled = 0

    def submit(self, row: dict):
        if self.pool is None:
            return None
        if self.submitted >= self.recycle_after and isinstance(self.pool, ProcessPoolExecutor):
            # fresh processes: whatever a decoding library leaks per clip is bounded by one pool's share;
            # the old pool finishes its queued clips and exits
            old, self.pool = self.pool, decode_pool(self.workers)
            old.shutdown(wait=False)
            self.submitted = 0
            self.recycled += 1
        self.submitted += 1
        try:
            return self.pool.submit(decode_row, row, self.root, self.pp)
        except BrokenProcessPool:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = decode_pool(self.workers)
            return self.pool.submit(decode_row, row, self.root, self.pp)

    def result(self, job, row: dict) -> DecodedClip:
        try:
            if job is None:
                return decode_row(row, self.root, self.pp)
            try:
                return job.result()
            except BrokenProcessPool:
                return self._isolated(row)
        except Exception as e:  # noqa: BLE001 - decode_row reports bad media as a status; this is a bad row
            what = row.get("video") or row.get("frames") or row.get("audio")
            raise ValueError(f"sample {row.get('sample_id')!r} ({Path(self.root) / str(what)}): cannot be decoded "
                             f"({type(e).__name__}: {e}); fix its manifest row and run the same command again; "
                             "finished shards are kept") from e

    def _isolated(self, row: dict) -> DecodedClip:
        with ProcessPoolExecutor(1, mp_context=mp.get_context("fork"), initializer=_init_decode_worker) as one:
            try:
                return one.submit(decode_row, row, self.root, self.pp).result()
            except BrokenProcessPool:
                what = row.get("video") or row.get("frames") or row.get("audio")
                log.warning("decoder crashed on %s (%s)", row.get("sample_id"), what)
                return DecodedClip(None, None, 0.0, STATUS_UNREADABLE,
                                   f"{Path(self.root) / str(what)}: the decoder crashed on this file")

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


@contextlib.contextmanager
def deterministic_torch(device: torch.device, threads: int | None):
    """Run with ``threads`` torch intra-op threads (restored afterwards).

    CPU kernels are deterministic for a fixed thread count and batch composition,
    which is all a bit-identical rerun needs (``torch.use_deterministic_algorithms``
    changes nothing on CPU and costs seconds of imports).
    """
    old_threads = torch.get_num_threads()
    try:
        if threads:
            torch.set_num_threads(int(threads))
        yield
    finally:
        torch.set_num_threads(old_threads)


def encoder_device(encoder: FeatureEncoder) -> torch.device:
    for t in list(encoder.parameters()) + list(encoder.buffers()):
        return t.device
    return torch.device("cpu")


# -- the shard pipeline ---------------------------------------------------------
class _ShardBuffer:
    """Rows of one shard being assembled: zero features, status, valid_len, failures.

    ``unresolved`` counts rows not yet decoded, or decoded and waiting in a batch; the
    shard is complete (ready to write) when it reaches 0.
    """

    def __init__(self, store: FeatureStore, shard: int):
        self.shard = shard
        self.rows = store.shard_rows(shard)
        n = self.rows.stop - self.rows.start
        self.features = {k: np.zeros((n, *s), dtype=np.float16) for k, s in store.streams.items()}
        self.extras = {k: np.zeros((n, *s), dtype=dt) for k, (s, dt) in store.extras.items()}
        self.status = np.zeros(n, dtype=np.uint8)
        self.valid_len = np.zeros(n, dtype=np.float32)
        self.failures: list[ShardFailure] = []
        self.unresolved = n
        self.decoded_ok = 0
        self.start = time.perf_counter()

    def fail(self, j: int, sample_id: str, code: int, reason: str) -> None:
        self.status[j] = code
        self.valid_len[j] = 0.0
        for feats in (*self.features.values(), *self.extras.values()):
            feats[j] = 0
        self.failures.append(ShardFailure(sample_id, int(code), reason))


def _to_device(x: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on ``device``: on CUDA through pinned memory with a non-blocking copy
    (the copy overlaps the host's next work; kernels on the stream wait for it)."""
    t = torch.from_numpy(x)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _encode(encoder: FeatureEncoder, clips: Sequence[DecodedClip], device: torch.device) -> dict[str, np.ndarray]:
    pp = encoder.preprocess
    frames = audio = None
    if pp.num_frames:
        frames = _to_device(np.stack([c.frames for c in clips]), device)
    if pp.num_samples:
        audio = _to_device(np.stack([c.audio for c in clips]), device)
    with torch.inference_mode():
        out = encoder.encode(frames, audio)
    streams = encoder.streams()
    result = {}
    for name, shape in streams.items():
        if name not in out:
            raise StoreError(f"encoder {encoder.name}: encode() returned no {name!r} stream (got {sorted(out)})")
        t = out[name]
        if tuple(t.shape) != (len(clips), *shape):
            raise StoreError(f"encoder {encoder.name}: stream {name!r} has shape {tuple(t.shape)}, "
                             f"streams() declares {(len(clips), *shape)}")
        result[name] = t.detach().to(torch.float16).cpu().numpy()
    return result


#: A decoded clip waiting for the encoder: (its shard's buffer, row in the shard, sample id, clip).
_Item = tuple[_ShardBuffer, int, str, DecodedClip]


def _encode_batch(items: list[_Item], encoder: FeatureEncoder, device: torch.device) -> None:
    """Encode ``items`` (possibly of several shards) into their buffers; a batch that fails
    is retried clip by clip (e.g. out of memory), a clip that fails alone is an encode error."""
    if not items:
        return
    try:
        outs = [(items, _encode(encoder, [it[3] for it in items], device))]
    except StoreError:
        raise
    except Exception:  # noqa: BLE001 - retry clip by clip to isolate a bad clip
        outs = []
        for item in items:
            try:
                outs.append(([item], _encode(encoder, [item[3]], device)))
            except StoreError:
                raise
            except Exception as e:  # noqa: BLE001
                reason = f"encoder {encoder.name}: {type(e).__name__}: {e}"[:300]
                item[0].fail(item[1], item[2], STATUS_ENCODE_ERROR, reason)
    for group, feats in outs:
        for k, (buf, j, _, clip) in enumerate(group):
            for name, arr in feats.items():
                buf.features[name][j] = arr[k]
            buf.status[j] = STATUS_OK
            buf.valid_len[j] = clip.valid_len
    for buf, *_ in items:
        buf.unresolved -= 1


def _with_masks(buf: _ShardBuffer, j: int, row: dict, root, spec: MaskSpec, pp, clip: DecodedClip) -> DecodedClip:
    """Put row ``j``'s ground-truth masks into the shard buffer; an unreadable mask fails the row."""
    try:
        buf.extras["masks"][j], buf.extras["mask_valid"][j] = read_masks(row, root, spec, pp)
    except MaskError as e:
        return DecodedClip(None, None, 0.0, STATUS_UNREADABLE, str(e))
    return clip


def clear_shard(store: FeatureStore, i: int) -> None:
    """Delete shard ``i``'s stored objects of every row array.

    Zarr reads an existing shard object before overwriting it, so a corrupt
    leftover (a repair, a damaged disk) would make the rewrite fail; the shard is
    being redone, so whatever is there is garbage."""
    for name in [*store.streams, *store.extras, "status", "valid_len"]:
        arr = store.group[name]
        key = arr.metadata.encode_chunk_key((i,) + (0,) * (arr.ndim - 1))
        with contextlib.suppress(FileNotFoundError):
            (Path(store.path) / name / key).unlink()


def _check_shard(store: FeatureStore, buf: _ShardBuffer) -> None:
    """Stop the run when the encoder failed on every decodable clip of a shard: a broken
    encoder or device, not bad clips; nothing of that shard is written."""
    if buf.decoded_ok and not int((buf.status == STATUS_OK).sum()):
        first = next(f.reason for f in buf.failures if f.code == STATUS_ENCODE_ERROR)
        raise RuntimeError(f"{store.path}: the encoder failed on every decodable clip of shard {buf.shard} "
                           f"({buf.decoded_ok} clips); first error: {first}")


def _write_shard(store: FeatureStore, buf: _ShardBuffer) -> ShardResult:
    """Write a complete shard, or defer it for a retry (runs on the writer thread).

    A shard with rows the encoder failed on (:data:`~avcl_core.cache.RETRYABLE_CODES`)
    is written only once it has been tried :data:`~avcl_core.cache.MAX_ATTEMPTS` times;
    before that nothing is written and its retry marker keeps it pending. A shard whose
    claim another writer took over (this writer's lease expired) is left to that writer.
    """
    ok = int((buf.status == STATUS_OK).sum())
    if not store.holds(buf.shard):
        log.warning("shard %d: claim taken over by another writer (lease expired); not written here", buf.shard)
        return ShardResult(buf.shard, len(buf.status), 0, [], time.perf_counter() - buf.start, lost=True)
    retry = [f for f in buf.failures if f.code in RETRYABLE_CODES]
    try:
        if retry and store.attempts(buf.shard) + 1 < MAX_ATTEMPTS:
            marker = store.defer_shard(buf.shard, buf.failures)
            log.warning("shard %d: %d rows failed to encode (attempt %d of %d; e.g. %s: %s); left for a retry",
                        buf.shard, len(retry), marker["attempts"], MAX_ATTEMPTS, retry[0].sample_id, retry[0].reason)
            return ShardResult(buf.shard, len(buf.status), 0, list(buf.failures), time.perf_counter() - buf.start,
                               deferred=True)
        clear_shard(store, buf.shard)
        store.write_shard(buf.shard, buf.features, buf.status, buf.valid_len, buf.failures, extras=buf.extras)
    except OSError as e:
        raise write_error(store, f"writing shard {buf.shard}", e) from e
    seconds = time.perf_counter() - buf.start
    log.info("shard %d written by pid %d: %d ok, %d failed (%.1f s)", buf.shard, os.getpid(), ok,
             len(buf.failures), seconds)
    return ShardResult(buf.shard, len(buf.status), ok, list(buf.failures), seconds)


class _Writer:
    """Writes complete shards on one background thread, so that writing (compression,
    disk) overlaps decoding and encoding. At most ``depth`` shards wait to be written
    (bounded memory); the first write error is raised in the caller's thread."""

    def __init__(self, store: FeatureStore, depth: int = 2):
        self.store, self.depth = store, depth
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="avcl-writer")
        self.queue: deque = deque()

    def submit(self, buf: _ShardBuffer) -> list[ShardResult]:
        self.queue.append(self.pool.submit(_write_shard, self.store, buf))
        return self.collect(block=len(self.queue) > self.depth)

    def collect(self, block: bool = False, all_: bool = False) -> list[ShardResult]:
        """Results of finished writes, in order; waits for the oldest when ``block``, for all when ``all_``."""
        out = []
        while self.queue and (all_ or block or self.queue[0].done()):
            out.append(self.queue.popleft().result())
            block = False
        return out

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def run_shards(
    store: FeatureStore,
    rows: Mapping[int, dict] | Sequence[dict],
    root: str | os.PathLike,
    encoder: FeatureEncoder,
    *,
    batch_size: int = 8,
    workers: int = 2,
    shards: Iterable[int] | None = None,
    on_row: Callable[[int], None] | None = None,
) -> list[ShardResult]:
    """Claim, decode, encode and write shards of ``store`` until none is left to claim.

    ``rows[r]`` is manifest row ``r`` (a Manifest, list, or dict of the rows needed);
    ``shards`` restricts the work to those shards. Three stages overlap: decoding runs
    ``workers`` processes ahead of the encoder (a window of ``max(2 * batch_size,
    4 * workers)`` clips), the encoder takes ``batch_size`` decoded clips at a time
    across shard boundaries (so a small shard does not cap the batch), and a writer
    thread writes each shard as soon as all its rows are resolved. Claims this call
    still holds are released if it fails.

    A row's features do not depend on which process or run wrote it, up to the
    encoder's floating-point dependence on batch composition: for bit-identical
    reruns use ``batch_size=1`` (or a batch-invariant encoder) and fixed ``threads``.
    """
    device = encoder_device(encoder)
    pp = encoder.preprocess
    allowed = None if shards is None else set(int(i) for i in shards)
    held: set[int] = set()
    tried: set[int] = set()  # complete (written, deferred or lost) in this call: a deferred shard waits for the next run
    results: list[ShardResult] = []
    window = max(2 * batch_size, 4 * workers, 1)
    decoders = _Decoders(workers, root, pp)
    mask_spec = spec_of_store(store)
    writer = _Writer(store)

    def claimed() -> Iterator[int]:
        while True:
            took = False
            for i in store.pending_shards():
                if i in held or i in tried or (allowed is not None and i not in allowed):
                    continue
                if store.claim(i):
                    held.add(i)
                    took = True
                    yield i
            if not took:  # a full pass claimed nothing: the rest is done or held by live writers
                return

    def decoded() -> Iterator[tuple[int, int, DecodedClip]]:
        queue: deque = deque()
        for i in claimed():
            rng = store.shard_rows(i)
            for r in range(rng.start, rng.stop):
                queue.append((i, r, decoders.submit(rows[r])))
                while len(queue) > window:
                    yield _resolve(queue.popleft())
        while queue:
            yield _resolve(queue.popleft())

    def _resolve(item):
        i, r, job = item
        return i, r, decoders.result(job, rows[r])

    def finished(done: list[ShardResult]) -> None:
        for res in done:
            results.append(res)
            held.discard(res.shard)

    open_bufs: dict[int, _ShardBuffer] = {}
    batch: list[_Item] = []

    def complete_ready() -> None:
        for i in [i for i, b in open_bufs.items() if b.unresolved == 0]:
            buf = open_bufs.pop(i)
            _check_shard(store, buf)
            tried.add(i)
            finished(writer.submit(buf))

    try:
        for i, r, clip in decoded():
            buf = open_bufs.get(i)
            if buf is None:
                buf = open_bufs[i] = _ShardBuffer(store, i)
            j = r - buf.rows.start
            sid = rows[r]["sample_id"]
            if clip.ok and mask_spec is not None:
                clip = _with_masks(buf, j, rows[r], root, mask_spec, pp, clip)
            if clip.ok:
                buf.decoded_ok += 1
                batch.append((buf, j, sid, clip))
                if len(batch) >= batch_size:
                    _encode_batch(batch, encoder, device)
                    batch = []
            else:
                buf.fail(j, sid, clip.status, clip.reason)
                buf.unresolved -= 1
            complete_ready()
            finished(writer.collect())
            if on_row is not None:
                on_row(1)
        _encode_batch(batch, encoder, device)
        batch = []
        complete_ready()
        finished(writer.collect(all_=True))
    except Exception:
        # a bad row stopped the run: first keep the work done, i.e. encode the clips already
        # decoded and write the shards they complete (not after a write error: the disk is full)
        if not isinstance(sys.exc_info()[1], StoreError):
            with contextlib.suppress(Exception):
                _encode_batch(batch, encoder, device)
                complete_ready()
                writer.collect(all_=True)
        raise
    finally:
        decoders.close()
        writer.close()  # shards already handed over are written (or fail) before claims are released
        for i in held:  # a failure mid-shard: let another writer (or a rerun) take it
            store.release(i)
    return results


# -- the run -------------------------------------------------------------------
def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    tqdm.monitor_interval = 0  # no monitor thread: decoding workers are forked
    return tqdm(total=total, desc=desc, unit="clip", disable=not enabled, dynamic_ncols=True, leave=False)


def _conclude(store: FeatureStore, summary: Summary) -> Summary:
    """Finalize when no shard is pending; otherwise say who still holds what."""
    pending = store.pending_shards()
    if not pending:
        summary.complete = store.finalize()
        return summary
    claims = store.claims()
    summary.waiting = [i for i in pending if i in claims and claims[i][2] == "live"]
    rest = len(pending) - len(summary.waiting)
    if rest:
        summary.note = (f"{rest} shards are unfinished and not held by a live writer; "
                        "run the same command again to finish them")
    return summary


def extract(
    manifest: Manifest,
    root: str | os.PathLike,
    encoder: FeatureEncoder,
    cache_dir: str | os.PathLike,
    batch_size: int = 8,
    workers: int = 2,
    device: str | torch.device | None = None,
    scheduler: str | None = None,
    progress: bool = True,
    *,
    dataset: str | None = None,
    rows_per_shard: int | None = None,
    threads: int | None = None,
    encoder_factory: Callable[[], FeatureEncoder] | None = None,
    info: Mapping | None = None,
    mask_size: int | None = None,
) -> Summary:
    """Extract ``encoder`` features of every clip in ``manifest`` into its store under ``cache_dir``.

    ``root``: directory the manifest's paths are relative to. ``device``: move the
    encoder there first (None: where it is). ``workers``: decoding processes (0 =
    decode in this process, no overlap). ``threads``: torch intra-op threads while
    encoding (fix it for bit-identical reruns on CPU). ``scheduler``: a dask scheduler
    address or ``local:N`` (see :mod:`extract.distributed`); its workers rebuild the
    encoder with ``encoder_factory`` (a picklable zero-argument callable) or receive
    this one. ``rows_per_shard``: override the store's shard size (new stores only).
    ``info``: what :func:`repair` needs, recorded under ``attrs["extract"]``.
    ``mask_size``: side of the stored ground-truth masks of a segmentation dataset
    (default: :func:`extract.masks.default_mask_size`).

    A complete store is left alone (``Summary.already_complete``); an interrupted one
    is resumed (done shards are skipped).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if device is not None:
        encoder.to(torch.device(device))
    encoder.eval()
    t0 = time.perf_counter()
    dataset = dataset or manifest.dataset
    info = dict(info or {"dataset": dataset, "root": str(Path(root).resolve()), "encoder": encoder.name})
    store, relabelled = _prepare(manifest, encoder, cache_dir, dataset=dataset, rows_per_shard=rows_per_shard,
                                 info=info, mask_size=mask_size)
    summary = _run(store, manifest, root, encoder, batch_size=batch_size, workers=workers, scheduler=scheduler,
                   progress=progress, threads=threads, encoder_factory=encoder_factory, t0=t0)
    summary.relabelled = relabelled
    return summary


def _run(store, manifest, root, encoder, *, batch_size, workers, scheduler, progress, threads, encoder_factory, t0,
         shards: Sequence[int] | None = None) -> Summary:
    summary = Summary(store=store.path, key=store.key, n_rows=store.n_rows, n_shards=store.n_shards)
    if store.status == "complete":
        summary.already_complete = summary.complete = True
        summary.store_counts = dict(store.attrs.get("counts") or {})
        return summary
    allowed = None if shards is None else set(shards)
    all_pending = store.pending_shards()
    pending = [i for i in all_pending if allowed is None or i in allowed]
    if allowed is None:
        done = set(range(store.n_shards)) - set(all_pending)
        summary.skipped_shards = len(done)
        summary.skipped_rows = sum(store.shard_rows(i).stop - store.shard_rows(i).start for i in done)
    total = sum(store.shard_rows(i).stop - store.shard_rows(i).start for i in pending)
    device = encoder_device(encoder)
    bar = _progress(total, f"{store.dataset}/{encoder.name}", progress)
    try:
        if scheduler:
            from extract.distributed import run_on_cluster

            results, errors = run_on_cluster(
                scheduler, store, manifest, root, encoder, pending, batch_size=batch_size, workers=workers,
                threads=threads, encoder_factory=encoder_factory, on_rows=bar.update)
            summary.task_errors = errors
        else:
            with deterministic_torch(device, threads):
                results = run_shards(store, manifest, root, encoder, batch_size=batch_size, workers=workers,
                                     shards=allowed, on_row=bar.update)
    finally:
        bar.close()
    for res in sorted(results, key=lambda r: r.shard):
        summary.add(res)
    summary.seconds = time.perf_counter() - t0
    return _conclude(store, summary)


# -- repair --------------------------------------------------------------------
def reopen_for_repair(path: str, shards: Sequence[int]) -> FeatureStore:
    """Open a (complete) store for rewriting ``shards``: status back to ``building``,
    their done-markers removed. A crash afterwards leaves a building store that the
    same repair (or the original extract command) finishes."""
    store = open_writable(path)
    bad = [i for i in shards if not 0 <= i < store.n_shards]
    if bad:
        raise StoreError(f"{path}: shards {bad} out of range 0..{store.n_shards - 1}")
    store.update_attrs({"status": "building"})
    for i in shards:
        # a repair is one explicit retry: rows that fail to encode again are final (not deferred)
        store.defer_shard(i, [], attempts=MAX_ATTEMPTS - 1, release=False)
        with contextlib.suppress(FileNotFoundError):
            Path(store._marker(i, "done.json")).unlink()
    return store


def encoder_from_info(info: Mapping, device: str | None = None) -> FeatureEncoder:
    """Rebuild the encoder recorded in a store's ``attrs["extract"]``."""
    from extract.encoders import build_encoder

    name = info.get("encoder")
    options = dict(info.get("encoder_options") or {})
    if not name or "encoder_options" not in info:
        raise StoreError("the store does not record how its encoder was built (attrs['extract']['encoder_options']); "
                         "re-extract it with avcl-extract")
    if device is not None:
        options = with_device(name, options, device)
    enc = build_encoder(name, **options)
    if device is not None:
        enc.to(torch.device(device))
    return enc


def with_device(name: str, options: Mapping, device: str) -> dict:
    """``options`` plus ``device`` when encoder ``name``'s ``build`` takes one."""
    import inspect

    from extract.encoders import encoder_module

    options = dict(options)
    if "device" in inspect.signature(encoder_module(name).build).parameters:
        options["device"] = device
    return options


def repair(
    path: str,
    shards: Sequence[int] | None = None,
    *,
    root: str | os.PathLike | None = None,
    device: str | None = None,
    batch_size: int = 8,
    workers: int = 2,
    scheduler: str | None = None,
    progress: bool = True,
    threads: int | None = None,
) -> Summary:
    """Re-extract ``shards`` of the store at ``path`` (default: the shards :func:`verify_store`
    finds corrupt and those with rows the encoder failed on) with the encoder, manifest and
    root recorded in the store, then finalize.

    The rebuilt encoder must give the store's key (same weights file, options and
    device precision), else nothing is touched.
    """
    t0 = time.perf_counter()
    ro = open_store(path, allow_incomplete=True)
    info = ro.attrs.get("extract") or {}
    if shards is None:
        bad = verify_store(ro)
        if any(i < 0 for i, _ in bad):
            raise StoreError(f"{path}: {[r for i, r in bad if i < 0]}: row metadata is corrupt; re-extract the store")
        shards = sorted({i for i, _ in bad} | set(ro.retryable_shards()))
    shards = sorted(set(int(i) for i in shards))
    summary = Summary(store=ro.path, key=ro.key, n_rows=ro.n_rows, n_shards=ro.n_shards)
    if not shards:
        summary.complete = ro.status == "complete"
        summary.note = "nothing to repair: every shard verifies and no row failed to encode"
        return summary
    manifest_file = Path(path) / STORE_MANIFEST
    if not manifest_file.exists():
        raise StoreError(f"{path}: no {STORE_MANIFEST} in the store; cannot tell which clips its rows are")
    manifest = Manifest.load(manifest_file)
    if content_hash(manifest) != ro.key_material.get("content"):
        raise StoreError(f"{manifest_file}: its media and windows differ from the store's key material")
    root = root if root is not None else info.get("root")
    if not root:
        raise StoreError(f"{path}: the store does not record the dataset root; pass root")
    encoder = encoder_from_info(info, device)
    material = key_material(encoder, manifest, masks=spec_of_store(ro))
    if compute_key(material) != ro.key:
        diff = sorted(k for k in set(material) | set(ro.key_material) if material.get(k) != ro.key_material.get(k))
        raise StoreError(f"{path}: the encoder rebuilt from the recorded options gives another key "
                         f"(differs in {', '.join(diff)}); the weights file or options changed")
    store = reopen_for_repair(path, shards)
    factory = None
    if scheduler:
        import functools

        from extract.encoders import build_encoder

        opts = dict(info["encoder_options"])
        if device is not None:
            opts = with_device(info["encoder"], opts, device)
        factory = functools.partial(build_encoder, info["encoder"], **opts)
    return _run(store, manifest, root, encoder, batch_size=batch_size, workers=workers, scheduler=scheduler,
                progress=progress, threads=threads, encoder_factory=factory, t0=t0, shards=shards)
