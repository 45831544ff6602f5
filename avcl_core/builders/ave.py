"""AVE (Audio-Visual Event localization) manifest builder.

Released layout (dataset root = the unpacked ``AVE_Dataset`` folder)::

    Annotations.txt                  Category&VideoID&Quality&StartTime&EndTime (first line is that header)
    trainSet.txt valSet.txt testSet.txt   the split lists, same line format
    AVE/<VideoID>.mp4                 the 10 s videos

Rows: ``sample_id`` = the 11-character YouTube id, ``video`` = ``AVE/<id>.mp4``,
``class_name`` = the category; class ids index the sorted category names. A video
annotated with several events keeps one row: the category the AV-CIL list gives
that id (protocol ``ave-4x7``) when it is one of them, else its first annotation;
the others are reported. Event start/end times are not copied: the benchmarks
classify whole clips.
"""
from __future__ import annotations

from pathlib import Path

from avcl_core.builders.common import (
    DUPLICATE, MALFORMED, MISSING, NO_SPLIT, BuildError, Candidate, Report, find_file, finish, read_text_lines,
)
from avcl_core.manifest import Manifest
from avcl_core.protocols import ProtocolError, load_protocol, normalize_name

DATASET = "ave"
SPLIT_FILES = (("train", "trainSet.txt"), ("val", "valSet.txt"), ("test", "testSet.txt"))


def _parse(path: Path, report: Report) -> list[tuple[int, str, str]]:
    """(line number, category, video id) of each well-formed line; the header and bad lines are skipped."""
    out = []
    for lineno, line in read_text_lines(path, report):
        parts = line.split("&")
        if lineno == 1 and parts[0].strip().lower() == "category":
            continue
        if len(parts) == 1 and " " not in line:  # a bare id list
            out.append((lineno, "", line))
            continue
        if len(parts) != 5 or not parts[0].strip() or not parts[1].strip():
            report.add(MALFORMED, f"{path.name}:{lineno}: expected 5 '&'-separated fields, got {line[:60]!r}")
            continue
        out.append((lineno, parts[0].strip(), parts[1].strip()))
    return out


def build(root: Path, deep: bool = False) -> tuple[Manifest, Report]:
    report = Report(dataset=DATASET, root=str(root))
    ann = find_file(root, ["Annotations.txt"])
    if ann is None:
        raise BuildError(
            f"{root}: no Annotations.txt — the AVE annotation file ('Category&VideoID&Quality&StartTime&EndTime' "
            "per line) is expected in the dataset root"
        )
    entries = [e for e in _parse(ann, report) if e[1]]
    split_of: dict[str, str] = {}
    found = 0
    for split, fname in SPLIT_FILES:
        path = find_file(root, [fname])
        if path is None:
            report.add(MISSING, f"{fname} (split list; its videos get no split)")
            continue
        found += 1
        for lineno, _, vid in _parse(path, report):
            prev = split_of.setdefault(vid, split)
            if prev != split:
                report.add(DUPLICATE, f"{vid}: listed in {prev} and {split} ({fname}:{lineno}); kept {prev}")
    if not found:
        raise BuildError(f"{root}: none of the split lists {', '.join(f for _, f in SPLIT_FILES)} exists")

    try:
        listed = load_protocol("ave-4x7")
        ref = {sid: normalize_name(listed.classes[c]) for sid, c in (listed.sample_labels or {}).items()}
    except ProtocolError:
        ref = {}
    by_vid: dict[str, list[tuple[int, str]]] = {}
    for lineno, cat, vid in entries:
        by_vid.setdefault(vid, []).append((lineno, cat))
    classes = sorted({cat for _, cat, _ in entries})
    label = {c: i for i, c in enumerate(classes)}
    report.annotated = len(by_vid)
    cands = []
    for vid, anns in by_vid.items():
        cats = list(dict.fromkeys(c for _, c in anns))
        cat = cats[0]
        if len(cats) > 1:
            preferred = [c for c in cats if normalize_name(c) == ref.get(vid)]
            cat = preferred[0] if preferred else cats[0]
            report.add(DUPLICATE, f"{vid}: annotated as {', '.join(map(repr, cats))} "
                                  f"({ann.name} lines {', '.join(str(n) for n, _ in anns)}); kept {cat!r}")
        split = split_of.get(vid)
        if split is None:
            report.add(NO_SPLIT, f"{vid} ({ann.name}:{anns[0][0]})")
            report.dropped += 1
            continue
        cands.append(Candidate.video(DATASET, vid, split, label[cat], cat, f"AVE/{vid}.mp4"))
    return finish(DATASET, root, cands, report, deep=deep, sorted_ids=True), report
