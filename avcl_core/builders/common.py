"""What every manifest builder shares: the build report, file probes, and the final file check.

A builder turns a dataset's official annotation files into candidate rows, each
with the files it needs (paths relative to the dataset root). :func:`finish`
probes every file, drops the rows with a missing or unreadable file, and
records each problem in the :class:`Report` (which never stops the build).

File probes (cheap, always): the path exists, is not empty, and starts with the
signature of its type (ISO-BMFF box for ``.mp4``/``.mov``, EBML for
``.mkv``/``.webm``, ``RIFF…WAVE`` for ``.wav``, the PNG/JPEG signatures, zip for
``.npz``). Deep probes (``deep=True``) also open videos and audio with PyAV
(a video file must hold a video stream) and images with Pillow.
"""
from __future__ import annotations

import csv
import glob
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from avcl_core.manifest import SPLITS, Manifest, ManifestError

# Problem kinds, as printed in reports.
MISSING = "missing file"
UNREADABLE = "unreadable file"
MALFORMED = "malformed line"
DUPLICATE = "duplicate id"
UNKNOWN_CLASS = "unknown class"
NO_SPLIT = "not in any split list"
LABEL_DIFFERS = "label differs from the benchmark list"
NOT_ANNOTATED = "not in the annotation file"
NO_AUDIO = "no audio stream"
OFF_PALETTE = "off-palette mask pixels"

VIDEO_EXTS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v")
IMAGE_EXTS = (".png", ".jpg", ".jpeg")
AUDIO_EXTS = (".wav", ".flac", ".mp3", ".m4a", ".aac", ".ogg")


class BuildError(ManifestError):
    """The dataset folder lacks what a builder cannot do without (e.g. the annotation file)."""


@dataclass
class Report:
    """Outcome of building or checking a manifest.

    ``problems[kind]`` lists one line per affected sample or file (kinds above);
    ``dropped`` counts annotation rows left out of the manifest; ``counts`` the
    manifest rows per split.
    """

    dataset: str
    root: str
    annotated: int = 0
    dropped: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    problems: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, kind: str, item: str) -> None:
        self.problems.setdefault(kind, []).append(item)

    def count(self, kind: str) -> int:
        return len(self.problems.get(kind, ()))

    def examples(self, kind: str, n: int = 5) -> list[str]:
        return list(self.problems.get(kind, ())[:n])

    @property
    def rows(self) -> int:
        return sum(self.counts.values())

    @property
    def usable(self) -> bool:
        """True when the manifest has at least one row."""
        return self.rows > 0

    def format(self, examples: int = 5) -> str:
        """Human-readable report: counts per split, then each problem kind with a count and the first examples."""
        lines = [f"dataset {self.dataset}  root {self.root}"]
        if self.annotated:
            lines.append(f"annotated samples: {self.annotated}")
        lines.append(
            "manifest rows: " + "  ".join(f"{s} {self.counts.get(s, 0)}" for s in SPLITS)
            + f"  (total {self.rows}; {self.dropped} left out)"
        )
        for kind in sorted(self.problems):
            items = self.problems[kind]
            lines.append(f"{kind}: {len(items)}")
            for it in items[:examples]:
                lines.append(f"    {it}")
            if len(items) > examples:
                lines.append(f"    ... and {len(items) - examples} more")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "dataset": self.dataset,
            "root": self.root,
            "annotated": self.annotated,
            "dropped": self.dropped,
            "counts": dict(self.counts),
            "problems": {k: list(v) for k, v in sorted(self.problems.items())},
            "notes": list(self.notes),
        }


# -- probes -----------------------------------------------------------------------
_ISO_BOXES = {b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot", b"uuid"}


def _signature_ok(suffix: str, head: bytes) -> bool | None:
    """True/False when the suffix has a known signature, None otherwise."""
    if suffix in (".mp4", ".m4v", ".mov", ".m4a", ".3gp"):
        return head[4:8] in _ISO_BOXES
    if suffix in (".mkv", ".webm"):
        return head.startswith(b"\x1a\x45\xdf\xa3")
    if suffix == ".avi":
        return head[:4] == b"RIFF" and head[8:12] == b"AVI "
    if suffix == ".wav":
        return head[:4] in (b"RIFF", b"RF64") and head[8:12] == b"WAVE"
    if suffix == ".png":
        return head.startswith(b"\x89PNG\r\n\x1a\n")
    if suffix in (".jpg", ".jpeg"):
        return head.startswith(b"\xff\xd8\xff")
    if suffix == ".npz":
        return head.startswith(b"PK")
    if suffix == ".flac":
        return head.startswith(b"fLaC")
    return None


def probe_file(path: str | Path, deep: bool = False) -> tuple[str, str] | None:
    """None when ``path`` looks usable, else ``(kind, reason)`` with kind MISSING, UNREADABLE or NO_AUDIO."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        return MISSING, "does not exist"
    except OSError as e:
        return UNREADABLE, f"cannot stat: {e.strerror or e}"
    if not path.is_file():
        return UNREADABLE, "is not a file"
    if st.st_size == 0:
        return UNREADABLE, "empty file"
    suffix = path.suffix.lower()
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        return UNREADABLE, f"cannot be opened: {e.strerror or e}"
    if _signature_ok(suffix, head) is False:
        return UNREADABLE, f"not a {suffix[1:].upper()} file (starts with {head[:8]!r})"
    if deep:
        return _deep_probe(path, suffix)
    return None


def _deep_probe(path: Path, suffix: str) -> tuple[str, str] | None:
    if suffix in IMAGE_EXTS:
        from PIL import Image

        try:
            with Image.open(path) as im:
                im.load()
        except Exception as e:  # Pillow raises many types for broken files
            return UNREADABLE, f"image cannot be decoded: {e}"
        return None
    if suffix in VIDEO_EXTS or suffix in AUDIO_EXTS:
        import av

        try:
            with av.open(str(path)) as c:
                has_video, has_audio = bool(c.streams.video), bool(c.streams.audio)
                stream = c.streams.video[0] if has_video else (c.streams.audio[0] if has_audio else None)
                if stream is not None:
                    for _ in c.decode(stream):
                        break  # one decoded frame proves the stream is readable
        except Exception as e:  # PyAV raises FFmpeg errors of many types
            return UNREADABLE, f"cannot be decoded: {str(e).strip()[:120]}"
        if suffix in VIDEO_EXTS and not has_video:
            return UNREADABLE, "no video stream"
        if not has_audio:
            return NO_AUDIO, "no audio stream"
    return None


def probe_many(paths: Sequence[str | Path], deep: bool = False, workers: int = 8) -> list[tuple[str, str] | None]:
    """:func:`probe_file` over many paths (threads: the work is file I/O).

    Each parent folder is listed once, so files absent from a large folder cost no
    per-file system call.
    """
    listing: dict[str, set[str] | None] = {}
    out: list[tuple[str, str] | None] = [None] * len(paths)
    todo = []
    for i, p in enumerate(paths):
        parent, name = os.path.split(os.fspath(p))
        if parent not in listing:
            try:
                listing[parent] = {e.name for e in os.scandir(parent or ".")}
            except FileNotFoundError:
                listing[parent] = set()
            except OSError:
                listing[parent] = None  # unlistable: probe the file itself
        names = listing[parent]
        if names is not None and name not in names:
            out[i] = (MISSING, "does not exist")
        else:
            todo.append(i)
    if len(todo) < 64 or workers <= 1:
        results = [probe_file(paths[i], deep) for i in todo]
    else:
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(lambda i: probe_file(paths[i], deep), todo, chunksize=64))
    for i, res in zip(todo, results):
        out[i] = res
    return out


# -- building ---------------------------------------------------------------------
@dataclass
class Candidate:
    """A manifest row in the making and the files (relative to the root) it needs."""

    row: dict
    files: list[str]

    @classmethod
    def video(cls, dataset: str, sample_id: str, split: str, label: int, class_name: str, video: str) -> "Candidate":
        """A single-label clip in one video file (``video``, relative to the root)."""
        return cls({"sample_id": sample_id, "dataset": dataset, "split": split, "label": label,
                    "class_name": class_name, "video": video}, [video])


def finish(dataset: str, root: Path, candidates: Iterable[Candidate], report: Report, deep: bool = False,
           workers: int = 8, sorted_ids: bool = False) -> Manifest:
    """Probe the candidates' files, drop rows with a missing/unreadable file, record problems, return the manifest.

    A missing file is reported as ``<sample_id>: <path>``, an unreadable one as
    ``<sample_id>: <path> (<reason>)``. A row without an audio stream is kept and
    reported (the extraction stage marks it). ``sorted_ids``: relabel the kept
    single-label rows so that class ids index the sorted names of the classes kept.
    """
    cands = list(candidates)
    unique = sorted({f for c in cands for f in c.files})
    root_s = os.fspath(root)
    results = dict(zip(unique, probe_many([os.path.join(root_s, f) for f in unique], deep=deep, workers=workers)))
    rows = []
    for c in cands:
        bad = False
        for f in c.files:
            res = results[f]
            if res is None:
                continue
            kind, reason = res
            sid = c.row["sample_id"]
            if kind == MISSING:
                report.add(MISSING, f"{sid}: {f}")
                bad = True
            elif kind == UNREADABLE:
                report.add(UNREADABLE, f"{sid}: {f} ({reason})")
                bad = True
            else:
                report.add(kind, f"{sid}: {f}")
        if bad:
            report.dropped += 1
        else:
            rows.append(c.row)
    if sorted_ids:
        ids = {n: i for i, n in enumerate(sorted({r["class_name"] for r in rows}))}
        for r in rows:
            r["label"] = ids[r["class_name"]]
    manifest = Manifest(rows, source=f"{dataset} at {root}")
    report.counts = manifest.counts()
    return manifest


def first_occurrence(seen: dict[str, int], sid: str, lineno: int, source: str, report: Report) -> bool:
    """True the first time ``sid`` is met (recording its line in ``seen``); a repeat is
    reported as a duplicate of the first and the caller skips it."""
    if sid in seen:
        report.add(DUPLICATE, f"{sid}: {source} lines {seen[sid]} and {lineno}; kept the first")
        return False
    seen[sid] = lineno
    return True


def find_file(root: Path, names: Sequence[str], subdirs: Sequence[str] = ("",)) -> Path | None:
    """First existing ``root/<subdir>/<name>`` (name matched case-insensitively), or None."""
    for sub in subdirs:
        d = root / sub if sub else root
        if not d.is_dir():
            continue
        try:
            entries = {e.name.lower(): e for e in os.scandir(d) if e.is_file()}
        except OSError:
            continue
        for n in names:
            if n.lower() in entries:
                return Path(entries[n.lower()].path)
    return None


def _read_text(path: Path) -> str:
    try:
        # undecodable bytes become U+FFFD so that one bad line is reported, not fatal
        return path.read_bytes().decode("utf-8-sig", errors="replace")
    except OSError as e:
        raise BuildError(f"annotation file {path} cannot be read: {e.strerror or e}") from None


def read_csv_rows(path: Path, report: Report) -> list[tuple[int, list[str]]]:
    """(line number, fields) of every non-empty CSV row; lines that are not UTF-8 are reported and skipped."""
    lines = _read_text(path).splitlines()
    out = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if "\ufffd" in line:
            report.add(MALFORMED, f"{path.name}:{i}: not valid UTF-8")
            continue
        try:
            row = next(csv.reader([line]))
        except csv.Error as e:
            report.add(MALFORMED, f"{path.name}:{i}: {e}")
            continue
        out.append((i, row))
    return out


def read_text_lines(path: Path, report: Report) -> list[tuple[int, str]]:
    """(line number, stripped text) of every non-empty line; lines that are not UTF-8 are reported and skipped."""
    out = []
    for i, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        if "\ufffd" in line:
            report.add(MALFORMED, f"{path.name}:{i}: not valid UTF-8")
            continue
        out.append((i, line.strip()))
    return out


def index_media(root: Path, exts: Sequence[str] = VIDEO_EXTS) -> dict[str, list[str]]:
    """All media files under ``root``: file stem -> relative paths (sorted), hidden folders skipped."""
    out: dict[str, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in filenames:
            stem, ext = os.path.splitext(fn)
            if ext.lower() in exts:
                out.setdefault(stem, []).append(os.path.relpath(os.path.join(dirpath, fn), root))
    for v in out.values():
        v.sort()
    return out


def rel(path: Path, root: Path) -> str:
    return Path(os.path.relpath(path, root)).as_posix()


# -- checking a given manifest ----------------------------------------------------
def row_files(row: dict, root: Path) -> tuple[list[str], list[str]]:
    """Files a manifest row names, relative to ``root``, and the patterns/folders that match nothing.

    ``video``/``audio`` are files (``video`` may also be a frames folder);
    ``frames``/``masks`` are a file, a folder (its image files) or a glob pattern.
    """
    files: list[str] = []
    empty: list[str] = []
    for key in ("video", "frames", "masks", "audio"):
        v = row.get(key)
        if not v or not isinstance(v, str):
            continue
        p = root / v
        if any(ch in v for ch in "*?["):
            matches = sorted(glob.glob(str(p)))
            if matches:
                files.extend(rel(Path(m), root) for m in matches)
            else:
                empty.append(v)
        elif p.is_dir():
            inner = sorted(e.name for e in os.scandir(p) if e.is_file() and not e.name.startswith("."))
            if inner:
                files.extend(rel(p / n, root) for n in inner)
            else:
                empty.append(v + "/")
        elif v not in files:
            files.append(v)
    return files, empty


def check_manifest(manifest: Manifest, root: str | Path, deep: bool = False, workers: int = 8) -> tuple[Manifest, Report]:
    """Probe every file a manifest names under ``root``; returns the rows whose files are usable and the report."""
    root = Path(root)
    report = Report(dataset=manifest.dataset or "?", root=str(root), annotated=len(manifest))
    cands = []
    for r in manifest.rows:
        files, empty = row_files(r, root)
        if empty:
            for e in empty:
                report.add(MISSING, f"{r['sample_id']}: {e} (matches no file)")
            report.dropped += 1
            continue
        cands.append(Candidate(r, files))
    out = finish(manifest.dataset, root, cands, report, deep=deep, workers=workers)
    out.source = manifest.source
    return out, report
