"""FeatureSet: the feature streams of one or more complete stores, in memory, served by index.

Training never loads samples one by one: :meth:`FeatureSet.from_stores` reads
the needed streams of each store in blocks of shard size, keeps the rows that
are usable and holds them in the store's dtype (float16: half the memory of
float32) on the training device. A batch is then an index tensor ``idx`` (B,)
and :meth:`FeatureSet.batch` gathers ``{'audio': (B, Ta, Da), 'visual': (B, Tv, Dv)}``
with one ``index_select`` per stream, widened to float32 per batch (float16
values widen exactly, so results equal those of a float32-resident set).

Features larger than memory: when the needed streams exceed ``memory_budget``
bytes, nothing is loaded up front. The usable rows are cut into *blocks* of
``block_rows`` consecutive FeatureSet indices (the primary store's rows per
inner chunk, its unit of decoding: a block is read whole, so smaller blocks
waste less on rows an epoch does not use and let more of them stay resident
between epochs; blocks align with the chunks while every row is usable), and
:meth:`FeatureSet.batch` reads the blocks it needs, keeping at most ``budget //
block bytes`` of them (least recently used out) while a background thread reads
ahead the blocks the epoch will use next. Random batches over the whole set
would read every block for every batch, so a streamed set shuffles within
windows (:meth:`FeatureSet.epoch_order`): the blocks are shuffled, taken
``shuffle_blocks`` at a time, and the rows of each window are shuffled; the
window is half the blocks that fit in the budget (the other half is the read
ahead). The same order is used by an in-memory set given the same
``shuffle_blocks``, so streamed and in-memory training give identical results;
with ``shuffle_blocks=None`` (the default whenever the set fits) an epoch is a
plain permutation of all rows. Rows pinned with :meth:`FeatureSet.pin` (the
exemplar memory) stay resident outside the budget.

Index space: FeatureSet index ``i`` is the ``i``-th usable row of the *primary*
store (the first store given), in store row order. ``rows[i]`` is that row's
number in the primary store (= its row in the store's manifest).

Several stores are matched by ``sample_id``, e.g. audio from one encoder's store
and visual from another's. A row is usable when its status is ok
(:data:`avcl_core.cache.STATUS_OK`) in every store that provides a stream, and
every such store has the sample; the rest are dropped with a logged count.

Stream shapes are normalised to three axes (N, T, D): a clip-level stream
(N, D) becomes (N, 1, D); a dense stream (N, T, P, D) becomes (N, T*P, D)
(tokens ordered time-major).

Labels and splits come from the manifest saved with the primary store,
``<store>/manifest.jsonl`` (row ``i`` of the manifest is row ``i`` of the
store), never from the feature arrays: a store is keyed by its rows' media and
windows only, and rerunning ``avcl-extract`` with a relabelled manifest updates
that file without touching the features. A store without it may carry
``split`` and ``labels`` arrays instead (AV-CIL imports).
"""
from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch

from avcl_core.cache import STATUS_NAMES, STATUS_OK, FeatureStore, StoreError, first_labels, open_store
from avcl_core.manifest import Manifest, ManifestError

log = logging.getLogger("avcl.train")

DEFAULT_STREAMS = {"audio": "audio", "visual": "visual"}
MANIFEST_FILE = "manifest.jsonl"


class FeatureSetError(ValueError):
    """Stores that cannot be combined into a FeatureSet; the message names the store and what to do."""


@dataclass
class StoreInfo:
    """Where a FeatureSet's streams came from (recorded in run configs)."""

    path: str
    key: str
    encoder: str
    dataset: str
    streams: dict[str, str]  # FeatureSet stream name -> stream name in the store

    def as_dict(self) -> dict:
        return {"path": self.path, "key": self.key, "encoder": self.encoder, "dataset": self.dataset,
                "streams": dict(self.streams)}


def _normalise_shape(x: np.ndarray, name: str, path: str) -> np.ndarray:
    if x.ndim == 2:
        return x[:, None, :]
    if x.ndim == 3:
        return x
    if x.ndim == 4:
        return x.reshape(x.shape[0], x.shape[1] * x.shape[2], x.shape[3])
    raise FeatureSetError(f"{path}: stream {name!r} has shape {x.shape}; expected (N, D), (N, T, D) or (N, T, P, D)")


def _normalised_dims(shape: tuple[int, ...], name: str, path: str) -> tuple[int, int]:
    """(T, D) of one sample of a stored stream of array shape ``shape`` (N, ...)."""
    if len(shape) == 2:
        return 1, int(shape[1])
    if len(shape) == 3:
        return int(shape[1]), int(shape[2])
    if len(shape) == 4:
        return int(shape[1] * shape[2]), int(shape[3])
    raise FeatureSetError(f"{path}: stream {name!r} has shape {shape}; expected (N, D), (N, T, D) or (N, T, P, D)")


def _resident_dtype(dtype) -> torch.dtype:
    """float16 and float32 streams stay as stored; anything else becomes float32."""
    return torch.float16 if np.dtype(dtype) == np.float16 else torch.float32


def parse_size(text: str | int | float | None) -> int | None:
    """Bytes of a size such as ``'8G'``, ``'512MB'``, ``'1.5GiB'``, ``'1000000'`` (None stays None).

    K, M, G, T are powers of 1024 (with or without a trailing ``B``/``iB``).
    """
    if text is None or isinstance(text, (int, float)):
        return None if text is None else int(text)
    t = str(text).strip().upper().replace("IB", "").rstrip("B")
    mult = 1
    if t and t[-1] in "KMGT":
        mult = 1024 ** ("KMGT".index(t[-1]) + 1)
        t = t[:-1]
    try:
        value = float(t)
    except ValueError:
        raise FeatureSetError(f"feature memory {text!r}: expected a size like 8G, 512M or a number of bytes") from None
    if value <= 0:
        raise FeatureSetError(f"feature memory {text!r} must be positive")
    return int(value * mult)


def available_memory(device: str | torch.device = "cpu") -> int:
    """Free memory of ``device`` in bytes: CUDA's free memory, else the host's MemAvailable."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def default_memory_budget(device: str | torch.device = "cpu") -> int:
    """Half the free memory of the training device (the rest is for the model, its activations and the OS)."""
    return available_memory(device) // 2


@dataclass
class _StreamSource:
    """Where one FeatureSet stream's rows are in a store: FeatureSet index i -> ``store_rows[i]``."""

    store: FeatureStore
    name: str
    store_rows: np.ndarray
    dims: tuple[int, int]
    dtype: torch.dtype

    def read(self, lo: int, hi: int) -> torch.Tensor:
        """Rows of FeatureSet indices ``lo..hi-1`` as a (hi-lo, T, D) tensor of the resident dtype."""
        rows = self.store_rows[lo:hi]
        arr = self.store.group[self.name]
        r0, r1 = int(rows.min()), int(rows.max()) + 1
        if r1 - r0 == rows.size and bool(np.all(np.diff(rows) == 1)):
            data = arr[r0:r1]  # consecutive rows (the primary store, all usable): no gather copy
        elif r1 - r0 <= 2 * rows.size:  # nearly contiguous: one span read
            data = arr[r0:r1][rows - r0]
        else:  # rows scattered over another store
            data = arr.get_orthogonal_selection((rows,))
        data = _normalise_shape(np.asarray(data), self.name, self.store.path)
        return torch.from_numpy(np.ascontiguousarray(data, dtype=np.float16 if self.dtype == torch.float16
                                                     else np.float32))


class BlockStreamer:
    """Blocks of rows read from the stores on demand, at most ``capacity`` resident, read ahead in a thread.

    Block ``b`` holds FeatureSet indices ``[b * block_rows, (b + 1) * block_rows)`` of
    every stream. :meth:`get` returns a block (waiting for its read when it is
    in flight); :meth:`prefetch` starts reads in the background thread. The
    least recently used block is dropped when more than ``capacity`` are held.
    """

    def __init__(self, sources: dict[str, _StreamSource], n: int, block_rows: int, capacity: int) -> None:
        self.sources, self.n, self.block_rows = sources, int(n), int(block_rows)
        self.capacity = max(2, int(capacity))
        self.n_blocks = -(-self.n // self.block_rows)
        self._blocks: OrderedDict[int, Future] = OrderedDict()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="avcl-prefetch")
        self.reads = 0  # blocks read so far (a measure of I/O, for tests and benchmarks)
        self.max_resident = 0

    def block_bytes(self) -> int:
        return self.block_rows * sum(s.dims[0] * s.dims[1] * (2 if s.dtype == torch.float16 else 4)
                                     for s in self.sources.values())

    def _read(self, b: int) -> dict[str, torch.Tensor]:
        lo, hi = b * self.block_rows, min(self.n, (b + 1) * self.block_rows)
        out = {k: s.read(lo, hi) for k, s in self.sources.items()}
        self.reads += 1
        return out

    def _make_room(self, protect) -> bool:
        """Drop least recently used, fully read blocks outside ``protect`` until one more fits."""
        while len(self._blocks) >= self.capacity:
            victim = next((k for k, f in self._blocks.items() if f.done() and k not in protect), None)
            if victim is None:
                return False
            del self._blocks[victim]
        return True

    def get(self, b: int) -> dict[str, torch.Tensor]:
        """Block ``b`` ({stream: (rows, T, D)}), read now unless it is resident or being read ahead."""
        with self._lock:
            fut = self._blocks.get(b)
            if fut is None:
                self._make_room(())
                fut = Future()
                fut.set_result(self._read(b))
                self._blocks[b] = fut
            self._blocks.move_to_end(b)
            self.max_resident = max(self.max_resident, len(self._blocks))
        return fut.result()

    def prefetch(self, blocks, protect=()) -> None:
        """Start background reads of ``blocks`` (in order) while there is room; blocks in ``protect``
        (the ones the current window still uses) are not dropped to make that room."""
        keep = set(protect) | {int(b) for b in blocks}
        with self._lock:
            for b in blocks:
                b = int(b)
                if b in self._blocks:
                    continue
                if not self._make_room(keep):
                    break
                self._blocks[b] = self._pool.submit(self._read, b)
                self.max_resident = max(self.max_resident, len(self._blocks))

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def _shard_rows(store: FeatureStore) -> int:
    """Rows per shard of ``store`` (all its rows when it does not say)."""
    try:
        return int(store.rows_per_shard)
    except (KeyError, TypeError):
        return max(1, store.n_rows)


def _chunk_rows(store: FeatureStore) -> int:
    """Rows per inner chunk of ``store`` (the unit of decoding; the shard when the store does not say)."""
    return int(store.attrs.get("rows_per_chunk") or _shard_rows(store))


def default_block_rows(primary: FeatureStore, n: int) -> int:
    """Rows per streamed block of a set of ``n`` rows whose primary store is ``primary``: its rows per
    inner chunk (at most ``n``, at least 1)."""
    return max(1, min(n, _chunk_rows(primary)))


def _join(path: str, name: str) -> str:
    return f"{path.rstrip('/')}/{name}"


def load_store_manifest(store: FeatureStore) -> Manifest | None:
    """The manifest stored next to the arrays (``<store>/manifest.jsonl``), or None.

    Raises :class:`FeatureSetError` when it exists but does not list the store's
    samples in the store's row order.
    """
    path = _join(store.path, MANIFEST_FILE)
    if "://" in store.path:
        import fsspec

        try:
            with fsspec.open(path, "r", encoding="utf-8") as f:
                rows = [json.loads(line) for line in f if line.strip()]
        except FileNotFoundError:
            return None
        manifest = Manifest.from_rows(rows, source=path)
    else:
        if not os.path.isfile(path):
            return None
        manifest = Manifest.load(path)
    if manifest.sample_ids != store.sample_ids:
        raise FeatureSetError(
            f"{path}: its {len(manifest)} rows do not list the store's {store.n_rows} sample ids in row order; "
            "it must be the manifest the store was extracted from"
        )
    return manifest


def _manifest_from_arrays(store: FeatureStore) -> Manifest:
    """A minimal manifest rebuilt from the store's own arrays when it has a ``split`` array."""
    if "split" not in store.group:
        raise FeatureSetError(
            f"{store.path}: no split information: neither {MANIFEST_FILE} nor a 'split' array is in the store. "
            f"Copy the manifest used for extraction to {_join(store.path, MANIFEST_FILE)}"
        )
    split = [str(s) for s in store.read("split")]
    labels = store.labels()
    classes = list(store.attrs.get("classes") or [])
    rows = []
    for sid, sp, lab in zip(store.sample_ids, split, labels):
        name = classes[int(lab)] if 0 <= int(lab) < len(classes) else f"class_{int(lab)}"
        rows.append({"sample_id": sid, "dataset": store.dataset or "unknown", "split": sp, "label": int(lab),
                     "class_name": name, "video": sid})
    try:
        return Manifest.from_rows(rows, source=f"{store.path} (split array)")
    except ManifestError as e:
        raise FeatureSetError(str(e)) from None


@dataclass
class FeatureSet:
    """Feature streams of the usable rows of one or more stores, resident or streamed.

    Attributes (N = number of usable rows):

    * ``streams``: name -> tensor (N, T, D) in the store's dtype (float16 for
      avcl stores) on ``device``; empty when the set is streamed (``streamer``);
    * ``class_ids``: int64 (N,) manifest class id of each row (first label of multi-label rows);
    * ``rows``: int64 (N,) row number in the primary store / its manifest;
    * ``sample_ids``: list of N str;
    * ``manifest``: the primary store's full manifest (all rows, usable or not);
    * ``sources``: one :class:`StoreInfo` per store used;
    * ``streamer``: the :class:`BlockStreamer` of a streamed set, else None;
    * ``shuffle_blocks``: blocks per shuffling window of :meth:`epoch_order`
      (None: one permutation of all rows); ``block_rows``: rows per block.
    """

    streams: dict[str, torch.Tensor]
    class_ids: np.ndarray
    rows: np.ndarray
    sample_ids: list[str]
    manifest: Manifest
    sources: list[StoreInfo]
    excluded: dict[str, int] = field(default_factory=dict)
    streamer: BlockStreamer | None = None
    shuffle_blocks: int | None = None
    block_rows: int = 0
    stream_dims: dict[str, tuple[int, int]] = field(default_factory=dict)
    stream_device: torch.device | None = None

    def __post_init__(self) -> None:
        self._row_to_index = np.full(len(self.manifest), -1, dtype=np.int64)
        self._row_to_index[self.rows] = np.arange(len(self.rows))
        if not self.stream_dims:
            self.stream_dims = {k: (int(v.shape[1]), int(v.shape[2])) for k, v in self.streams.items()}
        if not self.block_rows:
            self.block_rows = max(1, len(self.rows))
        self._pinned: dict[str, torch.Tensor] = {}
        self._pin_pos = np.full(len(self.rows), -1, dtype=np.int64) if self.streamer is not None else None
        self._windows: list[np.ndarray] = []
        self._window_of_block: dict[int, int] = {}

    def __len__(self) -> int:
        return int(self.rows.size)

    @property
    def streamed(self) -> bool:
        return self.streamer is not None

    @property
    def device(self) -> torch.device:
        if self.stream_device is not None:
            return self.stream_device
        return next(iter(self.streams.values())).device

    @property
    def dims(self) -> dict[str, tuple[int, int]]:
        """Per stream (T, D): tokens and channels of one sample."""
        return dict(self.stream_dims)

    def split_of(self) -> np.ndarray:
        """Manifest split of each row (N,) as str."""
        return np.array([self.manifest.rows[r]["split"] for r in self.rows])

    def indices_of_rows(self, manifest_rows: np.ndarray) -> np.ndarray:
        """FeatureSet indices of primary-store/manifest rows, unusable rows dropped (order kept)."""
        idx = self._row_to_index[np.asarray(manifest_rows, dtype=np.int64)]
        return idx[idx >= 0]

    def batch(self, idx: torch.Tensor, names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """``{stream: features[idx]}`` as float32 (B, T, D) for an index tensor ``idx`` (B,) on this set's device."""
        names = list(self.stream_dims) if names is None else list(names)
        if self.streamer is None:
            return {k: self.streams[k].index_select(0, idx).float() for k in names}
        return self._streamed_batch(idx, names)

    def _streamed_batch(self, idx: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
        idx_np = idx.detach().cpu().numpy().astype(np.int64)
        pin = self._pin_pos[idx_np]
        pinned = pin >= 0
        block = np.where(pinned, -1, idx_np // self.block_rows)  # -1: the pinned rows
        needed = np.unique(block[~pinned])
        # read ahead: the window after the one holding this batch's last streamed row (the batch runs in
        # epoch order, so that window is the current one), else the blocks after these (a sorted pass)
        if needed.size:
            w = self._window_of_block.get(int(block[~pinned][-1]))
            if w is not None:
                ahead = self._windows[w + 1] if w + 1 < len(self._windows) else np.zeros(0, np.int64)
                protect = self._windows[w]
            else:
                start = int(needed[-1]) + 1
                ahead = np.arange(start, min(self.streamer.n_blocks, start + self.streamer.capacity // 2))
                protect = needed
        sources: list[tuple[dict[str, torch.Tensor], np.ndarray, np.ndarray]] = []  # (data, batch rows, rows there)
        if pinned.any():
            sel = np.flatnonzero(pinned)
            sources.append((self._pinned, sel, pin[sel]))
        for b in needed:
            sel = np.flatnonzero(block == b)
            sources.append((self.streamer.get(int(b)), sel, idx_np[sel] - int(b) * self.block_rows))
        if needed.size:
            self.streamer.prefetch(ahead, protect=protect)
        # gather in the resident dtype into one buffer (numpy's row copies: torch's cat or index_put of many
        # small pieces costs several times more), then widen once, as a resident set's batch does
        dev = self.device
        if len(sources) == 1:
            data, _, local = sources[0]
            local_t = torch.from_numpy(local)
            out = {k: data[k].index_select(0, local_t) for k in names}
        else:
            out = {}
            for k in names:
                buf = np.empty((idx_np.size, *self.stream_dims[k]), dtype=sources[0][0][k].numpy().dtype)
                for data, sel, local in sources:
                    buf[sel] = data[k].numpy()[local]
                out[k] = torch.from_numpy(buf)
        if dev.type != "cpu":  # widen on the device: half the bytes cross the bus
            return {k: v.to(dev, non_blocking=True).float() for k, v in out.items()}
        return {k: v.float() for k, v in out.items()}

    def pin(self, idx: np.ndarray | torch.Tensor) -> None:
        """Keep rows ``idx`` resident (a streamed set's exemplar memory, drawn from every block at every
        step); a no-op for a resident set. Replaces the rows pinned before."""
        if self.streamer is None:
            return
        idx_np = np.unique(np.asarray(torch.as_tensor(idx).cpu(), dtype=np.int64))
        self._pin_pos[:] = -1
        self._pinned = {}
        if idx_np.size == 0:
            return
        self._pin_pos[idx_np] = np.arange(idx_np.size)
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in self.stream_dims}
        block = idx_np // self.block_rows
        for b in np.unique(block):
            data = self.streamer.get(int(b))
            local = torch.from_numpy(idx_np[block == b] - int(b) * self.block_rows)
            for k in parts:
                parts[k].append(data[k].index_select(0, local))
        self._pinned = {k: torch.cat(v) for k, v in parts.items()}

    def epoch_order(self, pool: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The order in which one epoch visits the indices ``pool`` (a permutation of it).

        ``shuffle_blocks=None``: ``pool[randperm(len(pool))]``. Otherwise (see the
        module docstring) the blocks that ``pool`` touches are shuffled and taken
        ``shuffle_blocks`` at a time, and each window's rows (in ``pool`` order)
        are shuffled. Both draw from ``generator`` only, so resident and streamed
        sets with the same ``block_rows`` and ``shuffle_blocks`` give the same order.
        """
        n = pool.numel()
        if self.shuffle_blocks is None:
            return pool[torch.randperm(n, generator=generator).to(pool.device)]
        if n == 0:
            self._windows, self._window_of_block = [], {}
            return pool
        pool_cpu = pool.detach().cpu()
        block = pool_cpu // self.block_rows
        blocks = torch.unique(block)
        blocks = blocks[torch.randperm(blocks.numel(), generator=generator)]
        # each row's window, then the rows grouped by window in pool order (one stable sort, not one
        # pass over the pool per window: a small budget over a large store makes many windows)
        rank = torch.empty(int(blocks.max()) + 1, dtype=torch.long)
        rank[blocks] = torch.arange(blocks.numel()) // self.shuffle_blocks
        win_of = rank[block]
        grouped = pool_cpu[torch.sort(win_of, stable=True).indices]
        counts = torch.bincount(win_of, minlength=-(-blocks.numel() // self.shuffle_blocks)).tolist()
        parts, windows = [], []
        for w, members in enumerate(torch.split(grouped, counts)):
            parts.append(members[torch.randperm(members.numel(), generator=generator)])
            windows.append(blocks[w * self.shuffle_blocks: (w + 1) * self.shuffle_blocks].numpy())
        self._windows = windows
        self._window_of_block = {int(b): w for w, win in enumerate(windows) for b in win}
        if self.streamer is not None and windows:
            self.streamer.prefetch(windows[0])
        return torch.cat(parts).to(pool.device)

    def to(self, device: str | torch.device) -> "FeatureSet":
        """This set with its streams moved to ``device`` (no copy when already there); a streamed set
        reads on the host and moves each batch."""
        device = torch.device(device)
        if self.streamer is not None:
            if self.device == device:
                return self
            fs = FeatureSet({}, self.class_ids, self.rows, self.sample_ids, self.manifest, self.sources,
                            dict(self.excluded), self.streamer, self.shuffle_blocks, self.block_rows,
                            dict(self.stream_dims), device)
            return fs
        if all(v.device == device for v in self.streams.values()):
            return self
        return FeatureSet({k: v.to(device) for k, v in self.streams.items()}, self.class_ids, self.rows,
                          self.sample_ids, self.manifest, self.sources, dict(self.excluded),
                          None, self.shuffle_blocks, self.block_rows, dict(self.stream_dims))

    def nbytes(self) -> int:
        """Bytes of the resident streams (a streamed set: of the blocks it may hold)."""
        if self.streamer is not None:
            return self.streamer.capacity * self.streamer.block_bytes()
        return sum(v.element_size() * v.nelement() for v in self.streams.values())

    def order_info(self) -> dict:
        """How epochs are ordered and features held (recorded in run configs)."""
        return {"streamed": self.streamed, "block_rows": self.block_rows, "shuffle_blocks": self.shuffle_blocks,
                "resident_dtype": {k: str(v.dtype).removeprefix("torch.") for k, v in self.streams.items()}
                if not self.streamed else {k: str(s.dtype).removeprefix("torch.")
                                           for k, s in self.streamer.sources.items()}}

    # -- construction -----------------------------------------------------------------
    @classmethod
    def from_stores(
        cls,
        caches: Sequence[str | FeatureStore],
        streams: Mapping[str, str] | None = None,
        device: str | torch.device = "cpu",
        keys: Sequence[str | None] | None = None,
        memory_budget: int | str | None = None,
        shuffle_blocks: int | None = None,
        block_rows: int | None = None,
    ) -> "FeatureSet":
        """Load feature streams from ``caches`` into one FeatureSet.

        ``streams`` maps FeatureSet stream names to store stream names, e.g.
        ``{'visual': 'visual_dense'}``; it is merged over the default
        ``{'audio': 'audio', 'visual': 'visual'}``. A stream named in ``streams``
        must exist; a default one is loaded when some store has it (at least
        one stream must be found). Each stream comes from the first store (in
        the order given) that has it. ``keys[i]`` (optional) is the key (or
        key prefix) store ``i`` must have. Store paths may be fsspec URLs.

        ``memory_budget`` (bytes or a size like ``'8G'``; default
        :func:`default_memory_budget` of ``device``): when the needed streams are
        larger, the set is streamed (module docstring). ``block_rows`` (default:
        the primary store's rows per inner chunk) and ``shuffle_blocks`` (default: None
        for a resident set, half the blocks that fit the budget for a streamed
        one) set the epoch order of :meth:`epoch_order`.
        """
        if not caches:
            raise FeatureSetError("no feature store given (pass at least one --cache STORE)")
        keys = list(keys) if keys is not None else [None] * len(caches)
        if len(keys) != len(caches):
            raise FeatureSetError(f"{len(keys)} keys for {len(caches)} stores")
        stores = [c if isinstance(c, FeatureStore) else open_store(c, key=k) for c, k in zip(caches, keys)]
        required = set(streams or {})
        wanted = {**DEFAULT_STREAMS, **dict(streams or {})}

        provider: dict[str, int] = {}
        for name, stream in wanted.items():
            for i, st in enumerate(stores):
                if stream in st.streams:
                    provider[name] = i
                    break
            else:
                if name in required:
                    have = "; ".join(f"{st.path}: {sorted(st.streams)}" for st in stores)
                    raise FeatureSetError(f"no store provides stream {stream!r} (for {name!r}); streams: {have}")
        if not provider:
            have = "; ".join(f"{st.path}: {sorted(st.streams)}" for st in stores)
            raise FeatureSetError(f"none of the stores has an 'audio' or 'visual' stream; streams: {have}")
        unused = [st.path for i, st in enumerate(stores) if i not in provider.values()]
        if unused:
            raise FeatureSetError(
                f"store(s) {', '.join(unused)} provide none of the streams used "
                f"({', '.join(f'{k}={v}' for k, v in wanted.items() if k in provider)}); drop them or map a stream to them"
            )

        primary = stores[0]
        manifest = load_store_manifest(primary)
        if manifest is None:
            manifest = _manifest_from_arrays(primary)
        ids = primary.sample_ids
        usable = primary.row_status() == STATUS_OK
        excluded: dict[str, int] = {}
        for code in np.unique(primary.row_status()[~usable]):
            excluded[f"{STATUS_NAMES.get(int(code), str(int(code)))} in {primary.path}"] = int(
                (primary.row_status() == code).sum())
        # rows of every other store, matched by sample id
        other_rows: dict[int, np.ndarray] = {}
        for i, st in enumerate(stores[1:], start=1):
            index = {s: r for r, s in enumerate(st.sample_ids)}
            rows = np.array([index.get(s, -1) for s in ids], dtype=np.int64)
            missing = usable & (rows < 0)
            if missing.any():
                excluded[f"not in {st.path}"] = int(missing.sum())
            usable &= rows >= 0
            status = st.row_status()
            bad = usable & (status[np.maximum(rows, 0)] != STATUS_OK)
            if bad.any():
                excluded[f"status not ok in {st.path}"] = int(bad.sum())
            usable &= ~bad
            # labels come from the manifests (the stores hold none): two stores must agree on them
            other = load_store_manifest(st)
            if other is not None and other.classes() == manifest.classes():
                labels_here, labels_primary = first_labels(other)[np.maximum(rows, 0)], first_labels(manifest)
                clash = usable & (labels_here != labels_primary)
                if clash.any():
                    j = int(np.flatnonzero(clash)[0])
                    raise FeatureSetError(
                        f"sample {ids[j]!r} has label {int(labels_primary[j])} in {primary.path} but "
                        f"{int(labels_here[j])} in {st.path}: the stores carry different manifests; run avcl-extract "
                        "with the same manifest on both (their features are reused, only the labels change)"
                    )
            other_rows[i] = rows
        keep = np.flatnonzero(usable)
        if keep.size == 0:
            raise FeatureSetError(f"{primary.path}: no usable rows (status ok in every store)")
        n_out = int((~usable).sum())
        if n_out:
            log.warning("FeatureSet: %d of %d rows excluded (%s)", n_out, usable.size,
                        ", ".join(f"{k}: {v}" for k, v in excluded.items()))

        stream_map: dict[int, dict[str, str]] = {}
        sources: dict[str, _StreamSource] = {}
        for name, i in provider.items():
            st = stores[i]
            store_stream = wanted[name]
            rows = keep if i == 0 else other_rows[i][keep]
            arr = st.group[store_stream]
            sources[name] = _StreamSource(st, store_stream, rows.astype(np.int64),
                                          _normalised_dims(tuple(arr.shape), store_stream, st.path),
                                          _resident_dtype(arr.dtype))
            stream_map.setdefault(i, {})[name] = store_stream
        infos = [StoreInfo(st.path, st.key, st.encoder, st.dataset, stream_map.get(i, {}))
                 for i, st in enumerate(stores)]
        class_ids = first_labels(manifest)[keep]
        n = int(keep.size)
        block_rows = int(block_rows or default_block_rows(primary, n))
        budget = parse_size(memory_budget) if memory_budget is not None else default_memory_budget(device)
        streamer = BlockStreamer(sources, n, block_rows, capacity=2)
        need = n * streamer.block_bytes() // block_rows
        dims = {k: s.dims for k, s in sources.items()}
        common = (class_ids, keep.astype(np.int64), [ids[r] for r in keep], manifest, infos, excluded)
        if need > budget:
            streamer.capacity = max(2, budget // streamer.block_bytes())
            window = shuffle_blocks or max(1, streamer.capacity // 2)
            log.warning("FeatureSet: streams need %.1f MB > memory budget %.1f MB: streaming blocks of %d rows "
                        "(%d resident, shuffled %d blocks at a time)", need / 2**20, budget / 2**20, block_rows,
                        streamer.capacity, window)
            return cls({}, *common, streamer=streamer, shuffle_blocks=window, block_rows=block_rows,
                       stream_dims=dims, stream_device=torch.device(device))
        # resident: filled shard by shard, so loading never holds more than the set plus one shard's rows
        streamer.close()
        tensors = {k: torch.empty((n, *s.dims), dtype=s.dtype) for k, s in sources.items()}
        step = max(block_rows, _shard_rows(primary))  # whole shards: fewer, larger reads
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            for k, s in sources.items():
                tensors[k][lo:hi] = s.read(lo, hi)
        tensors = {k: v.to(device) for k, v in tensors.items()}
        return cls(tensors, *common, shuffle_blocks=shuffle_blocks, block_rows=block_rows, stream_dims=dims)


__all__ = ["BlockStreamer", "FeatureSet", "FeatureSetError", "StoreInfo", "available_memory", "default_memory_budget",
           "load_store_manifest", "parse_size", "DEFAULT_STREAMS", "StoreError"]
