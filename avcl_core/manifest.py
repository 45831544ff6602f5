"""Manifests: one row per clip, the first thing every stage reads.

A manifest is an ordered list of rows; row order is the first axis of every
array in a feature store built from it. Columns:

``sample_id`` (str, unique), ``dataset`` (str), ``split`` (``train``/``val``/``test``),
``label`` (int class id, or a list of ids for multi-source clips), ``class_name``
(str; ``;``-joined for multi-source), ``video`` (path relative to the dataset
root), optional ``start``/``end`` (seconds), ``frames``/``masks`` (image
sequences for AVSBench-style data, below), ``audio`` (separate audio file),
``subset``.

**Image sequences** (``frames``, ``masks``): a glob pattern relative to the root
(``Single-source/s4_data/visual_frames/train/cat/x/x_*.png``; what the builders
write, literal parts escaped with :func:`glob.escape`) or, as shorthands, a
folder, meaning every image file (:data:`IMAGE_SUFFIXES`) in it, or one image
file (a sequence of one). The matching
files in *natural* order of their paths (digit runs compared as numbers:
``x_2.png`` before ``x_10.png``) are the sequence in time order;
:func:`image_sequence` is the one resolver every reader uses.

On disk a manifest is JSON Lines (one row per line, ``.jsonl``) or CSV with the
same column names (``label`` in CSV may be ``;``-joined ids). Class ids index the
manifest's class list, recovered from (label, class_name) pairs.
"""
from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

REQUIRED = ("sample_id", "dataset", "split", "label", "class_name", "video")
OPTIONAL = ("start", "end", "frames", "masks", "audio", "subset")
SPLITS = ("train", "val", "test")
#: File suffixes that count as images in a folder named by ``frames``/``masks``.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_DIGITS = re.compile(r"(\d+)")


def is_pattern(value: str | os.PathLike) -> bool:
    """Whether a ``frames``/``masks`` value is a glob pattern (has ``*``, ``?`` or ``[``)."""
    return any(ch in str(value) for ch in "*?[")


def natural_key(path: str | os.PathLike) -> tuple:
    """Sort key comparing digit runs as numbers (``x_2.png`` < ``x_10.png``)."""
    parts = _DIGITS.split(str(path))
    return tuple((1, int(p), p) if i % 2 else (0, 0, p) for i, p in enumerate(parts))


def image_sequence(value: str | os.PathLike, root: str | os.PathLike | None = None) -> list[Path]:
    """The image files a ``frames``/``masks`` value names, in time order (see the module docstring).

    ``value`` is a glob pattern, a folder or one file, relative to ``root`` (or absolute);
    the result is empty when nothing matches or the path does not exist.
    """
    p = Path(value) if root is None or os.path.isabs(value) else Path(root) / value
    if is_pattern(value):
        files = [Path(m) for m in glob.glob(str(p)) if os.path.isfile(m)]
    elif p.is_dir():
        files = [e for e in p.iterdir() if e.is_file() and e.suffix.lower() in IMAGE_SUFFIXES
                 and not e.name.startswith(".")]
    else:
        files = [p] if p.is_file() else []
    return sorted(files, key=natural_key)


class ManifestError(ValueError):
    """A manifest file or row that cannot be used; the message names it."""


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def canonical_hash(obj: Any) -> str:
    """sha256 hex of the canonical JSON of ``obj`` (sorted keys, no spaces)."""
    return hashlib.sha256(_canonical(obj).encode("utf-8")).hexdigest()


@dataclass
class Manifest:
    """Ordered clip rows of one dataset; ``rows[i]`` is store row ``i``."""

    rows: list[dict] = field(default_factory=list)
    source: str = ""

    def __post_init__(self) -> None:
        self.validate()

    # -- access -----------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[dict]:
        return iter(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]

    @property
    def dataset(self) -> str:
        names = {r["dataset"] for r in self.rows}
        return names.pop() if len(names) == 1 else "+".join(sorted(names))

    @property
    def sample_ids(self) -> list[str]:
        return [r["sample_id"] for r in self.rows]

    def classes(self) -> list[str]:
        """Class names indexed by class id (ids must be dense from 0)."""
        names: dict[int, str] = {}
        for r in self.rows:
            labels = r["label"] if isinstance(r["label"], list) else [r["label"]]
            cnames = r["class_name"].split(";") if isinstance(r["label"], list) else [r["class_name"]]
            for lab, name in zip(labels, cnames):
                if names.setdefault(int(lab), name) != name:
                    raise ManifestError(
                        f"{self.source or 'manifest'}: class id {lab} is named both "
                        f"{names[int(lab)]!r} and {name!r} (sample {r['sample_id']})"
                    )
        return [names.get(i, f"class_{i}") for i in range(max(names) + 1)] if names else []

    def split(self, name: str) -> "Manifest":
        return Manifest([r for r in self.rows if r["split"] == name], source=self.source)

    def counts(self) -> dict[str, int]:
        out = {s: 0 for s in SPLITS}
        for r in self.rows:
            out[r["split"]] = out.get(r["split"], 0) + 1
        return out

    def hash(self) -> str:
        """sha256 of the canonical JSON of all rows in order (the cache key uses it)."""
        h = hashlib.sha256()
        for r in self.rows:
            h.update(_canonical(r).encode("utf-8"))
            h.update(b"\n")
        return h.hexdigest()

    # -- checks -----------------------------------------------------------------
    def validate(self) -> None:
        seen: set[str] = set()
        where = self.source or "manifest"
        for i, r in enumerate(self.rows):
            missing = [k for k in REQUIRED if k not in r or r[k] is None or r[k] == ""]
            if missing:
                raise ManifestError(f"{where}: row {i} ({r.get('sample_id', '?')}) lacks {', '.join(missing)}")
            if r["sample_id"] in seen:
                raise ManifestError(f"{where}: sample_id {r['sample_id']!r} appears twice")
            seen.add(r["sample_id"])
            if r["split"] not in SPLITS:
                raise ManifestError(f"{where}: sample {r['sample_id']!r} has split {r['split']!r}, not one of {SPLITS}")
            for k in ("start", "end"):
                v = r.get(k)
                if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0):
                    raise ManifestError(f"{where}: sample {r['sample_id']!r} has {k} {v!r}, not a number of seconds >= 0")
            if r.get("start") is not None and r.get("end") is not None and r["end"] <= r["start"]:
                raise ManifestError(f"{where}: sample {r['sample_id']!r} ends ({r['end']}) before it starts ({r['start']})")

    # -- files ------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write JSON Lines (or CSV when the name ends in ``.csv``); deterministic bytes."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        if path.suffix == ".csv":
            cols = list(REQUIRED) + [c for c in OPTIONAL if any(c in r for r in self.rows)]
            with open(tmp, "w", newline="", encoding="utf-8") as f:
                w = csv.DictWriter(f, fieldnames=cols, lineterminator="\n")
                w.writeheader()
                for r in self.rows:
                    row = dict(r)
                    if isinstance(row["label"], list):
                        row["label"] = ";".join(str(x) for x in row["label"])
                    w.writerow({c: row.get(c, "") for c in cols})
        else:
            with open(tmp, "w", encoding="utf-8") as f:
                for r in self.rows:
                    f.write(_canonical(r) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Manifest":
        path = Path(path)
        if not path.exists():
            raise ManifestError(f"manifest file {path} does not exist")
        rows: list[dict] = []
        if path.suffix == ".csv":
            with open(path, newline="", encoding="utf-8") as f:
                for lineno, r in enumerate(csv.DictReader(f), start=2):
                    rows.append(_row_from_csv(r, path, lineno))
        else:
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ManifestError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        return cls(rows, source=str(path))

    @classmethod
    def from_rows(cls, rows: Iterable[dict], source: str = "") -> "Manifest":
        return cls(list(rows), source=source)


def _row_from_csv(r: dict, path: Path, lineno: int) -> dict:
    out: dict[str, Any] = {k: v for k, v in r.items() if v not in (None, "")}
    lab = out.get("label", "")
    try:
        if isinstance(lab, str) and ";" in lab:
            out["label"] = [int(x) for x in lab.split(";")]
        elif lab != "":
            out["label"] = int(lab)
    except ValueError:
        raise ManifestError(f"{path}:{lineno}: label {lab!r} is not an integer class id") from None
    for k in ("start", "end"):
        if k in out:
            try:
                out[k] = float(out[k])
            except ValueError:
                raise ManifestError(f"{path}:{lineno}: {k} {out[k]!r} is not a number of seconds") from None
    return out
