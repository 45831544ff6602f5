"""Shipped protocols: published counts, task membership, memory rules, selection and bring-your-own protocols."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from avcl_core.manifest import Manifest
from avcl_core.paths import manifests_dir
from avcl_core.protocols import (
    ProtocolError, list_protocols, load_protocol, protocol_from_order, resolve_protocol, save_protocol,
)

EXPECTED = {
    "ave-4x7", "ave-7x4", "ks-5x6", "vs100-10x10", "vgg-instruments-4x9", "vgg-100-4x25", "vgg-sources-4x55",
    "s4-11-2-til", "s4-11-2-cil", "s4-11-2-dil", "ms3-taskfree", "avss-60-10", "avss-60-5", "avss-65-s1",
}


def _row(sid, split, label, name, dataset="x"):
    return {"sample_id": sid, "dataset": dataset, "split": split, "label": label, "class_name": name,
            "video": f"v/{sid}.mp4"}


def test_every_seed_protocol_ships():
    assert EXPECTED <= set(list_protocols())


@pytest.mark.parametrize("name,n_classes,per_task,counts,memory,quotas", [
    ("ave-4x7", 28, 7, (3294, 391, 394), 340, {7: 48, 14: 24, 21: 16, 28: 12}),
    ("ks-5x6", 30, 6, (19220, 1947, 1958), 500, {6: 83, 12: 41, 30: 16}),
    ("vs100-10x10", 100, 10, (51195, 5000, 5000), 1500, {10: 150, 20: 75, 100: 15}),
])
def test_av_cil_protocols_match_the_published_benchmarks(name, n_classes, per_task, counts, memory, quotas):
    p = load_protocol(name)
    assert (p.setting, p.kind, p.derived) == ("CIL", "classification", False)
    assert len(p.classes) == n_classes
    assert p.num_tasks == n_classes // per_task
    # task k holds protocol classes [k*C, (k+1)*C)
    assert p.tasks == tuple(tuple(range(k * per_task, (k + 1) * per_task)) for k in range(p.num_tasks))
    assert p.task_of_class(per_task) == 1 and p.task_of_class(n_classes - 1) == p.num_tasks - 1
    c = p.split_counts()
    assert (c["train"], c["val"], c["test"]) == counts
    assert not (p.splits["train"] & p.splits["test"]) and not (p.splits["train"] & p.splits["val"])
    assert p.memory == memory
    for n_seen, q in quotas.items():
        assert p.quota(n_seen) == q


def test_av_cil_sample_ids_have_the_documented_forms():
    ave, ks, vs = load_protocol("ave-4x7"), load_protocol("ks-5x6"), load_protocol("vs100-10x10")
    assert all(len(s) == 11 for s in ave.splits["train"])
    assert all(len(s) == 11 for s in ks.splits["test"])
    assert all(len(s) == 18 and s[11] == "_" and s[12:].isdigit() for s in vs.splits["val"])


def test_ave_first_task_and_7x4_variant():
    p4, p7 = load_protocol("ave-4x7"), load_protocol("ave-7x4")
    assert p4.classes[:7] == ("Acoustic guitar", "Cat", "Fixed-wing aircraft, airplane", "Frying (food)",
                              "Ukulele", "Helicopter", "Mandolin")
    assert p7.classes == p4.classes and p7.splits == p4.splits
    assert [len(t) for t in p7.tasks] == [4] * 7
    assert p7.task_of_class(4) == 1 and p7.quota(4) == 85


def test_vs100_truncated_name_is_fixed_with_a_stable_id():
    p = load_protocol("vs100-10x10")
    assert p.classes[14] == "subway, metro, underground"
    assert "subway, metr" not in p.classes
    assert p.class_index("subway, metr") == 14 == p.class_index("subway, metro, underground")


def test_vgg_instruments_drops_placeholders_and_keeps_cign_groups():
    p = load_protocol("vgg-instruments-4x9")
    assert len(p.classes) == 36 and [len(t) for t in p.tasks] == [9] * 4
    assert "-" not in set().union(*p.splits.values())
    assert sum(p.split_counts().values()) == 33438  # 33474 listed lines minus 36 '-' placeholders
    assert p.classes[p.tasks[0][0]] == "bass_guitar" and p.classes[p.tasks[3][-1]] == "snare_drum"
    assert p.quota(9) == p.quota(36) == 50


def test_derived_vgg100_is_seeded_and_reuses_vs100_lists():
    p, vs = load_protocol("vgg-100-4x25"), load_protocol("vs100-10x10")
    assert p.derived and p.seed is not None and "DERIVED" in p.provenance
    assert set(p.classes) == set(vs.classes) and p.classes != vs.classes
    assert p.classes == tuple(np.random.default_rng(p.seed).permutation(sorted(vs.classes)))
    assert p.splits == vs.splits and [len(t) for t in p.tasks] == [25] * 4
    sid = next(iter(vs.splits["test"]))
    assert p.classes[p.sample_labels[sid]] == vs.classes[vs.sample_labels[sid]]


def test_s4_protocols_share_a_derived_order_and_are_exemplar_free():
    ps = [load_protocol(f"s4-11-2-{s}") for s in ("til", "cil", "dil")]
    assert [p.setting for p in ps] == ["TIL", "CIL", "DIL"]
    for p in ps:
        assert p.dataset == "avsbench-s4" and p.kind == "segmentation" and p.memory == 0
        assert [len(t) for t in p.tasks] == [11] + [2] * 6 and p.task_shape() == "11+6x2"
        assert p.derived and "DERIVED" in p.provenance
        assert p.classes == ps[0].classes
    assert ps[0].classes == tuple(np.random.default_rng(ps[0].seed).permutation(sorted(ps[0].classes)))
    assert "lawn_mowing" in ps[0].classes and len(ps[0].classes) == 23


def test_avss_splits_use_palette_indices():
    names = {"avss-60-10": [61, 10], "avss-60-5": [61, 5, 5], "avss-65-s1": [66, 1, 1, 1, 1, 1]}
    for name, sizes in names.items():
        p = load_protocol(name)
        assert [len(t) for t in p.tasks] == sizes
        assert p.classes[0] == "background" and len(p.classes) == 71
        assert list(p.classes[1:]) == sorted(p.classes[1:])
        assert p.tasks[0] == tuple(range(sizes[0]))
        assert p.quota(61) == p.quota(71) == 5


def _avss_manifest():
    rows = [
        _row("a", "train", [1], "accordion", "avss"),
        _row("b", "train", [65, 3], "x;y", "avss"),
        _row("c", "train", [70], "z", "avss"),
        _row("d", "test", [61, 0], "w;background", "avss"),
    ]
    names = load_protocol("avss-60-10").classes
    for r in rows:
        r["class_name"] = ";".join(names[i] for i in r["label"])
    return Manifest(rows)


def test_segmentation_select_is_overlapped():
    p = load_protocol("avss-60-10")
    m = _avss_manifest()
    assert p.select(m, "train", [0]).tolist() == [0, 1]      # b has class 3 of the base task
    assert p.select(m, "train", [1]).tolist() == [1, 2]      # b also has class 65
    assert p.select(m, "test", [0]).tolist() == [3]
    assert p.select(m, "test").tolist() == [3]


def _ave_manifest(per_class=2):
    """A manifest over AV-CIL AVE ids whose class ids are NOT the protocol order (sorted names instead)."""
    p = load_protocol("ave-4x7")
    names = sorted(p.classes)
    rows = []
    for split in ("train", "val", "test"):
        taken = {}
        for sid in sorted(p.splits[split]):
            c = p.sample_labels[sid]
            if taken.get(c, 0) < per_class:
                taken[c] = taken.get(c, 0) + 1
                rows.append(_row(sid, split, names.index(p.classes[c]), p.classes[c], "ave"))
    rows.append(_row("notlistedid", "train", 0, names[0], "ave"))       # not in the AV-CIL lists
    rows.append(_row("otherclass0", "train", 28, "Didgeridoo", "ave"))  # a class outside the protocol
    return Manifest(rows), p, names


def test_label_map_and_select_follow_names_and_lists():
    m, p, names = _ave_manifest()
    lm = p.label_map(m)
    assert lm.dtype == np.int64 and len(lm) == 29
    assert [p.classes[i] for i in lm[:28]] == names and lm[28] == -1
    sel = p.select(m, "train", [1])
    assert len(sel) == 14
    assert {p.classes[lm[m[i]["label"]]] for i in sel} == set(p.classes[7:14])
    all_train = p.select(m, "train")
    assert len(all_train) == 56 and all(m[i]["sample_id"] in p.splits["train"] for i in all_train)
    assert np.all(np.diff(all_train) > 0)
    assert len(p.select(m, "test", [0, 3])) == 28
    with pytest.raises(ProtocolError, match="tasks 0..3"):
        p.select(m, "train", [4])


def test_label_map_falls_back_to_the_listed_samples_when_a_name_differs():
    m, p, names = _ave_manifest(per_class=1)
    renamed = [dict(r, class_name="Dog bark") if r["class_name"] == "Bark" else r for r in m.rows]
    m2 = Manifest(renamed)
    assert p.label_map(m2)[names.index("Bark")] == p.class_index("Bark")


def test_task_free_stream_partitions_training_rows():
    p = load_protocol("ms3-taskfree")
    rows = [_row(f"clip{i:03d}", "train", 0, "sounding", "avsbench-ms3") for i in range(296)]
    rows += [_row(f"test{i:02d}", "test", 0, "sounding", "avsbench-ms3") for i in range(64)]
    m = Manifest(rows)
    chunks = [p.select(m, "train", [t]) for t in range(50)]
    assert sorted(np.concatenate(chunks).tolist()) == list(range(296))
    assert {len(c) for c in chunks} == {5, 6}
    assert p.select(m, "train", [3]).tolist() == chunks[3].tolist()    # deterministic
    assert len(p.select(m, "test", [0])) == 64                          # test is not chunked
    shuffled = Manifest(list(reversed(rows)))                           # row order does not change the stream
    ids = lambda man, t: sorted(man[i]["sample_id"] for i in p.select(man, "train", [t]))
    assert ids(m, 7) == ids(shuffled, 7)


def test_unbound_protocol_takes_classes_from_the_manifest():
    p = load_protocol("vgg-sources-4x55")
    assert not p.bound and p.num_classes == 220 and p.derived
    names = [f"class {i:03d}" for i in range(220)]
    m = Manifest([_row(f"s{i}", "train", i, n) for i, n in enumerate(names)])
    b = p.bind(m)
    assert b.classes == tuple(np.array(sorted(names))[np.random.default_rng(p.seed).permutation(220)])
    assert len(b.select(m, "train", [0])) == 55
    with pytest.raises(ProtocolError, match="bind"):
        p.class_index("class 001")
    with pytest.raises(ProtocolError, match="220 classes.*has 219"):
        p.bind(Manifest(m.rows[:219]))


def test_no_global_random_state_is_touched():
    state = np.random.get_state()
    p = load_protocol("ms3-taskfree")
    m = Manifest([_row(f"c{i}", "train", 0, "sounding") for i in range(100)])
    p.select(m, "train", [0])
    load_protocol("vgg-sources-4x55").bind(Manifest([_row(f"s{i}", "train", i, f"n{i}") for i in range(220)]))
    after = np.random.get_state()
    assert state[0] == after[0] and np.array_equal(state[1], after[1]) and state[2:] == after[2:]


def test_unknown_protocol_names_the_available_ones():
    with pytest.raises(ProtocolError) as e:
        load_protocol("ave-4x8")
    assert "ave-4x7" in str(e.value) and "vs100-10x10" in str(e.value)
    with pytest.raises(ProtocolError, match="does not exist"):
        load_protocol("/nonexistent/p.json")


def test_save_and_load_round_trip(tmp_path):
    p = load_protocol("ave-4x7")
    for name in ("p.json", "p.json.gz"):
        path = save_protocol(p, tmp_path / name)
        q = load_protocol(str(path))
        assert q == p and q.sample_labels == p.sample_labels and q.aliases == p.aliases
    assert gzip.decompress((tmp_path / "p.json.gz").read_bytes()) == (tmp_path / "p.json").read_bytes()
    save_protocol(p, tmp_path / "again.json.gz")
    assert (tmp_path / "again.json.gz").read_bytes() == (tmp_path / "p.json.gz").read_bytes()


def test_hand_written_protocol_file(tmp_path):
    f = tmp_path / "mine.json"
    f.write_text(json.dumps({"name": "mine", "dataset": "x", "classes": list("abcdef"), "classes_per_task": 2,
                             "base": 2, "memory": 12, "splits": {"train": ["s1", "s2"]}}))
    p = load_protocol(str(f))
    assert p.tasks == ((0, 1), (2, 3), (4, 5)) and p.quota(4) == 3
    assert p.splits == {"train": frozenset({"s1", "s2"})} and p.sample_labels is None
    f.write_text(json.dumps({"name": "bad", "dataset": "x", "classes": ["a"], "tasks": [[0, 1]]}))
    with pytest.raises(ProtocolError, match=r"mine\.json: protocol 'bad': task class indices must lie in 0\.\.0"):
        load_protocol(str(f))


def test_protocol_from_order_and_errors():
    p = protocol_from_order("p", "d", list("abcdefghij"), 2, base=4, memory=20)
    assert p.tasks == ((0, 1, 2, 3), (4, 5), (6, 7), (8, 9)) and p.task_shape() == "4+3x2"
    assert p.quota(4) == 5 and p.seen_classes(1) == (0, 1, 2, 3, 4, 5)
    with pytest.raises(ProtocolError, match="not a multiple of 3"):
        protocol_from_order("p", "d", list("abcdefghij"), 3)
    with pytest.raises(ProtocolError, match="twice"):
        protocol_from_order("p", "d", ["a", "a"], 1)


def test_resolve_protocol_bring_your_own(tmp_path):
    m = Manifest([_row(f"s{i}", "train", i % 4, "wxyz"[i % 4], "mine") for i in range(8)])
    p = resolve_protocol(None, m, class_order="sorted", classes_per_task=2)
    assert p.classes == ("w", "x", "y", "z") and p.dataset == "mine"
    p = resolve_protocol("order", m, class_order="z,y,x,w", classes_per_task=2, memory=8)
    assert p.name == "order" and p.classes == ("z", "y", "x", "w") and p.memory == 8
    assert p.select(m, "train", [0]).tolist() == [2, 3, 6, 7]
    assert resolve_protocol(None, m, class_order="3,2,1,0", classes_per_task=2).classes == ("z", "y", "x", "w")
    f = tmp_path / "order.txt"
    f.write_text("x\nw, with comma\n")
    m2 = Manifest([_row("a", "train", 0, "x"), _row("b", "train", 1, "w, with comma")])
    assert resolve_protocol(None, m2, class_order=str(f), classes_per_task=1).classes == ("x", "w, with comma")
    with pytest.raises(ProtocolError, match="not in manifest.*'q'"):
        resolve_protocol(None, m, class_order="w,q", classes_per_task=1)
    with pytest.raises(ProtocolError, match="classes per task"):
        resolve_protocol(None, m, class_order="sorted")
    assert resolve_protocol("ave-4x7").name == "ave-4x7"
    with pytest.raises(ProtocolError, match="shares no class"):
        resolve_protocol("ave-4x7", m)


def test_shipped_manifests_stay_small():
    total = sum(f.stat().st_size for f in Path(manifests_dir()).rglob("*") if f.is_file())
    assert total < 10 * 2**20
