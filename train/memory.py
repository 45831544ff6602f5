"""Exemplar memory: a fixed budget of training samples kept from old classes.

Exemplars are row indices into a FeatureSet (never copies of features), chosen
by pure selection functions. :class:`ExemplarMemory` applies the class-
incremental quota rule of the audio-visual CIL benchmarks: with ``M`` total
exemplars and ``C`` classes seen, every class keeps ``M // C`` samples; old
classes are trimmed to the new quota (keeping their earliest-selected
exemplars) when new classes arrive.
"""
from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

__all__ = ["ExemplarMemory", "csr_resample", "herding_select", "mss_select", "random_select", "SELECTIONS"]

SELECTIONS = ("random", "herding")


def random_select(indices, k: int, rng: np.random.Generator | int | None) -> np.ndarray:
    """``min(k, len(indices))`` distinct elements of ``indices``, uniformly at random.

    Returned in selection order (a uniformly random order), so any prefix is
    itself a uniform random subset. ``rng`` is a ``numpy.random.Generator`` or a
    seed for one.
    """
    idx = np.asarray(indices)
    if idx.ndim != 1:
        raise ValueError(f"indices must be 1-D, got shape {idx.shape}")
    if k < 0:
        raise ValueError(f"cannot select k={k} samples")
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    pos = gen.choice(idx.size, size=min(k, idx.size), replace=False)
    return idx[pos]


def herding_select(features, k: int) -> np.ndarray:
    """iCaRL herding without replacement; returns row positions in selection order.

    With rows ``phi_j = f_j / ||f_j||_2`` of ``features`` (shape ``(n, d)``) and
    the class mean ``mu = (1/n) * sum_j phi_j``, step ``m = 1 .. min(k, n)`` picks

        p_m = argmin_{j not yet picked} || mu - (phi_j + sum_{l<m} phi_{p_l}) / m ||_2,

    i.e. the sample whose addition brings the mean of the selected set closest
    to the class mean. A sample is never picked twice; ties go to the lowest
    position. Zero rows are left unnormalised (they cannot be scaled to unit norm).
    """
    F = np.asarray(features, dtype=np.float64)
    if F.ndim != 2:
        raise ValueError(f"herding needs features of shape (n, d), got {F.shape}")
    if not np.all(np.isfinite(F)):
        row = int(np.argwhere(~np.isfinite(F))[0, 0])
        raise ValueError(f"feature row {row} is not finite; cannot run herding")
    if k < 0:
        raise ValueError(f"cannot select k={k} samples")
    norms = np.linalg.norm(F, axis=1, keepdims=True)
    phi = F / np.where(norms > 0, norms, 1.0)
    mu = phi.mean(axis=0)
    n = phi.shape[0]
    chosen = np.empty(min(k, n), dtype=np.int64)
    available = np.ones(n, dtype=bool)
    running_sum = np.zeros_like(mu)
    for m in range(chosen.size):
        dist = np.linalg.norm(mu - (running_sum + phi) / (m + 1), axis=1)
        dist[~available] = np.inf
        j = int(np.argmin(dist))
        chosen[m] = j
        available[j] = False
        running_sum += phi[j]
    return chosen


def mss_select(indices, delta, k: int) -> np.ndarray:
    """CMR's multi-modal sample selection for one class: the ``min(k, n)`` elements of
    ``indices`` with the smallest ``|delta|``, in that order (ties: earlier position first).

    ``delta[j] = mIoU(audio-visual model) - mIoU(visual-only model)`` on sample
    ``indices[j]``: samples on which the picture alone explains the audio-visual
    prediction, i.e. whose sounding object is unambiguous.
    """
    idx = np.asarray(indices)
    d = np.asarray(delta, dtype=np.float64)
    if idx.ndim != 1 or d.shape != idx.shape:
        raise ValueError(f"mss_select: indices {idx.shape} and delta {d.shape} must be 1-D of equal length")
    if k < 0:
        raise ValueError(f"cannot select k={k} samples")
    if not np.all(np.isfinite(d)):
        raise ValueError(f"mss_select: delta of sample {idx[~np.isfinite(d)][0]!r} is not finite")
    order = np.argsort(np.abs(d), kind="stable")
    return idx[order[: min(k, idx.size)]]


def csr_resample(per_class: Mapping[int, np.ndarray], weights: Mapping[int, float], fraction: float,
                 rng: np.random.Generator | int | None) -> np.ndarray:
    """CMR's collision-based sample rehearsal: the buffer with ``fraction`` of it resampled.

    With the buffer ``B`` = all indices of ``per_class`` (class by class) and
    ``r = round(fraction * |B|)``: ``r`` entries of ``B``, drawn uniformly without
    replacement, are dropped, and ``r`` draws are added, each a class ``c`` with
    probability ``w_c / sum w`` (over the classes of ``per_class`` with exemplars) and
    then one of ``c``'s exemplars uniformly. The result has ``|B|`` entries; repeats
    are the point (classes that collide more are rehearsed more). Without positive
    weight the buffer is returned unchanged. Pure: the inputs are not modified.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must lie in [0, 1], got {fraction}")
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    classes = [int(c) for c, v in per_class.items() if len(v)]
    buf = np.concatenate([np.asarray(per_class[c], dtype=np.int64) for c in classes]) if classes \
        else np.zeros(0, dtype=np.int64)
    w = np.array([max(0.0, float(weights.get(c, 0.0))) for c in classes])
    r = int(round(fraction * buf.size))
    if r == 0 or w.sum() <= 0 or not np.all(np.isfinite(w)):
        return buf
    keep = np.sort(gen.choice(buf.size, size=buf.size - r, replace=False))
    picked = gen.choice(len(classes), size=r, p=w / w.sum())
    added = [int(gen.choice(np.asarray(per_class[classes[j]]))) for j in picked]
    return np.concatenate([buf[keep], np.asarray(added, dtype=np.int64)])


class ExemplarMemory:
    """Per-class exemplar indices under a total budget ``memory_size``.

    ``selection`` is ``'random'`` (seeded per class: the choice for class ``c``
    depends only on ``(seed, c)`` and the candidate indices, not on call order)
    or ``'herding'`` (:func:`herding_select` on features from ``features_fn``).
    Within each class, exemplars are stored in selection order.
    """

    def __init__(self, memory_size: int, selection: str = "random", seed: int = 0) -> None:
        if int(memory_size) < 0:
            raise ValueError(f"memory_size must be >= 0, got {memory_size}")
        if selection not in SELECTIONS:
            raise ValueError(f"unknown exemplar selection {selection!r}; choose one of {SELECTIONS}")
        self.memory_size = int(memory_size)
        self.selection = selection
        self.seed = int(seed)
        self._per_class: dict[int, np.ndarray] = {}

    # -- state ------------------------------------------------------------------
    @property
    def classes(self) -> list[int]:
        """Class ids held, in the order they were added."""
        return list(self._per_class)

    def quota(self, n_classes: int | None = None) -> int:
        """Per-class quota ``memory_size // n_classes`` (default: classes held)."""
        n = len(self._per_class) if n_classes is None else n_classes
        return self.memory_size // n if n else self.memory_size

    def __len__(self) -> int:
        return sum(v.size for v in self._per_class.values())

    def indices(self) -> np.ndarray:
        """All exemplar indices (int64), class by class in the order classes were added."""
        if not self._per_class:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate(list(self._per_class.values())).astype(np.int64)

    def labels(self) -> np.ndarray:
        """Class id of each entry of :meth:`indices` (int64, same order)."""
        if not self._per_class:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate(
            [np.full(v.size, c, dtype=np.int64) for c, v in self._per_class.items()]
        )

    def per_class(self) -> dict[int, np.ndarray]:
        """Copy of ``{class id: exemplar indices in selection order}``."""
        return {c: v.copy() for c, v in self._per_class.items()}

    # -- the quota rule -----------------------------------------------------------
    def update(
        self,
        class_to_indices: Mapping[int, np.ndarray],
        features_fn: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> None:
        """Add the classes of a new task and re-balance the budget.

        ``class_to_indices[c]`` holds the FeatureSet indices of all training
        samples of new class ``c``. With ``C`` = classes held + new classes,
        quota ``q = memory_size // C``: every old class keeps the first ``q`` of
        its exemplars (earliest selected), every new class selects ``q`` samples
        (all of them if it has fewer). ``features_fn(indices) -> (n, d) array``
        supplies the features for herding and is required when
        ``selection == 'herding'``.
        """
        new = {int(c): np.asarray(v) for c, v in class_to_indices.items()}
        for c, v in new.items():
            if c in self._per_class:
                raise ValueError(
                    f"class {c} is already in the exemplar memory; update() takes only new classes"
                )
            if v.ndim != 1 or (v.size and not np.issubdtype(v.dtype, np.integer)):
                raise ValueError(f"indices of class {c} must be a 1-D integer array, got {v.dtype} {v.shape}")
            if np.unique(v).size != v.size:
                raise ValueError(f"indices of class {c} contain duplicates")
        if self.selection == "herding" and features_fn is None and new:
            raise ValueError("herding selection needs features_fn(indices) -> (n, d) features")

        q = self.quota(len(self._per_class) + len(new))
        for c in self._per_class:
            self._per_class[c] = self._per_class[c][:q]
        for c, v in new.items():
            self._per_class[c] = self._select(c, v, q, features_fn)

    def _select(self, c: int, idx: np.ndarray, q: int, features_fn) -> np.ndarray:
        idx = idx.astype(np.int64)
        if q == 0 or idx.size == 0:
            return idx[:0]
        if self.selection == "random":
            return random_select(idx, q, np.random.default_rng([self.seed, c]))
        feats = np.asarray(features_fn(idx))
        if feats.ndim != 2 or feats.shape[0] != idx.size:
            raise ValueError(
                f"features_fn returned shape {feats.shape} for the {idx.size} samples of class {c}; "
                f"expected ({idx.size}, d)"
            )
        return idx[herding_select(feats, q)]

    def replace_class(self, c: int, indices) -> None:
        """Set the exemplars of held class ``c`` (e.g. chosen by another rule after :meth:`update`);
        at most the current quota are kept."""
        c = int(c)
        if c not in self._per_class:
            raise ValueError(f"class {c} is not in the exemplar memory")
        v = np.asarray(indices, dtype=np.int64)
        if v.ndim != 1 or np.unique(v).size != v.size:
            raise ValueError(f"exemplars of class {c} must be distinct 1-D indices")
        self._per_class[c] = v[: self.quota()]

    # -- checkpoints --------------------------------------------------------------
    def state_dict(self) -> dict:
        """Plain-Python state (ints, strs, lists): safe for JSON and ``torch.save``."""
        return {
            "memory_size": self.memory_size,
            "selection": self.selection,
            "seed": self.seed,
            "per_class": [[c, v.tolist()] for c, v in self._per_class.items()],
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restore from :meth:`state_dict` (class order preserved)."""
        missing = {"memory_size", "selection", "seed", "per_class"} - set(state)
        if missing:
            raise KeyError(f"exemplar memory state lacks keys {sorted(missing)}")
        if state["selection"] not in SELECTIONS:
            raise ValueError(f"unknown exemplar selection {state['selection']!r} in memory state")
        self.memory_size = int(state["memory_size"])
        self.selection = state["selection"]
        self.seed = int(state["seed"])
        self._per_class = {int(c): np.asarray(v, dtype=np.int64) for c, v in state["per_class"]}
