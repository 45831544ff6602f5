"""Manifest builders: a dataset's official annotation files and folder layout -> (Manifest, Report).

Usage::

    from avcl_core.builders import build_manifest
    manifest, report = build_manifest("ave", "/data/AVE_Dataset")
    print(report.format())          # counts per split, missing/unreadable files with examples
    manifest.save("ave.jsonl")

A builder never stops on one bad row or file: malformed annotation lines,
duplicate ids, and missing or unreadable files are recorded in the report and
the manifest holds the rows whose files exist and look readable. It raises
:class:`BuildError` only when what it cannot do without is absent (e.g. the
annotation file). Layouts are documented in each module and in
``manifests/README.md``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from avcl_core.builders import ave, avsbench, vggsound
from avcl_core.builders.common import BuildError, Report, check_manifest
from avcl_core.manifest import Manifest

__all__ = ["BUILDERS", "BuildError", "Report", "build_manifest", "check_manifest", "dataset_names"]

#: dataset name -> (builder, one-line description of the expected root)
BUILDERS: dict[str, tuple[Callable[..., tuple[Manifest, Report]], str]] = {
    "ave": (ave.build, "AVE_Dataset/: Annotations.txt, trainSet/valSet/testSet.txt, AVE/<id>.mp4"),
    "ks": (vggsound.build_ks, "Kinetics clips anywhere below the root, named <ytid>[_<start>_<end>].mp4"),
    "vs100": (vggsound.build_vs100, "VGGSound: video/<ytid>_<start:06d>.mp4 (+ vggsound.csv, cross-checked)"),
    "vggsound": (vggsound.build_vggsound, "VGGSound: vggsound.csv, video/<ytid>_<start:06d>.mp4"),
    "vgg-instruments": (vggsound.build_vgg_instruments, "VGGSound: video/<ytid>_<start:06d>.mp4"),
    "vgg-sources": (vggsound.build_vgg_sources, "VGGSound: vggsound.csv, video/, vggss.json or vggss_classes.txt"),
    "avsbench-s4": (avsbench.build_s4, "AVSBench: Single-source/s4_meta_data.csv + s4_data/"),
    "avsbench-ms3": (avsbench.build_ms3, "AVSBench: Multi-sources/ms3_meta_data.csv + ms3_data/"),
    "avss": (avsbench.build_avss, "AVSBench-semantic: metadata.csv, label2idx.json, {v1s,v1m,v2}/<uid>/"),
}


def dataset_names() -> list[str]:
    return list(BUILDERS)


def build_manifest(dataset: str, root: str | Path, deep: bool = False) -> tuple[Manifest, Report]:
    """Build the manifest of ``dataset`` from the dataset folder ``root``.

    ``deep=True`` also decodes every video/audio file (PyAV) and image (Pillow) —
    slow, but it finds files that are corrupt past their header.
    """
    if dataset not in BUILDERS:
        raise BuildError(f"no builder for dataset {dataset!r}; known: {', '.join(BUILDERS)} "
                         "(or give your own manifest file)")
    root = Path(root)
    if not root.is_dir():
        raise BuildError(f"dataset root {root} is not a folder")
    return BUILDERS[dataset][0](root, deep=deep)
