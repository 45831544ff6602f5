"""FeatureSet: the feature streams of one or more complete stores, in memory, served by index.

Training never loads samples one by one: :meth:`FeatureSet.from_stores` reads
the needed streams of each store once (shard-sized reads), keeps the rows that
are usable, converts float16 to float32 once and moves everything to the
training device. A batch is then an index tensor ``idx`` (B,) and
:meth:`FeatureSet.batch` gathers ``{'audio': (B, Ta, Da), 'visual': (B, Tv, Dv)}``
with one ``index_select`` per stream.

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
    """In-memory feature streams of the usable rows of one or more stores.

    Attributes (N = number of usable rows):

    * ``streams``: name -> float32 tensor (N, T, D) on ``device``;
    * ``class_ids``: int64 (N,) manifest class id of each row (first label of multi-label rows);
    * ``rows``: int64 (N,) row number in the primary store / its manifest;
    * ``sample_ids``: list of N str;
    * ``manifest``: the primary store's full manifest (all rows, usable or not);
    * ``sources``: one :class:`StoreInfo` per store used.
    """

    streams: dict[str, torch.Tensor]
    class_ids: np.ndarray
    rows: np.ndarray
    sample_ids: list[str]
    manifest: Manifest
    sources: list[StoreInfo]
    excluded: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._row_to_index = np.full(len(self.manifest), -1, dtype=np.int64)
        self._row_to_index[self.rows] = np.arange(len(self.rows))

    def __len__(self) -> int:
        return int(self.rows.size)

    @property
    def device(self) -> torch.device:
        return next(iter(self.streams.values())).device

    @property
    def dims(self) -> dict[str, tuple[int, int]]:
        """Per stream (T, D): tokens and channels of one sample."""
        return {k: (int(v.shape[1]), int(v.shape[2])) for k, v in self.streams.items()}

    def split_of(self) -> np.ndarray:
        """Manifest split of each row (N,) as str."""
        return np.array([self.manifest.rows[r]["split"] for r in self.rows])

    def indices_of_rows(self, manifest_rows: np.ndarray) -> np.ndarray:
        """FeatureSet indices of primary-store/manifest rows, unusable rows dropped (order kept)."""
        idx = self._row_to_index[np.asarray(manifest_rows, dtype=np.int64)]
        return idx[idx >= 0]

    def batch(self, idx: torch.Tensor, names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """``{stream: features[idx]}`` for an index tensor ``idx`` (B,) on this set's device."""
        names = self.streams.keys() if names is None else names
        return {k: self.streams[k].index_select(0, idx) for k in names}

    def to(self, device: str | torch.device) -> "FeatureSet":
        """This set with its streams moved to ``device`` (no copy when already there)."""
        device = torch.device(device)
        if all(v.device == device for v in self.streams.values()):
            return self
        return FeatureSet({k: v.to(device) for k, v in self.streams.items()}, self.class_ids, self.rows,
                          self.sample_ids, self.manifest, self.sources, dict(self.excluded))

    def nbytes(self) -> int:
        return sum(v.element_size() * v.nelement() for v in self.streams.values())

    # -- construction -----------------------------------------------------------------
    @classmethod
    def from_stores(
        cls,
        caches: Sequence[str | FeatureStore],
        streams: Mapping[str, str] | None = None,
        device: str | torch.device = "cpu",
        keys: Sequence[str | None] | None = None,
    ) -> "FeatureSet":
        """Load feature streams from ``caches`` into one FeatureSet.

        ``streams`` maps FeatureSet stream names to store stream names, e.g.
        ``{'visual': 'visual_dense'}``; it is merged over the default
        ``{'audio': 'audio', 'visual': 'visual'}``. A stream named in ``streams``
        must exist; a default one is loaded when some store has it (at least
        one stream must be found). Each stream comes from the first store (in
        the order given) that has it. ``keys[i]`` (optional) is the key (or
        key prefix) store ``i`` must have. Store paths may be fsspec URLs.
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

        tensors: dict[str, torch.Tensor] = {}
        stream_map: dict[int, dict[str, str]] = {}
        for name, i in provider.items():
            st = stores[i]
            store_stream = wanted[name]
            data = st.read(store_stream)
            rows = keep if i == 0 else other_rows[i][keep]
            data = _normalise_shape(data[rows], store_stream, st.path)
            # float16 -> float32 once, here; the training loop only gathers
            tensors[name] = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)).to(device)
            stream_map.setdefault(i, {})[name] = store_stream
        sources = [StoreInfo(st.path, st.key, st.encoder, st.dataset, stream_map.get(i, {}))
                   for i, st in enumerate(stores)]
        class_ids = first_labels(manifest)[keep]
        return cls(tensors, class_ids, keep.astype(np.int64), [ids[r] for r in keep], manifest, sources, excluded)


__all__ = ["FeatureSet", "FeatureSetError", "StoreInfo", "load_store_manifest", "DEFAULT_STREAMS", "StoreError"]
