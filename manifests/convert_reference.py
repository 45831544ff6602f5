"""Write the shipped protocol files from the benchmark reference data (a maintainer's tool).

Run once when the reference data changes::

    python manifests/convert_reference.py --reference /path/to/reference --out manifests/protocols

``--reference`` is a folder laid out as::

    splits/av-cil/{AVE,kinetics-sounds,VGGSound_100}.json   AV-CIL class orders and per-class id lists
    splits/cign-vgg-instruments/g{0..3}_{train,val,test}.txt CIGN VGGSound-Instruments lists
    avsbench/metav2s.csv, avsbench/metav2m.csv                AVSBench-semantic metadata

Nothing at run time or in the tests reads the reference folder; they read the
files this script writes. Output is deterministic (same input, same bytes).
See ``manifests/README.md`` for what each protocol is and where it comes from.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from avcl_core.protocols import Protocol, save_protocol, tasks_from_sizes  # noqa: E402

#: The VGGSound-100 list truncates this VGGSound class name; the id (position) is kept.
VS100_NAME_FIXES = {"subway, metr": "subway, metro, underground"}

#: Seeds of the class orders this script derives (published orders do not exist).
SEED_VGG100 = 0
SEED_VGG_SOURCES = 0
SEED_S4 = 0
SEED_MS3_STREAM = 0

AVCIL_CITE = 'Pian et al., "Audio-Visual Class-Incremental Learning", ICCV 2023'
CIGN_CITE = 'Mo et al., "Class-Incremental Grouping Network for Continual Audio-Visual Learning", ICCV 2023'
CLAVS_CITE = "CL-AVS benchmark (ATLAS; AVSBench single-/multi-source)"
CMR_CITE = 'CMR, "Taming Modality Entanglement in Continual Audio-Visual Segmentation" (arXiv 2510.17234)'


def _av_cil(path: Path, name: str, dataset: str, fixes: dict[str, str], shapes: list[tuple[str, int]]) -> list[Protocol]:
    d = json.loads(path.read_text(encoding="utf-8"))
    classes = [fixes.get(c, c) for c in d["classes"]]
    aliases = {old: new for old, new in fixes.items() if old in d["classes"]}
    splits, labels = {}, {}
    for split, per_class in d["splits"].items():
        ids = []
        for cid, members in per_class.items():
            for sid in members:
                if sid in labels and labels[sid] != int(cid):
                    raise SystemExit(f"{path}: sample {sid} is listed under classes {labels[sid]} and {cid}")
                labels[sid] = int(cid)
            ids.extend(members)
        splits[split] = frozenset(ids)
    out = []
    for pname, per_task in shapes:
        fixed = f"; display name fixed: {', '.join(f'{a!r} -> {b!r}' for a, b in aliases.items())}" if aliases else ""
        out.append(Protocol(
            name=pname,
            dataset=dataset,
            classes=tuple(classes),
            tasks=tasks_from_sizes(len(classes), per_task),
            setting="CIL",
            memory=int(d["memory_size"]),
            splits=splits,
            provenance=(
                f"{AVCIL_CITE}: {name} class order, per-class train/val/test video ids and total memory "
                f"{d['memory_size']} as published; task k holds classes [k*{per_task}, (k+1)*{per_task}){fixed}"
            ),
            aliases=aliases,
            sample_labels=labels,
        ))
    return out


def _cign_instruments(folder: Path) -> tuple[Protocol, int]:
    classes: list[str] = []
    tasks: list[tuple[int, ...]] = []
    splits: dict[str, set[str]] = {"train": set(), "val": set(), "test": set()}
    labels: dict[str, int] = {}
    dropped = 0
    for g in range(4):
        start = len(classes)
        for split in ("train", "val", "test"):
            f = folder / f"g{g}_{split}.txt"
            for lineno, line in enumerate(f.read_text(encoding="utf-8").splitlines(), start=1):
                if not line.strip():
                    continue
                sid, _, cname = line.strip().rpartition(",")
                if not sid or not cname:
                    raise SystemExit(f"{f}:{lineno}: expected '<vggsound id>,<class>', got {line!r}")
                if cname not in classes:
                    if split != "train":
                        raise SystemExit(f"{f}:{lineno}: class {cname!r} has no training list")
                    classes.append(cname)
                if sid == "-":  # placeholder rows of the published lists
                    dropped += 1
                    continue
                if sid in labels:
                    raise SystemExit(f"{f}:{lineno}: id {sid} listed twice")
                labels[sid] = classes.index(cname)
                splits[split].add(sid)
        tasks.append(tuple(range(start, len(classes))))
    p = Protocol(
        name="vgg-instruments-4x9",
        dataset="vgg-instruments",
        classes=tuple(classes),
        tasks=tuple(tasks),
        setting="CIL",
        memory=50 * len(classes),
        memory_per_class=50,
        splits={s: frozenset(v) for s, v in splits.items()},
        provenance=(
            f"{CIGN_CITE}: VGGSound-Instruments task lists g0..g3 (task k = classes of g<k>, in order of "
            f"first appearance in g<k>_train); {dropped} placeholder rows with id '-' dropped; memory 50 "
            "exemplars per old class as in the paper"
        ),
        sample_labels=labels,
    )
    return p, dropped


def _avsbench_classes(folder: Path) -> list[str]:
    """The 70 AVSBench-semantic classes: every ``a_obj`` token except the non-class ones, sorted."""
    rows = []
    for name in ("metav2s.csv", "metav2m.csv"):
        with open(folder / name, newline="", encoding="utf-8") as f:
            rows.extend(csv.DictReader(f))
    tokens = {t for r in rows for t in r["a_obj"].split("_")} - {"background", "off-the-screen"}
    return sorted(tokens)


# AVSBench S4 categories (the `category` column of s4_meta_data.csv).
S4_CATEGORIES = (
    "baby_laughter", "female_singing", "male_speech", "dog_barking", "cat_meowing", "lions_roaring",
    "horse_clip-clop", "coyote_howling", "mynah_bird_singing", "playing_acoustic_guitar", "playing_tabla",
    "playing_violin", "playing_piano", "playing_ukulele", "playing_glockenspiel", "helicopter", "race_car",
    "driving_buses", "ambulance_siren", "typing_on_computer_keyboard", "chainsawing_trees",
    "cap_gun_shooting", "lawn_mowing",
)


def build_all(reference: Path) -> list[Protocol]:
    av = reference / "splits" / "av-cil"
    ps: list[Protocol] = []
    ps += _av_cil(av / "AVE.json", "AVE", "ave", {}, [("ave-4x7", 7), ("ave-7x4", 4)])
    ps += _av_cil(av / "kinetics-sounds.json", "Kinetics-Sounds", "ks", {}, [("ks-5x6", 6)])
    vs100 = _av_cil(av / "VGGSound_100.json", "VGGSound-100", "vs100", VS100_NAME_FIXES, [("vs100-10x10", 10)])
    ps += vs100
    inst, _ = _cign_instruments(reference / "splits" / "cign-vgg-instruments")
    ps.append(inst)

    base = vs100[0]
    order = np.random.default_rng(SEED_VGG100).permutation(sorted(base.classes))
    ps.append(Protocol(
        name="vgg-100-4x25",
        dataset="vs100",
        classes=tuple(str(c) for c in order),
        tasks=tasks_from_sizes(100, 25),
        setting="CIL",
        memory=50 * 100,
        memory_per_class=50,
        splits=base.splits,
        provenance=(
            f"DERIVED: {CIGN_CITE} reports VGGSound-100 with T = 4 tasks but never published its classes, "
            "order or splits. This protocol uses the 100 classes and train/val/test lists of vs100-10x10 "
            f"(AV-CIL), ordered by numpy.random.default_rng({SEED_VGG100}).permutation(sorted class names); "
            "memory 50 exemplars per old class as in the paper"
        ),
        derived=True,
        seed=SEED_VGG100,
        aliases=base.aliases,
        sample_labels={s: list(order).index(base.classes[c]) for s, c in base.sample_labels.items()},
    ))
    ps.append(Protocol(
        name="vgg-sources-4x55",
        dataset="vgg-sources",
        classes=(),
        tasks=tasks_from_sizes(220, 55),
        setting="CIL",
        memory=50 * 220,
        memory_per_class=50,
        splits=None,
        provenance=(
            f"DERIVED: {CIGN_CITE} reports VGG-Sound Sources (220 VGGSound classes) with T = 4 tasks but never "
            "published the class order or splits. The class list is taken from the vgg-sources manifest when "
            f"the protocol is bound: sorted class names permuted by numpy.random.default_rng({SEED_VGG_SOURCES}); "
            "rows keep the manifest's own splits; memory 50 exemplars per old class"
        ),
        derived=True,
        seed=SEED_VGG_SOURCES,
    ))

    s4_order = tuple(str(c) for c in np.random.default_rng(SEED_S4).permutation(sorted(S4_CATEGORIES)))
    for setting in ("TIL", "CIL", "DIL"):
        ps.append(Protocol(
            name=f"s4-11-2-{setting.lower()}",
            dataset="avsbench-s4",
            classes=s4_order,
            tasks=tasks_from_sizes(23, 2, base=11),
            setting=setting,
            memory=0,
            splits=None,
            kind="segmentation",
            provenance=(
                f"{CLAVS_CITE}: AVSBench S4 '11-2' split (11 base classes, then 6 steps of 2; 7 tasks), "
                f"{setting}, exemplar-free (memory 0); the class of a clip is its S4 category. DERIVED class "
                f"order (none published): numpy.random.default_rng({SEED_S4}).permutation(sorted categories)"
                + ("; DIL: the same class groups arrive as domains of one binary (sounding / not) task"
                   if setting == "DIL" else "")
                + ("; TIL: the task id is given at test time" if setting == "TIL" else "")
            ),
            derived=True,
            seed=SEED_S4,
        ))
    ps.append(Protocol(
        name="ms3-taskfree",
        dataset="avsbench-ms3",
        classes=("sounding",),
        tasks=tuple((0,) for _ in range(50)),
        setting="task-free",
        memory=0,
        splits=None,
        kind="segmentation",
        provenance=(
            f"{CLAVS_CITE}: AVSBench MS3 task-free binary segmentation (no class labels), 50 tasks, exemplar-free. "
            "DERIVED stream (the paper's '31-5' stream was not published): training clips sorted by id, "
            f"permuted by numpy.random.default_rng({SEED_MS3_STREAM}), cut into 50 consecutive chunks; the "
            "order is random, so no task boundary carries a class shift to blur; val/test are evaluated whole"
        ),
        derived=True,
        seed=SEED_MS3_STREAM,
    ))

    avss_classes = _avsbench_classes(reference / "avsbench")
    if len(avss_classes) != 70:
        raise SystemExit(f"expected 70 AVSS classes in the metadata, found {len(avss_classes)}")
    classes = ("background", *avss_classes)
    for name, base_n, step in (("avss-60-10", 61, 10), ("avss-60-5", 61, 5), ("avss-65-s1", 66, 1)):
        ps.append(Protocol(
            name=name,
            dataset="avss",
            classes=classes,
            tasks=tasks_from_sizes(71, step, base=base_n),
            setting="CIL",
            memory=5 * 71,
            memory_per_class=5,
            splits=None,
            kind="segmentation",
            provenance=(
                f"{CMR_CITE}: AVSBench-semantic class-incremental split {name[5:]} over palette indices "
                f"(0 = background, 1..70 = the classes in alphabetical order = label2idx.json minus 1): "
                f"base {{0..{base_n - 1}}}, then steps of {step}; overlapped (a clip joins every step one of "
                "its sounding objects belongs to); memory 5 clips per class as in the paper"
            ),
        ))
    return ps


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", type=Path, required=True, help="reference data folder (layout above)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "protocols")
    args = ap.parse_args(argv)
    for p in build_all(args.reference):
        big = p.splits is not None and sum(len(v) for v in p.splits.values()) > 5000
        path = save_protocol(p, args.out / (p.name + (".json.gz" if big else ".json")))
        print(f"{path}  {p.dataset}  {p.setting}  {p.task_shape()}  {path.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
