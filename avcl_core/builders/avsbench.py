"""Manifest builders for AVSBench: S4 (single source), MS3 (multi source) and AVSS (semantic).

Released layouts (paths under the dataset root; S4/MS3 may also be given their
own folder as the root):

S4 — ``Single-source/s4_meta_data.csv`` (columns name, start time, category, split)::

    Single-source/s4_data/visual_frames/{split}/{category}/{name}/{name}_{1..5}.png
    Single-source/s4_data/gt_masks/{split}/{category}/{name}/{name}_{i}.png   train: i = 1; val/test: 1..5
    Single-source/s4_data/audio_wav/{split}/{category}/{name}.wav

MS3 — ``Multi-sources/ms3_meta_data.csv`` (columns video id, split)::

    Multi-sources/ms3_data/visual_frames/{vid}/{vid}.mp4_{1..5}.png   (no split folder)
    Multi-sources/ms3_data/gt_masks/{split}/{vid}/{vid}_{1..5}.png
    Multi-sources/ms3_data/audio_wav/{split}/{vid}.wav

AVSS (AVSBench-semantic) — ``metadata.csv`` (vid,uid,s_min,s_sec,a_obj,split,label)
and ``label2idx.json`` in the root, then per clip ``{label}/{uid}/``::

    frames/{i}.jpg  labels_rgb/{i}.png  labels_semantic/{i}.png  audio.wav
    v2: 10 frames, 10 masks; v1m: 5 and 5; v1s: 5 frames, masks 0..4 (train: only 0.png)

Rows fill ``frames``/``masks`` with image-sequence glob patterns (the manifest's
representation, see :mod:`avcl_core.manifest`) and ``audio`` with the wav;
``video`` is the frames folder. Class ids: S4 = sorted category names (the
class of a clip is its category); MS3 = the single class ``sounding`` (MS3 has
no class labels; its task is binary); AVSS = palette index (0 = background,
``label2idx.json`` value minus 1 for the classes), ``label`` = the list of a
clip's sounding objects (``off-the-screen`` is not a class and is dropped; a
clip with no class object is labelled background).
"""
from __future__ import annotations

import glob
import json
from pathlib import Path

import numpy as np

from avcl_core.builders.common import (
    MALFORMED, OFF_PALETTE, UNKNOWN_CLASS, BuildError, Candidate, Report, find_file, finish, first_occurrence,
    read_csv_rows, rel,
)
from avcl_core.manifest import SPLITS, Manifest, image_sequence

MS3_CLASS = "sounding"
NON_CLASS_TOKENS = ("off-the-screen",)


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p)


def _pattern(folder: str, prefix: str, suffix: str) -> str:
    """The image-sequence pattern ``folder/prefix*suffix`` (see :mod:`avcl_core.manifest`), its
    literal parts escaped so that a name holding ``[``, ``*`` or ``?`` matches only itself."""
    return f"{glob.escape(folder)}/{glob.escape(prefix)}*{glob.escape(suffix)}"


def _columns(header: list[str], wanted: dict[str, tuple[tuple[str, ...], int]]) -> dict[str, int]:
    """Column index per field: the first header name that matches, else the documented position."""
    low = [h.strip().lower() for h in header]
    out = {}
    for key, (names, pos) in wanted.items():
        out[key] = next((low.index(n) for n in names if n in low), pos)
    return out


def _meta(root: Path, sub: str, name: str, what: str) -> tuple[Path, str]:
    path = find_file(root, [name], subdirs=(sub, ""))
    if path is None:
        raise BuildError(f"{root}: no {sub}/{name} — the AVSBench {what} metadata file is expected there")
    return path, rel(path.parent, root) if path.parent != root else ""


def _table(csv_path: Path, report: Report) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """(header, data rows as (line number, fields)) of a metadata CSV; rows whose field count is not
    the header's are reported as malformed and left out. :class:`BuildError` when the file is empty."""
    lines = read_csv_rows(csv_path, report)
    if not lines:
        raise BuildError(f"{csv_path} is empty")
    header = lines[0][1]
    rows = []
    for lineno, row in lines[1:]:
        if len(row) != len(header):
            report.add(MALFORMED, f"{csv_path.name}:{lineno}: expected {len(header)} fields, got {len(row)}")
            continue
        rows.append((lineno, row))
    return header, rows


def build_s4(root: Path, deep: bool = False) -> tuple[Manifest, Report]:
    report = Report(dataset="avsbench-s4", root=str(root))
    csv_path, prefix = _meta(root, "Single-source", "s4_meta_data.csv", "S4")
    header, rows = _table(csv_path, report)
    col = _columns(header, {"name": (("name", "video_id", "vid"), 0), "category": (("category",), 2),
                            "split": (("split",), 3)})
    parsed = []
    for lineno, row in rows:
        name, cat, split = (row[col[k]].strip() for k in ("name", "category", "split"))
        if not name or not cat or split not in SPLITS:
            report.add(MALFORMED, f"{csv_path.name}:{lineno}: needs a name, a category and split "
                                  f"train/val/test, got {row!r}")
            continue
        parsed.append((lineno, name, cat, split))
    classes = sorted({p[2] for p in parsed})
    label = {c: i for i, c in enumerate(classes)}
    seen: dict[str, int] = {}
    cands = []
    for lineno, name, cat, split in parsed:
        if not first_occurrence(seen, name, lineno, csv_path.name, report):
            continue
        fdir = _join(prefix, "s4_data/visual_frames", split, cat, name)
        mdir = _join(prefix, "s4_data/gt_masks", split, cat, name)
        audio = _join(prefix, "s4_data/audio_wav", split, cat, f"{name}.wav")
        n_masks = 1 if split == "train" else 5
        files = [f"{fdir}/{name}_{i}.png" for i in range(1, 6)]
        files += [f"{mdir}/{name}_{i}.png" for i in range(1, n_masks + 1)]
        files.append(audio)
        cands.append(Candidate(
            {"sample_id": name, "dataset": "avsbench-s4", "split": split, "label": label[cat], "class_name": cat,
             "video": fdir, "frames": _pattern(fdir, f"{name}_", ".png"), "masks": _pattern(mdir, f"{name}_", ".png"),
             "audio": audio,
             "subset": "s4"},
            files,
        ))
    report.annotated = len(seen)
    return finish("avsbench-s4", root, cands, report, deep=deep, sorted_ids=True), report


def build_ms3(root: Path, deep: bool = False) -> tuple[Manifest, Report]:
    report = Report(dataset="avsbench-ms3", root=str(root))
    csv_path, prefix = _meta(root, "Multi-sources", "ms3_meta_data.csv", "MS3")
    header, rows = _table(csv_path, report)
    col = _columns(header, {"vid": (("video_id", "name", "vid", "uid"), 0), "split": (("split",), 1)})
    seen: dict[str, int] = {}
    cands = []
    for lineno, row in rows:
        vid, split = row[col["vid"]].strip(), row[col["split"]].strip()
        if not vid or split not in SPLITS:
            report.add(MALFORMED, f"{csv_path.name}:{lineno}: needs a video id and split train/val/test, got {row!r}")
            continue
        if not first_occurrence(seen, vid, lineno, csv_path.name, report):
            continue
        fdir = _join(prefix, "ms3_data/visual_frames", vid)
        mdir = _join(prefix, "ms3_data/gt_masks", split, vid)
        audio = _join(prefix, "ms3_data/audio_wav", split, f"{vid}.wav")
        files = [f"{fdir}/{vid}.mp4_{i}.png" for i in range(1, 6)]
        files += [f"{mdir}/{vid}_{i}.png" for i in range(1, 6)]
        files.append(audio)
        cands.append(Candidate(
            {"sample_id": vid, "dataset": "avsbench-ms3", "split": split, "label": 0, "class_name": MS3_CLASS,
             "video": fdir, "frames": _pattern(fdir, f"{vid}.mp4_", ".png"), "masks": _pattern(mdir, f"{vid}_", ".png"),
             "audio": audio,
             "subset": "ms3"},
            files,
        ))
    report.annotated = len(seen)
    return finish("avsbench-ms3", root, cands, report, deep=deep), report


def voc_palette(n: int) -> np.ndarray:
    """(n, 3) uint8 colours of the VOC bit-interleaved palette: index j's bits 0/1/2 of each
    3-bit group go, most significant first, into red/green/blue (index 1 = (128, 0, 0))."""
    out = np.zeros((n, 3), dtype=np.uint8)
    for j in range(n):
        lab, shift = j, 7
        while lab:
            for ch in range(3):
                out[j, ch] |= ((lab >> ch) & 1) << shift
            lab >>= 3
            shift -= 1
    return out


def _avss_classes(root: Path, rows: list[list[str]], a_col: int, report: Report) -> list[str]:
    """Class names by palette index (0 = background)."""
    path = find_file(root, ["label2idx.json"])
    if path is not None:
        try:
            mapping = json.loads(path.read_text(encoding="utf-8"))
            idx = {str(k): int(v) for k, v in mapping.items()}
        except (OSError, ValueError, AttributeError) as e:
            raise BuildError(f"{path} must map class names to integers: {e}") from None
        names = ["" for _ in range(max(idx.values()))]
        for k, v in idx.items():
            if v < 1:
                raise BuildError(f"{path}: index {v} of {k!r} is below 1 (background is 1)")
            names[v - 1] = k
        if names[0] != "background":
            raise BuildError(f"{path}: 'background' must map to 1, the first palette entry")
        gaps = [i + 1 for i, n in enumerate(names) if not n]
        if gaps:
            raise BuildError(f"{path}: no class has index {gaps[:5]}")
        return names
    tokens = {t for r in rows for t in r[a_col].split("_") if t} - {"background", *NON_CLASS_TOKENS}
    report.notes.append("no label2idx.json: class ids = 1 + position in the sorted sounding-object names")
    return ["background", *sorted(tokens)]


def build_avss(root: Path, deep: bool = False) -> tuple[Manifest, Report]:
    report = Report(dataset="avss", root=str(root))
    csv_path = find_file(root, ["metadata.csv"])
    if csv_path is None:
        raise BuildError(f"{root}: no metadata.csv — the AVSBench-semantic metadata (vid,uid,s_min,s_sec,a_obj,"
                         "split,label) is expected in the dataset root")
    header, rows = _table(csv_path, report)
    header = [h.strip().lower() for h in header]
    missing_cols = [c for c in ("uid", "a_obj", "split", "label") if c not in header]
    if missing_cols:
        raise BuildError(f"{csv_path}: header lacks column(s) {', '.join(missing_cols)}")
    col = {c: header.index(c) for c in ("uid", "a_obj", "split", "label")}
    good = []
    for lineno, row in rows:
        uid, a_obj, split, subset = (row[col[c]].strip() for c in ("uid", "a_obj", "split", "label"))
        if not uid or split not in SPLITS or subset not in ("v1s", "v1m", "v2"):
            report.add(MALFORMED, f"{csv_path.name}:{lineno}: needs a uid, split train/val/test and label "
                                  f"v1s/v1m/v2, got {row!r}")
            continue
        good.append((lineno, row, uid, a_obj, split, subset))
    names = _avss_classes(root, [g[1] for g in good], col["a_obj"], report)
    pal_of = {n: i for i, n in enumerate(names)}
    seen: dict[str, int] = {}
    cands = []
    for lineno, _, uid, a_obj, split, subset in good:
        if not first_occurrence(seen, uid, lineno, csv_path.name, report):
            continue
        labels: list[int] = []
        for tok in a_obj.split("_"):
            if not tok or tok in NON_CLASS_TOKENS:
                continue
            if tok not in pal_of:
                report.add(UNKNOWN_CLASS, f"{uid}: sounding object {tok!r} ({csv_path.name}:{lineno}) has no palette index")
                continue
            if pal_of[tok] not in labels:
                labels.append(pal_of[tok])
        labels = labels or [0]
        base = _join(subset, uid)
        n_frames = 10 if subset == "v2" else 5
        n_masks = 1 if (subset == "v1s" and split == "train") else n_frames
        masks = [f"{base}/labels_rgb/{i}.png" for i in range(n_masks)]
        files = [f"{base}/frames/{i}.jpg" for i in range(n_frames)] + masks + [f"{base}/audio.wav"]
        cands.append(Candidate(
            {"sample_id": uid, "dataset": "avss", "split": split, "label": labels,
             "class_name": ";".join(names[i] for i in labels), "video": f"{base}/frames",
             "frames": _pattern(f"{base}/frames", "", ".jpg"), "masks": _pattern(f"{base}/labels_rgb", "", ".png"),
             "audio": f"{base}/audio.wav",
             "subset": subset},
            files,
        ))
    report.annotated = len(seen)
    manifest = finish("avss", root, cands, report, deep=deep)
    if deep:
        _check_palette(root, manifest, voc_palette(len(names)), report)
    return manifest, report


def _check_palette(root: Path, manifest: Manifest, palette: np.ndarray, report: Report) -> None:
    """Report colour masks holding pixels whose colour is not a palette entry (they are not background)."""
    from PIL import Image

    codes = (palette[:, 0].astype(np.int64) << 16) | (palette[:, 1].astype(np.int64) << 8) | palette[:, 2]
    for r in manifest.rows:
        for p in image_sequence(r["masks"], root):
            with Image.open(p) as im:
                a = np.asarray(im.convert("RGB"), dtype=np.int64).reshape(-1, 3)
            px = (a[:, 0] << 16) | (a[:, 1] << 8) | a[:, 2]
            off = ~np.isin(px, codes)
            if off.any():
                bad = np.unique(px[off])
                eg = ", ".join(f"({c >> 16},{(c >> 8) & 255},{c & 255})" for c in bad[:3])
                report.add(OFF_PALETTE, f"{r['sample_id']}: {rel(p, root)} has {int(off.sum())} pixels in "
                                        f"{len(bad)} colours outside the palette, e.g. {eg}")
