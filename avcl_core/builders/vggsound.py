"""Manifest builders for VGGSound and the benchmarks cut from it, and for Kinetics-Sounds.

Released layout of VGGSound (dataset root)::

    vggsound.csv          youtube_id,start_seconds,label,split  (no header; split train/test)
    video/<youtube_id>_<start:06d>.mp4

``sample_id`` = ``<youtube_id>_<start seconds, 6 digits>``; ``video`` = ``video/<sample_id>.mp4``.

- ``vggsound``: every csv row, class ids = sorted label names, split = the csv's.
- ``vs100``: the clips of the AV-CIL VGGSound-100 lists (protocol ``vs100-10x10``),
  split and class from those lists (class ids = that class order); ``vggsound.csv``,
  when present, is cross-checked (ids it lacks, labels that differ).
- ``vgg-instruments``: the clips of the CIGN VGGSound-Instruments lists (protocol
  ``vgg-instruments-4x9``), same videos folder; class names are the lists'
  (e.g. ``bass_guitar``).
- ``vgg-sources``: the csv rows whose label is one of the VGG-Sound Sources classes,
  read from ``vggss.json`` (the VGG-SS annotation: a list of objects with a
  ``class`` field) or ``vggss_classes.txt`` (one name per line); class ids = sorted names.
- ``ks``: the clips of the AV-CIL Kinetics-Sounds lists (protocol ``ks-5x6``):
  ``sample_id`` = the 11-character YouTube id as in those lists; the video is
  found anywhere under the root as ``<id>.<ext>`` or ``<id>_<start>_<end>.<ext>``
  (the Kinetics release names clips ``<id>_<start:06d>_<end:06d>.mp4``, under
  ``<split>/`` or ``<split>/<label>/``).
"""
from __future__ import annotations

import json
from pathlib import Path

from avcl_core.builders.common import (
    DUPLICATE, LABEL_DIFFERS, MALFORMED, MISSING, NOT_ANNOTATED, UNKNOWN_CLASS, VIDEO_EXTS, BuildError, Candidate,
    Report, find_file, finish, first_occurrence, index_media, read_csv_rows, read_text_lines,
)
from avcl_core.manifest import SPLITS, Manifest
from avcl_core.protocols import Protocol, load_protocol, normalize_name


def sample_id(ytid: str, start: int) -> str:
    """VGGSound clip id: ``<youtube id>_<start seconds zero-padded to 6 digits>``."""
    return f"{ytid}_{int(start):06d}"


def read_vggsound_csv(path: Path, report: Report) -> list[tuple[int, str, str, str]]:
    """(line number, sample id, label, split) of each well-formed row of ``vggsound.csv``."""
    out = []
    for lineno, row in read_csv_rows(path, report):
        if len(row) != 4:
            report.add(MALFORMED, f"{path.name}:{lineno}: expected 4 fields (id,start,label,split), got {len(row)}")
            continue
        ytid, start, label, split = (x.strip() for x in row)
        try:
            start_s = int(float(start))
        except ValueError:
            if lineno == 1:  # a header line
                continue
            report.add(MALFORMED, f"{path.name}:{lineno}: start seconds {start!r} is not a number")
            continue
        if not ytid or not label or split not in ("train", "test"):
            report.add(MALFORMED, f"{path.name}:{lineno}: needs an id, a label and split train/test, got {row!r}")
            continue
        out.append((lineno, sample_id(ytid, start_s), label, split))
    return out


def _require_csv(root: Path) -> Path:
    path = find_file(root, ["vggsound.csv"])
    if path is None:
        raise BuildError(
            f"{root}: no vggsound.csv — VGGSound's annotation file (youtube_id,start_seconds,label,split per "
            "line) is expected in the dataset root, with the clips in video/"
        )
    return path


def _from_csv(dataset: str, root: Path, deep: bool, rows: list[tuple[int, str, str, str]], report: Report) -> Manifest:
    classes = sorted({r[2] for r in rows})
    label = {c: i for i, c in enumerate(classes)}
    seen: dict[str, int] = {}
    cands = []
    for lineno, sid, cname, split in rows:
        if not first_occurrence(seen, sid, lineno, "vggsound.csv", report):
            continue
        cands.append(Candidate.video(dataset, sid, split, label[cname], cname, f"video/{sid}.mp4"))
    report.annotated = len(cands)
    return finish(dataset, root, cands, report, deep=deep, sorted_ids=True)


def build_vggsound(root: Path, deep: bool = False) -> tuple[Manifest, Report]:
    report = Report(dataset="vggsound", root=str(root))
    rows = read_vggsound_csv(_require_csv(root), report)
    return _from_csv("vggsound", root, deep, rows, report), report


def _vggss_classes(root: Path, report: Report) -> set[str]:
    js = find_file(root, ["vggss.json"], subdirs=("", "metadata"))
    if js is not None:
        try:
            data = json.loads(js.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BuildError(f"{js} cannot be read as JSON: {e}") from None
        items = data if isinstance(data, list) else []
        names = {str(it["class"]).strip() for it in items if isinstance(it, dict) and it.get("class")}
        bad = sum(1 for it in items if not (isinstance(it, dict) and it.get("class")))
        if bad:
            report.add(MALFORMED, f"{js.name}: {bad} entries without a 'class' field")
        if names:
            return names
    txt = find_file(root, ["vggss_classes.txt"], subdirs=("", "metadata"))
    if txt is not None:
        return {line for _, line in read_text_lines(txt, report)}
    raise BuildError(
        f"{root}: no VGG-Sound Sources class list — put vggss.json (its entries' 'class' fields) or "
        "vggss_classes.txt (one VGGSound class per line) in the dataset root or metadata/"
    )


def build_vgg_sources(root: Path, deep: bool = False) -> tuple[Manifest, Report]:
    report = Report(dataset="vgg-sources", root=str(root))
    wanted = _vggss_classes(root, report)
    rows = read_vggsound_csv(_require_csv(root), report)
    for c in sorted(wanted - {r[2] for r in rows}):
        report.add(UNKNOWN_CLASS, f"{c!r}: in the VGG-Sound Sources class list, not a label of vggsound.csv")
    manifest = _from_csv("vgg-sources", root, deep, [r for r in rows if r[2] in wanted], report)
    usable = {r["class_name"] for r in manifest.rows}
    report.notes.append(f"{len(wanted)} VGG-Sound Sources classes listed, {len(usable)} with usable clips")
    return manifest, report


def _from_lists(dataset: str, protocol: Protocol, root: Path, report: Report, video_of) -> list[Candidate]:
    """Candidates from a protocol's per-class split lists: class ids = the protocol's class order."""
    labels = protocol.sample_labels or {}
    cands = []
    for split in SPLITS:
        ids = protocol.splits.get(split, frozenset()) if protocol.splits else frozenset()
        for sid in sorted(ids, key=lambda s: (labels.get(s, -1), s)):
            c = labels[sid]
            video = video_of(sid)
            if video is None:
                report.add(MISSING, f"{sid}: no video file named {sid}.* or {sid}_*.* under the root")
                report.dropped += 1
                continue
            cands.append(Candidate.video(dataset, sid, split, c, protocol.classes[c], video))
    report.annotated = len(labels)
    return cands


def _cross_check_csv(root: Path, protocol: Protocol, report: Report) -> None:
    path = find_file(root, ["vggsound.csv"])
    if path is None:
        report.notes.append("no vggsound.csv in the root: clips taken from the benchmark lists only")
        return
    csv_label = {sid: label for _, sid, label, _ in read_vggsound_csv(path, report)}
    labels = protocol.sample_labels or {}
    for sid in sorted(labels):
        if sid not in csv_label:
            report.add(NOT_ANNOTATED, f"{sid}: in the {protocol.name} lists, not in vggsound.csv")
            continue
        want = protocol.classes[labels[sid]]
        got = csv_label[sid]
        if normalize_name(got) != normalize_name(want) and protocol.aliases.get(got) != want:
            report.add(LABEL_DIFFERS, f"{sid}: vggsound.csv says {got!r}, {protocol.name} says {want!r} (kept)")


def build_vs100(root: Path, deep: bool = False) -> tuple[Manifest, Report]:
    report = Report(dataset="vs100", root=str(root))
    p = load_protocol("vs100-10x10")
    _cross_check_csv(root, p, report)
    cands = _from_lists("vs100", p, root, report, lambda sid: f"video/{sid}.mp4")
    return finish("vs100", root, cands, report, deep=deep), report


def build_vgg_instruments(root: Path, deep: bool = False) -> tuple[Manifest, Report]:
    report = Report(dataset="vgg-instruments", root=str(root))
    p = load_protocol("vgg-instruments-4x9")
    cands = _from_lists("vgg-instruments", p, root, report, lambda sid: f"video/{sid}.mp4")
    return finish("vgg-instruments", root, cands, report, deep=deep), report


def build_ks(root: Path, deep: bool = False) -> tuple[Manifest, Report]:
    report = Report(dataset="ks", root=str(root))
    if not root.is_dir():
        raise BuildError(f"{root} is not a folder")
    p = load_protocol("ks-5x6")
    by_id: dict[str, list[str]] = {}
    for stem, paths in index_media(root, VIDEO_EXTS).items():
        if len(stem) == 11 or (len(stem) > 11 and stem[11] == "_"):
            by_id.setdefault(stem[:11], []).extend(paths)
    for sid, paths in by_id.items():
        if len(paths) > 1 and sid in (p.sample_labels or {}):
            report.add(DUPLICATE, f"{sid}: {len(paths)} video files ({', '.join(paths[:3])}); used {sorted(paths)[0]}")
    cands = _from_lists("ks", p, root, report, lambda sid: sorted(by_id[sid])[0] if sid in by_id else None)
    return finish("ks", root, cands, report, deep=deep), report
