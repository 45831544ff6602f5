"""Continual-learning protocols: which classes arrive in which task, and the rules around them.

A protocol is a dataset name + an ordered class list + the tasks (each a tuple of
*protocol class indices*, i.e. positions in the class list) + the setting
(``CIL``, ``TIL``, ``DIL`` or ``task-free``) + the exemplar memory budget, and
optionally the published per-split sample-id lists. Protocols are pure data:
every function here is deterministic and uses no global random state.

Files
-----
Named protocols live in ``manifests/protocols/<name>.json`` (or ``.json.gz``,
read transparently), and in the folders of ``AVCL_PROTOCOLS=dir1:dir2`` for
protocols of your own (a shipped name wins, see :func:`protocol_dirs`). Keys (only ``name``, ``dataset``, ``classes`` and
``tasks``/``classes_per_task`` are required)::

    name, dataset, setting ('CIL'), kind ('classification'), memory (0),
    memory_per_class (0), classes [names] or null (bound to a manifest later),
    tasks [[protocol class indices], ...]  or  classes_per_task (+ base),
    splits {split: [[ids of class 0], [ids of class 1], ...]} or {split: [ids]} or null,
    splits_from (name of a protocol whose split lists are reused),
    aliases {other name: class name}, seed, derived, provenance

Rules
-----
- Exemplar quota after ``n`` seen classes (AV-CIL rule): ``memory // n`` per
  class; old classes are trimmed to the new quota. A protocol with
  ``memory_per_class = m > 0`` keeps ``m`` per class instead (``memory`` is then
  the final total ``m * len(classes)``).
- ``select`` keeps a manifest row for ``split`` when its sample id is in the
  protocol's list for that split (if the protocol has lists; else when the row's
  ``split`` is that split) and any of its
  labels maps to a class of the requested tasks ("overlapped" membership for
  multi-label segmentation clips).
- ``task-free`` protocols cut the training stream into ``len(tasks)`` chunks:
  training rows sorted by sample id, permuted by ``numpy.random.default_rng(seed)``
  and split into consecutive near-equal chunks (``numpy.array_split``); val/test
  rows are not chunked.
- A protocol whose ``classes`` is empty takes its class list from the manifest
  it is bound to (:meth:`Protocol.bind`): the manifest's class names sorted, then
  permuted by ``numpy.random.default_rng(seed)``.
"""
from __future__ import annotations

import dataclasses
import difflib
import gzip
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from avcl_core.manifest import Manifest
from avcl_core.paths import manifests_dir

SETTINGS = ("CIL", "TIL", "DIL", "task-free")
KINDS = ("classification", "segmentation", "semantic")
FORMAT = "avcl-protocol/1"


class ProtocolError(ValueError):
    """A protocol file, name or argument that cannot be used; the message names it."""


def normalize_name(name: str) -> str:
    """Class-name key used for loose matching: case-folded, ``_``/``-`` as spaces, spaces collapsed."""
    return re.sub(r"\s+", " ", re.sub(r"[_\-]", " ", name)).strip().casefold()


@dataclass(frozen=True)
class Protocol:
    """One continual-learning protocol (see the module docstring for the rules).

    ``classes[i]`` is the name of protocol class ``i``; ``tasks[t]`` the protocol
    class indices introduced by task ``t``. ``splits[split]`` (when not None) is
    the set of sample ids allowed in that split; ``sample_labels[id]`` the
    protocol class the published lists give that sample.
    """

    name: str
    dataset: str
    classes: tuple[str, ...]
    tasks: tuple[tuple[int, ...], ...]
    setting: str
    memory: int
    splits: dict[str, frozenset[str]] | None = field(default=None, hash=False)
    kind: str = "classification"
    provenance: str = ""
    derived: bool = False
    seed: int | None = None
    memory_per_class: int = 0
    aliases: dict[str, str] = field(default_factory=dict, hash=False, compare=False)
    sample_labels: dict[str, int] | None = field(default=None, hash=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        where = f"protocol {self.name!r}"
        if self.setting not in SETTINGS:
            raise ProtocolError(f"{where}: setting {self.setting!r} is not one of {SETTINGS}")
        if self.kind not in KINDS:
            raise ProtocolError(f"{where}: kind {self.kind!r} is not one of {KINDS}")
        if not self.tasks or any(len(t) == 0 for t in self.tasks):
            raise ProtocolError(f"{where}: needs at least one task and no empty task")
        if self.memory < 0 or self.memory_per_class < 0:
            raise ProtocolError(f"{where}: memory must be >= 0")
        n = self.num_classes
        flat = [c for t in self.tasks for c in t]
        if any(c < 0 or c >= n for c in flat):
            raise ProtocolError(f"{where}: task class indices must lie in 0..{n - 1}")
        if self.setting in ("CIL", "TIL") and len(set(flat)) != len(flat):
            raise ProtocolError(f"{where}: a class appears in two tasks, which {self.setting} does not allow")
        if self.classes and len(set(self.classes)) != len(self.classes):
            dup = sorted({c for c in self.classes if self.classes.count(c) > 1})
            raise ProtocolError(f"{where}: class names appear twice: {dup[:5]}")
        if self.setting == "task-free" and self.seed is None:
            raise ProtocolError(f"{where}: a task-free protocol needs a seed for its stream order")

    # -- shape ----------------------------------------------------------------------
    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def num_classes(self) -> int:
        """len(classes), or for an unbound protocol 1 + the largest class index of its tasks."""
        if self.classes:
            return len(self.classes)
        return 1 + max(c for t in self.tasks for c in t)

    @property
    def bound(self) -> bool:
        """False while the class list is still to be taken from a manifest (see :meth:`bind`)."""
        return bool(self.classes)

    def task_shape(self) -> str:
        """Compact task layout: ``4x7`` (equal tasks), ``11+6x2`` (base then equal), else ``a+b+c``."""
        sizes = [len(t) for t in self.tasks]
        if len(set(sizes)) == 1:
            return f"{len(sizes)}x{sizes[0]}"
        if len(set(sizes[1:])) == 1:
            rest = f"{len(sizes) - 1}x{sizes[1]}" if len(sizes) > 2 else str(sizes[1])
            return f"{sizes[0]}+{rest}"
        return "+".join(str(s) for s in sizes)

    def split_counts(self) -> dict[str, int] | None:
        """Number of listed sample ids per split, or None when the protocol lists none."""
        if self.splits is None:
            return None
        return {s: len(ids) for s, ids in self.splits.items()}

    def quota(self, n_seen_classes: int) -> int:
        """Exemplars kept per seen class: ``memory_per_class`` if set, else ``memory // n_seen_classes``."""
        if n_seen_classes <= 0:
            raise ProtocolError(f"protocol {self.name!r}: quota needs at least one seen class, got {n_seen_classes}")
        if self.memory_per_class:
            return self.memory_per_class
        return self.memory // n_seen_classes

    def seen_classes(self, task: int) -> tuple[int, ...]:
        """Protocol class indices introduced by tasks ``0..task`` (first-seen order)."""
        out: dict[int, None] = {}
        for t in self.tasks[: task + 1]:
            out.update(dict.fromkeys(t))
        return tuple(out)

    # -- names ----------------------------------------------------------------------
    def _require_bound(self) -> None:
        if not self.classes:
            raise ProtocolError(
                f"protocol {self.name!r} takes its classes from the dataset's manifest: "
                "call bind(manifest) (or resolve_protocol(name, manifest)) first"
            )

    def _lookup(self, name: str) -> int | None:
        idx = _name_index(self.classes)
        if name in idx:
            return idx[name]
        if name in self.aliases and self.aliases[name] in idx:
            return idx[self.aliases[name]]
        loose = _loose_index(self.classes, tuple(sorted(self.aliases.items())))
        return loose.get(normalize_name(name))

    def class_index(self, name: str) -> int:
        """Protocol class index of ``name`` (exact, alias, or case/``_``-insensitive match)."""
        self._require_bound()
        i = self._lookup(name)
        if i is None:
            near = difflib.get_close_matches(name, self.classes, n=3)
            hint = f"; did you mean {', '.join(map(repr, near))}?" if near else ""
            raise ProtocolError(f"protocol {self.name!r} has no class {name!r}{hint}")
        return i

    def task_of_class(self, idx: int) -> int:
        """Index of the first task that introduces protocol class ``idx``."""
        for t, members in enumerate(self.tasks):
            if idx in members:
                return t
        raise ProtocolError(f"protocol {self.name!r}: class index {idx} is in no task")

    # -- manifests ------------------------------------------------------------------
    def bind(self, manifest: Manifest) -> "Protocol":
        """This protocol with its class list taken from ``manifest`` when it has none.

        The order is ``sorted(manifest classes)`` permuted by
        ``numpy.random.default_rng(seed).permutation``; the manifest must have exactly
        :attr:`num_classes` classes. A bound protocol is returned unchanged.
        """
        if self.classes:
            return self
        names = sorted(manifest.classes())
        if len(names) != self.num_classes:
            raise ProtocolError(
                f"protocol {self.name!r} needs a manifest with {self.num_classes} classes; "
                f"{manifest.source or 'the manifest'} has {len(names)}"
            )
        order = np.random.default_rng(self.seed if self.seed is not None else 0).permutation(len(names))
        return dataclasses.replace(self, classes=tuple(names[i] for i in order))

    def label_map(self, manifest: Manifest) -> np.ndarray:
        """int64 array ``m`` with ``m[c]`` = protocol class index of manifest class id ``c`` (-1: not in protocol).

        Names match exactly, through ``aliases``, or loosely (:func:`normalize_name`).
        A manifest class whose name matches nothing but whose listed samples all
        carry one protocol class in the published lists maps to that class.
        """
        p = self.bind(manifest)
        names = manifest.classes()
        out = np.full(len(names), -1, dtype=np.int64)
        for c, name in enumerate(names):
            i = p._lookup(name)
            if i is not None:
                out[c] = i
        if p.sample_labels and (out < 0).any():
            votes: dict[int, set[int]] = {}
            for r in manifest.rows:
                labs = r["label"] if isinstance(r["label"], list) else [r["label"]]
                if len(labs) == 1 and r["sample_id"] in p.sample_labels:
                    votes.setdefault(int(labs[0]), set()).add(p.sample_labels[r["sample_id"]])
            taken = set(out[out >= 0].tolist())
            for c in np.flatnonzero(out < 0):
                v = votes.get(int(c), set())
                if len(v) == 1 and next(iter(v)) not in taken:
                    out[c] = next(iter(v))
                    taken.add(int(out[c]))
        return out

    def select(self, manifest: Manifest, split: str, tasks: int | Iterable[int] | None = None) -> np.ndarray:
        """Ascending manifest row indices of ``split`` that belong to ``tasks`` (all tasks if None).

        A row qualifies when its sample id is in the protocol's list for ``split`` (when
        the protocol has lists; the manifest's ``split`` then plays no part) or else its
        ``split`` matches, and any of its labels maps to
        a class of the given tasks. For a ``task-free`` protocol and ``split='train'``
        only the rows of the given tasks' stream chunks are kept.
        """
        p = self.bind(manifest)
        if tasks is None:
            task_ids = list(range(p.num_tasks))
        else:
            task_ids = [int(tasks)] if isinstance(tasks, (int, np.integer)) else [int(t) for t in tasks]
        bad = [t for t in task_ids if not 0 <= t < p.num_tasks]
        if bad:
            raise ProtocolError(f"protocol {p.name!r} has tasks 0..{p.num_tasks - 1}; asked for {bad}")
        allowed = np.zeros(p.num_classes, dtype=bool)
        for t in task_ids:
            allowed[list(p.tasks[t])] = True
        lm = p.label_map(manifest)
        ids = None if p.splits is None else p.splits.get(split, frozenset())
        rows = []
        for i, r in enumerate(manifest.rows):
            # a protocol that lists a split's ids decides that split (a VGGSound clip of the csv's
            # "train" split can be in VGGSound-100's val list); otherwise the manifest's split does
            if (r["sample_id"] not in ids) if ids is not None else (r["split"] != split):
                continue
            labs = r["label"] if isinstance(r["label"], list) else [r["label"]]
            for lab in labs:
                lab = int(lab)
                if 0 <= lab < len(lm) and lm[lab] >= 0 and allowed[lm[lab]]:
                    rows.append(i)
                    break
        out = np.asarray(rows, dtype=np.int64)
        if p.setting == "task-free" and split == "train" and tasks is not None:
            chunk = p.stream_chunks(manifest)
            keep = np.isin(chunk[out], task_ids) if len(out) else np.zeros(0, dtype=bool)
            out = out[keep]
        return out

    def stream_chunks(self, manifest: Manifest) -> np.ndarray:
        """Task-free stream: int64 array, per manifest row the task whose chunk holds it (-1: not a training row).

        Training rows in the protocol sorted by sample id, permuted by
        ``default_rng(seed)``, then cut into ``num_tasks`` consecutive chunks with
        ``numpy.array_split``.
        """
        p = self.bind(manifest)
        if p.setting != "task-free":
            raise ProtocolError(f"protocol {p.name!r} is {p.setting}, not task-free: it has no stream")
        full = dataclasses.replace(p, setting="CIL", tasks=(tuple(range(p.num_classes)),), seed=p.seed)
        train = full.select(manifest, "train")
        order = sorted(train.tolist(), key=lambda i: manifest.rows[i]["sample_id"])
        perm = np.random.default_rng(p.seed).permutation(len(order))
        out = np.full(len(manifest), -1, dtype=np.int64)
        for t, part in enumerate(np.array_split(np.asarray(order, dtype=np.int64)[perm], p.num_tasks)):
            out[part] = t
        return out

    # -- files ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (per-class split lists when every listed id has a class)."""
        d: dict[str, Any] = {
            "format": FORMAT,
            "name": self.name,
            "dataset": self.dataset,
            "setting": self.setting,
            "kind": self.kind,
            "memory": self.memory,
            "memory_per_class": self.memory_per_class,
            "derived": self.derived,
            "seed": self.seed,
            "provenance": self.provenance,
            "aliases": dict(sorted(self.aliases.items())),
            "classes": list(self.classes) if self.classes else None,
            "tasks": [list(t) for t in self.tasks],
            "splits": None,
        }
        if self.splits is not None:
            labels = self.sample_labels or {}
            splits: dict[str, Any] = {}
            for s, ids in self.splits.items():
                if ids and all(i in labels for i in ids):
                    per = [[] for _ in range(self.num_classes)]
                    for i in sorted(ids):
                        per[labels[i]].append(i)
                    splits[s] = per
                else:
                    splits[s] = sorted(ids)
            d["splits"] = splits
        return d


@lru_cache(maxsize=64)
def _name_index(classes: tuple[str, ...]) -> dict[str, int]:
    return {c: i for i, c in enumerate(classes)}


@lru_cache(maxsize=64)
def _loose_index(classes: tuple[str, ...], aliases: tuple[tuple[str, str], ...]) -> dict[str, int]:
    idx = {normalize_name(c): i for i, c in enumerate(classes)}
    exact = _name_index(classes)
    for alias, target in aliases:
        if target in exact:
            idx.setdefault(normalize_name(alias), exact[target])
    return idx


# -- construction -----------------------------------------------------------------
def tasks_from_sizes(n_classes: int, classes_per_task: int, base: int | None = None) -> tuple[tuple[int, ...], ...]:
    """Consecutive tasks over ``range(n_classes)``: ``base`` classes first (if given), then ``classes_per_task`` each."""
    if classes_per_task <= 0:
        raise ProtocolError(f"classes per task must be >= 1, got {classes_per_task}")
    first = classes_per_task if base is None else base
    if first <= 0 or first > n_classes:
        raise ProtocolError(f"base task size {first} does not fit {n_classes} classes")
    rest = n_classes - first
    if rest % classes_per_task:
        raise ProtocolError(
            f"{n_classes} classes do not split into "
            + (f"a base of {base} plus " if base is not None else "")
            + f"tasks of {classes_per_task} ({rest} left over is not a multiple of {classes_per_task})"
        )
    tasks = [tuple(range(first))]
    for start in range(first, n_classes, classes_per_task):
        tasks.append(tuple(range(start, start + classes_per_task)))
    return tuple(tasks)


def protocol_from_order(
    name: str,
    dataset: str,
    class_order: Sequence[str],
    classes_per_task: int,
    base: int | None = None,
    memory: int = 0,
    setting: str = "CIL",
) -> Protocol:
    """Protocol over ``class_order`` cut into consecutive tasks (``base`` classes first, if given).

    Example: 10 classes, ``classes_per_task=2, base=4`` gives tasks of 4, 2, 2, 2 classes.
    """
    order = tuple(str(c) for c in class_order)
    if not order:
        raise ProtocolError(f"protocol {name!r}: the class order is empty")
    dup = sorted({c for c in order if order.count(c) > 1})
    if dup:
        raise ProtocolError(f"protocol {name!r}: classes listed twice in the class order: {dup[:5]}")
    return Protocol(
        name=name,
        dataset=dataset,
        classes=order,
        tasks=tasks_from_sizes(len(order), classes_per_task, base),
        setting=setting,
        memory=int(memory),
        splits=None,
        provenance="class order and task sizes given by the user",
    )


def protocol_from_dict(d: dict[str, Any], source: str = "", resolve: Any = None) -> Protocol:
    """Build a :class:`Protocol` from its file dict (see the module docstring); ``source`` names the file in errors."""
    where = source or f"protocol {d.get('name', '?')!r}"
    for key in ("name", "dataset"):
        if not isinstance(d.get(key), str) or not d[key]:
            raise ProtocolError(f"{where}: key {key!r} is missing or not a string")
    classes = tuple(d.get("classes") or ())
    if "tasks" in d and d["tasks"] is not None:
        try:
            tasks = tuple(tuple(int(c) for c in t) for t in d["tasks"])
        except (TypeError, ValueError):
            raise ProtocolError(f"{where}: 'tasks' must be a list of lists of class indices") from None
    elif "classes_per_task" in d:
        n = len(classes) or int(d.get("num_classes", 0))
        tasks = tasks_from_sizes(n, int(d["classes_per_task"]), d.get("base"))
    else:
        raise ProtocolError(f"{where}: needs 'tasks' or 'classes_per_task'")
    splits = sample_labels = None
    raw = d.get("splits")
    if raw is None and d.get("splits_from"):
        other = (resolve or load_protocol)(d["splits_from"])
        if other.splits is None:
            raise ProtocolError(f"{where}: splits_from {d['splits_from']!r} has no split lists")
        splits = dict(other.splits)
        if other.sample_labels and classes:
            # the other protocol indexes its own class order: go through the names
            idx = {c: i for i, c in enumerate(classes)}
            missing = [c for c in other.classes if c not in idx]
            if missing:
                raise ProtocolError(f"{where}: classes {missing[:3]} of {d['splits_from']!r} are not in this protocol")
            remap = [idx[c] for c in other.classes]
            sample_labels = {s: remap[c] for s, c in other.sample_labels.items()}
    elif raw is not None:
        if not isinstance(raw, dict):
            raise ProtocolError(f"{where}: 'splits' must map split names to id lists")
        splits, sample_labels = {}, {}
        for s, lists in raw.items():
            if lists and isinstance(lists[0], list):
                ids: list[str] = []
                for c, members in enumerate(lists):
                    for sid in members:
                        sample_labels[sid] = c
                    ids.extend(members)
            else:
                ids = list(lists)
            splits[s] = frozenset(ids)
        sample_labels = sample_labels or None
    try:
        return Protocol(
            name=d["name"],
            dataset=d["dataset"],
            classes=classes,
            tasks=tasks,
            setting=d.get("setting", "CIL"),
            memory=int(d.get("memory", 0)),
            splits=splits,
            kind=d.get("kind", "classification"),
            provenance=d.get("provenance", ""),
            derived=bool(d.get("derived", False)),
            seed=d.get("seed"),
            memory_per_class=int(d.get("memory_per_class", 0)),
            aliases=dict(d.get("aliases") or {}),
            sample_labels=sample_labels,
        )
    except ProtocolError as e:
        raise ProtocolError(f"{where}: {e}") from None


def save_protocol(p: Protocol, path: str | Path) -> Path:
    """Write ``p`` as compact JSON (one top-level key per line); gzip when ``path`` ends in ``.gz``.

    The bytes are deterministic (gzip without a timestamp).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    d = p.to_dict()
    text = "{\n" + ",\n".join(
        json.dumps(k) + ":" + json.dumps(v, ensure_ascii=False, separators=(",", ":")) for k, v in d.items()
    ) + "\n}\n"
    data = text.encode("utf-8")
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".gz":
        data = gzip.compress(data, compresslevel=9, mtime=0)
    tmp.write_bytes(data)
    tmp.replace(path)
    return path


# -- loading ----------------------------------------------------------------------
def protocols_dir() -> Path:
    """The shipped protocol files (``manifests/protocols``)."""
    return manifests_dir() / "protocols"


def protocol_dirs() -> list[Path]:
    """Where named protocols are looked up, in order: the shipped folder, then every folder of
    ``AVCL_PROTOCOLS`` (separated by ``os.pathsep``, ``:`` on POSIX). A name is taken from the first
    folder that has it, so a shipped protocol name always means the shipped protocol."""
    extra = [Path(p).expanduser() for p in os.environ.get("AVCL_PROTOCOLS", "").split(os.pathsep) if p.strip()]
    return [protocols_dir(), *extra]


def _protocol_files(shadowed: list[Path] | None = None) -> dict[str, Path]:
    """``{name: file}`` over :func:`protocol_dirs`; files hidden by an earlier folder's file of the
    same name are appended to ``shadowed`` when given."""
    out: dict[str, Path] = {}
    for d in protocol_dirs():
        if not d.is_dir():
            continue
        for f in sorted(d.iterdir()):
            for suffix in (".json.gz", ".json"):
                if f.name.endswith(suffix) and not f.name.startswith("."):
                    name = f.name[: -len(suffix)]
                    if name not in out:
                        out[name] = f
                    elif shadowed is not None and out[name].parent != f.parent:
                        shadowed.append(f)
                    break
    return out


def list_protocols() -> list[str]:
    """Names of the known protocols (shipped ones and those in ``AVCL_PROTOCOLS`` folders), sorted.

    A file in an ``AVCL_PROTOCOLS`` folder whose name a shipped (or earlier) protocol has is
    ignored, with a warning."""
    shadowed: list[Path] = []
    files = _protocol_files(shadowed)
    for f in shadowed:
        warnings.warn(f"protocol file {f} is ignored: the name is taken by {files[f.name.split('.json')[0]]}",
                      stacklevel=2)
    return sorted(files)


def protocol_file(name: str) -> Path | None:
    """The file of the named protocol (see :func:`protocol_dirs`), or None."""
    return _protocol_files().get(name)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        d = json.loads(raw.decode("utf-8"))
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProtocolError(f"protocol file {path} cannot be read: {e}") from None
    if not isinstance(d, dict):
        raise ProtocolError(f"protocol file {path} does not hold a JSON object")
    return d


@lru_cache(maxsize=32)
def _load_file(path: str, mtime_ns: int) -> Protocol:
    return protocol_from_dict(_read_json(Path(path)), source=f"protocol file {path}")


def load_protocol(name_or_path: str) -> Protocol:
    """Load a protocol by name (``manifests/protocols/<name>.json[.gz]``, then the ``AVCL_PROTOCOLS``
    folders, see :func:`protocol_dirs`) or a ``.json[.gz]`` file path.

    Raises :class:`ProtocolError` listing the available names when neither exists.
    """
    s = str(name_or_path)
    files = _protocol_files()
    if s in files:
        path = files[s]
    elif s.endswith((".json", ".json.gz")) or os.sep in s or "/" in s:
        path = Path(s)
        if not path.is_file():
            raise ProtocolError(f"protocol file {path} does not exist")
    else:
        raise ProtocolError(
            f"unknown protocol {s!r}; available: {', '.join(sorted(files)) or '(none)'} "
            f"(in {', '.join(str(d) for d in protocol_dirs())}; more folders with AVCL_PROTOCOLS=dir1:dir2), "
            "or give a path to a protocol .json file"
        )
    return _load_file(str(path.resolve()), path.stat().st_mtime_ns)


# -- bring your own ---------------------------------------------------------------
def _parse_class_order(class_order: str, manifest: Manifest | None) -> list[str]:
    names = manifest.classes() if manifest is not None else None
    if class_order == "sorted":
        if names is None:
            raise ProtocolError("class order 'sorted' needs a manifest to take the class names from")
        return sorted(names)
    if os.path.isfile(class_order):
        with open(class_order, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip() and not line.startswith("#")]
    sep = "|" if "|" in class_order else ","
    tokens = [t.strip() for t in class_order.split(sep) if t.strip()]
    if names is not None and tokens and all(t.isdigit() for t in tokens):
        bad = [t for t in tokens if int(t) >= len(names)]
        if bad:
            raise ProtocolError(f"class ids {bad[:5]} are not in the manifest (it has ids 0..{len(names) - 1})")
        return [names[int(t)] for t in tokens]
    return tokens


def resolve_protocol(
    protocol: str | None,
    manifest: Manifest | None = None,
    class_order: str | None = None,
    classes_per_task: int | None = None,
    memory: int = 0,
    base: int | None = None,
    setting: str = "CIL",
) -> Protocol:
    """The protocol a command line asks for.

    - ``protocol`` alone: a named (or file) protocol, bound to ``manifest`` when given
      (and checked to share classes with it).
    - ``class_order`` + ``classes_per_task``: a new protocol named ``protocol`` (or
      ``custom``) over the manifest's dataset. ``class_order`` is ``sorted`` (the
      manifest's class names sorted), a file with one class name per line, a
      ``|``- or ``,``-separated list of names, or a ``,``-separated list of manifest
      class ids. Use ``|`` or a file when names contain commas.
    """
    if class_order is None:
        if not protocol:
            raise ProtocolError(
                "no protocol: give a protocol name (see `avcl-data protocols`) or a class order "
                "with classes per task"
            )
        p = load_protocol(protocol)
        if manifest is not None:
            p = p.bind(manifest)
            lm = p.label_map(manifest)
            if not (lm >= 0).any():
                raise ProtocolError(
                    f"protocol {p.name!r} (dataset {p.dataset!r}) shares no class with manifest "
                    f"{manifest.source or '(in memory)'} (dataset {manifest.dataset!r}); its classes "
                    f"include {manifest.classes()[:3]}"
                )
        return p
    if not classes_per_task:
        raise ProtocolError("a class order needs the number of classes per task")
    order = _parse_class_order(class_order, manifest)
    if manifest is not None:
        known = set(manifest.classes())
        loose = {normalize_name(c) for c in known}
        unknown = [c for c in order if c not in known and normalize_name(c) not in loose]
        if unknown:
            raise ProtocolError(
                f"class order names classes not in manifest {manifest.source or '(in memory)'}: {unknown[:5]}"
            )
    dataset = manifest.dataset if manifest is not None and len(manifest) else "custom"
    return protocol_from_order(
        protocol or "custom", dataset, order, int(classes_per_task), base=base, memory=memory, setting=setting
    )
