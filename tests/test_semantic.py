"""Continual semantic audio-visual segmentation: the semantic problem, its metrics, the
synth-sem protocols, and the finetune / joint / lwf / mib / plop / cmr methods on them."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from avcl_core import seg_metrics as S
from avcl_core import synth
from avcl_core.cache import open_store
from avcl_core.manifest import Manifest
from avcl_core.protocols import load_protocol
from extract.encoders import build_encoder
from extract.runner import extract
from train.cli import main as train_main
from train.features import FeatureSet
from train.methods import build_method
from train.methods import semantic_losses as L
from train.problems_semantic import avss_iou_sums, avss_miou_from_sums, semantic_scores, shift_labels
from train.trainer import Trainer, read_acc_matrix

SIGNAL = dict(frames_per_clip=4, image_size=32, clip_seconds=1.0, dense_grid=4)
TINY = ["--epochs", "2", "--set", "batch_size=8", "--set", "head.d_model=32", "-q"]
METRICS = ("miou", "miou_base", "miou_new", "avss_miou")


# -- metrics against hand-computed confusion matrices ------------------------------------
def test_semantic_scores_match_a_hand_computed_confusion_matrix():
    # channels: 0 background, 1-2 task 0, 3 task 1, 4 task 2; evaluated after task 1
    cm = np.array([[50, 2, 0, 3, 0],
                   [5, 10, 0, 0, 0],
                   [0, 0, 0, 0, 0],   # class 2 absent from gt and prediction: skipped
                   [6, 0, 0, 6, 0],
                   [0, 0, 0, 0, 0]])
    iou0 = 50 / (55 + 61 - 50)
    iou1 = 10 / (15 + 12 - 10)
    iou3 = 6 / (12 + 9 - 6)
    sums, counts = np.array([1.5, 1.0, 0.0, 0.5, 0.0]), np.array([2, 2, 0, 1, 0])
    rows, steps = semantic_scores(cm, sums, counts, [0, 3, 4, 5], t=1)
    assert steps["miou"] == pytest.approx((iou0 + iou1 + iou3) / 3)
    assert steps["miou_base"] == pytest.approx((iou0 + iou1) / 2)
    assert steps["miou_new"] == pytest.approx(iou3)
    # official AVSS: classes with no frame count as 0, averaged over the 4 seen channels
    assert steps["avss_miou"] == pytest.approx((0.75 + 0.5 + 0 + 0.5) / 4)
    np.testing.assert_allclose(rows["miou"], [(iou0 + iou1) / 2, iou3, 0.0])
    np.testing.assert_allclose(rows["miou_base"], [(iou0 + iou1) / 2, np.nan, np.nan])
    np.testing.assert_allclose(rows["miou_new"], [np.nan, iou3, 0.0])
    np.testing.assert_allclose(rows["avss_miou"], [(0.75 + 0.5 + 0) / 3, 0.5, 0.0])
    _, first = semantic_scores(cm, sums, counts, [0, 3, 4, 5], t=0)
    assert math.isnan(first["miou_new"]) and first["miou"] == pytest.approx(first["miou_base"])


def test_avss_iou_is_per_frame_and_predictions_on_ignored_pixels_count():
    gt = np.array([[[0, 1], [1, 255]], [[0, 0], [2, 2]]])
    pred = np.array([[[0, 1], [0, 1]], [[0, 0], [0, 2]]])
    sums, counts = avss_iou_sums(pred, gt, 3)
    # frame 0: bg 1/2, class 1 {1,2} gt vs {1,3} pred (pixel 3 is ignored in gt, counted in pred) -> 1/3
    # frame 1: bg 2/3, class 2 1/2
    np.testing.assert_allclose(sums, [1 / 2 + 2 / 3, 1 / 3, 1 / 2])
    np.testing.assert_array_equal(counts, [2, 1, 1])
    assert avss_miou_from_sums(sums, counts) == pytest.approx(((1 / 2 + 2 / 3) / 2 + 1 / 3 + 1 / 2) / 3)
    assert avss_miou_from_sums(np.zeros(2), np.zeros(2, int)) == 0.0


def test_background_shift_keeps_current_classes_for_current_clips_and_seen_ones_for_memory():
    m = torch.tensor([[0, 1, 3, 4, 255], [0, 1, 3, 4, 255]], dtype=torch.uint8)
    out = shift_labels(m, torch.tensor([True, False]), n_old=3, n_seen=4)
    assert out.tolist() == [[0, 0, 3, 0, 255], [0, 1, 3, 0, 255]]


# -- loss pieces -----------------------------------------------------------------------
def test_mib_unbiased_losses_equal_their_probability_formulas():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 5, 3, 3, generator=g)
    zo = torch.randn(2, 3, 3, 3, generator=g)
    y = torch.tensor([0, 1, 3, 4, 255, 2, 0, 4, 3] * 2).view(2, 3, 3)
    p = torch.softmax(z, 1)
    lp_bg = torch.log(p[:, :3].sum(1))
    expect = []
    for b in range(2):
        for i in range(3):
            for j in range(3):
                lab = int(y[b, i, j])
                if lab == 255:
                    continue
                expect.append(-(lp_bg[b, i, j] if lab < 3 else torch.log(p[b, lab, i, j])))
    assert float(L.unbiased_ce(z, y, 3)) == pytest.approx(float(torch.stack(expect).mean()), rel=1e-5)
    q = torch.softmax(zo, 1)
    per = (q[:, 0] * torch.log(p[:, 0] + p[:, 3:].sum(1)) + (q[:, 1:] * torch.log(p[:, 1:3])).sum(1)) / 3
    assert float(L.unbiased_kd(z, zo)) == pytest.approx(float(-per.mean()), rel=1e-5)


def test_local_pod_by_hand_and_its_invariances():
    a = torch.rand(3, 4, 8, 8)
    assert float(L.local_pod(a, a)) == 0.0
    assert float(L.local_pod(a, 3 * a)) == pytest.approx(0.0, abs=1e-6)  # per-sample L2 normalisation
    # one scale, 1 channel, 2x2: strips are row means and column means of the squares
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    y = torch.zeros_like(x) + 1.0
    ex = torch.tensor([2.5, 12.5, 5.0, 10.0])  # rows (1+4)/2, (9+16)/2; columns (1+9)/2, (4+16)/2
    ey = torch.ones(4)
    expect = (ex / ex.norm() - ey / ey.norm()).norm()
    assert float(L.local_pod(x, y, scales=(1,))) == pytest.approx(float(expect), rel=1e-6)


def test_balanced_init_shares_the_background_probability():
    from train.trainer import GrowingClassifier

    clf = GrowingClassifier(4, 3)
    clf.grow(2)
    e = torch.randn(10, 4)
    p_bg_before = torch.softmax(torch.nn.functional.linear(e, clf.weight[:3], clf.bias[:3]), 1)[:, 0]
    L.balanced_init(clf, 3, 5)
    p = torch.softmax(clf(e), 1)
    torch.testing.assert_close(p[:, 0] + p[:, 3] + p[:, 4], p_bg_before)
    torch.testing.assert_close(p[:, 3], p[:, 0])


# -- synth-sem end to end ---------------------------------------------------------------
@pytest.fixture(scope="module")
def sem_data(tmp_path_factory):
    """A synth render (4 classes x 5 clips: 3 train, 1 val, 1 test each), its signal store
    with masks, and the synth-sem protocols for 4 classes (2-1: base 2 + background, two steps of 1)."""
    root = tmp_path_factory.mktemp("synthsem")
    m = synth.render(root, classes=4, clips_per_class=5, seed=0, workers=1, size=32, seconds=1.0, fps=8,
                     audio_rate=16000)
    protos = synth.write_sem_protocols(root / "semp", 4)
    enc = build_encoder("signal", **SIGNAL)
    s = extract(Manifest.load(m), root, enc, root / "cache", workers=0, progress=False)
    return {"root": root, "store": s.store, "protocols": {p.stem: str(p) for p in protos},
            "manifest": Manifest.load(m)}


def _trainer(sem_data, method="finetune", proto="synth-sem-2-1", **hp):
    fs = FeatureSet.from_stores([sem_data["store"]], streams={"visual": "visual_dense"})
    p = load_protocol(sem_data["protocols"][proto])
    m = build_method(method, {"epochs": 2, "batch_size": 8, **hp})
    return Trainer(fs, p, m, head="atlas", head_config={"d_model": 32}, seed=0)


def test_shipped_synth_sem_protocols_are_what_the_generator_writes(tmp_path):
    written = synth.write_sem_protocols(tmp_path, 12)
    assert sorted(p.stem for p in written) == ["synth-sem-6-6", "synth-sem-8-2", "synth-sem-twin-6-6",
                                               "synth-sem-twin-8-2"]
    for p in written:
        shipped = load_protocol(p.stem)
        assert shipped.to_dict() == load_protocol(str(p)).to_dict()
        assert shipped.kind == "semantic" and shipped.classes[0] == "background" and shipped.memory_per_class == 5
    p = load_protocol("synth-sem-8-2")
    assert [len(t) for t in p.tasks] == [9, 2, 2]


def test_twin_protocols_put_a_look_alike_of_every_later_class_in_the_base():
    p = load_protocol("synth-sem-twin-8-2")
    assert [len(t) for t in p.tasks] == [9, 2, 2]
    names = p.classes
    look = {n: n.split("-")[1:3] for n in names[1:]}  # c05-green-triangle-fs4 -> colour, shape
    base = [names[c] for c in p.tasks[0][1:]]
    later = [names[c] for t in p.tasks[1:] for c in t]
    assert later == ["c05-green-triangle-fs4", "c07-cyan-star-a4", "c09-blue-cross-c5", "c11-magenta-ring-ds5"]
    for n in later:  # exactly one base class looks the same (its twin), and none of the other later ones
        assert sum(look[b] == look[n] for b in base) == 1, n
        assert sum(look[m] == look[n] for m in later) == 1, n
    assert sorted(base + later) == list(names[1:])
    assert synth.twin_order(12, 7) is None and synth.twin_order(12, 6)[1] == [1, 3, 5, 7, 9, 11]


def test_semantic_masks_carry_the_class_of_the_sounding_object(sem_data):
    tr = _trainer(sem_data)
    binary = open_store(sem_data["store"]).read("masks")[tr.fs.rows]
    ch = tr.problem.masks.numpy()
    labels = tr.fs.class_ids
    # protocol synth-sem-2-1: channel = class id + 1 (classes in index order after background)
    np.testing.assert_array_equal(ch, binary * (labels + 1)[:, None, None, None])
    assert tr.offsets == [0, 3, 4, 5]
    # overlapped splits: task t holds the clips of its classes
    for t, idx in enumerate(tr.split_idx["train"]):
        assert set(labels[idx] + 1) == set(range(tr.offsets[t], tr.offsets[t + 1])) - {0}


def test_semantic_rows_equal_confusion_matrices_of_the_final_predictions(sem_data):
    tr = _trainer(sem_data, "finetune")
    res = tr.fit()
    A = res.extra["matrices"]
    C = tr.offsets[-1]
    cm = np.zeros((C, C), dtype=np.int64)
    test = np.unique(np.concatenate(tr.split_idx["test"]))
    binary = open_store(sem_data["store"]).read("masks")
    for i in test:
        out = tr.model(tr.fs.batch(torch.tensor([i]), tr._head_streams))
        pred = out["mask_logits"].argmax(2)[0].numpy()
        gt = binary[tr.fs.rows[i]] * (tr.fs.class_ids[i] + 1)
        cm += S.confusion_matrix(pred, gt, C)
    iou = S.iou_per_class(cm)
    assert A["miou"][-1, 0] == pytest.approx(np.nanmean(iou[:3]))
    assert A["miou"][-1, 1] == pytest.approx(np.nan_to_num(iou[3]))
    assert res.step_acc[-1] == pytest.approx(np.nanmean(iou))
    assert A["miou_new"][-1, 2] == pytest.approx(np.nan_to_num(iou[4]))


def test_per_class_iou_file_holds_each_steps_confusion_matrix_iou_and_survives_a_resume(sem_data, tmp_path):
    from train_fixtures import Interrupted, interrupt_before_task

    def trainer(d):
        fs = FeatureSet.from_stores([sem_data["store"]], streams={"visual": "visual_dense"})
        p = load_protocol(sem_data["protocols"]["synth-sem-2-1"])
        return Trainer(fs, p, build_method("finetune", {"epochs": 2, "batch_size": 8}), head="atlas",
                       head_config={"d_model": 32}, seed=0, run_dir=d)

    tr = trainer(tmp_path / "full")
    res = tr.fit()
    with open(tmp_path / "full" / "semantic_class_iou.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["channel", "class", "step_0", "step_1", "step_2"]
    assert [r[1] for r in rows[1:]] == tr.problem.channel_names()
    # the last column is the IoU of the final confusion matrix; a class is empty before its step
    iou = S.iou_per_class(tr.problem.last_confusion)
    for c, r in enumerate(rows[1:]):
        assert float(r[4]) == pytest.approx(iou[c])
        first = next(t for t in range(3) if c < tr.offsets[t + 1])
        assert all(v == "" for v in r[2: 2 + first]) and all(v != "" for v in r[2 + first:])
    # the step's all-class mIoU is the mean of its row over the seen classes
    for t in range(3):
        vals = [float(r[2 + t]) for r in rows[1:] if r[2 + t] != ""]
        assert np.mean(vals) == pytest.approx(res.step_acc[t])
    cut = interrupt_before_task(trainer(tmp_path / "cut"), 2)
    with pytest.raises(Interrupted):
        cut.fit()
    assert trainer(tmp_path / "cut").fit(resume=True).resumed_from == 2
    assert (tmp_path / "cut" / "semantic_class_iou.csv").read_text() == \
        (tmp_path / "full" / "semantic_class_iou.csv").read_text()


def test_methods_run_end_to_end_on_synth_sem_and_write_semantic_results(sem_data, tmp_path):
    proto = sem_data["protocols"]["synth-sem-2-1"]
    res = train_main(["--cache", sem_data["store"], "--protocol", proto,
                      "--method", "cmr,plop,mib,finetune,joint,lwf,ewc", "--out", str(tmp_path), *TINY])
    assert [r["status"] for r in res] == ["ok"] * 7, [r.get("traceback") or r.get("message") for r in res]
    for r in res:
        d = Path(r["run_dir"])
        cfg = json.loads((d / "config.json").read_text())
        assert cfg["problem"] == "semantic" and cfg["primary_metric"] == "miou"
        mats = {m: read_acc_matrix(d / "matrices" / f"{m}.csv") for m in METRICS}
        assert all(A.shape == (3, 3) for A in mats.values())
        assert np.all(np.isfinite(mats["miou"])) and np.all((mats["miou"] >= 0) & (mats["miou"] <= 1))
        np.testing.assert_array_equal(read_acc_matrix(d / "acc_matrix.csv"), mats["miou"])
        met = json.loads((d / "metrics.json").read_text())
        assert met["primary_metric"] == "miou" and set(met["per_metric"]) == set(METRICS)
        assert met["per_metric"]["miou_new"]["step"][0] is None
        table = (d / "semantic_table.md").read_text()
        assert table.count("\n| ") == 4  # header + 3 steps
        steps = (d / "semantic_steps.csv").read_text().splitlines()
        assert steps[0].startswith("step,n_seen") and len(steps) == 4
        assert float(steps[-1].split(",")[6]) == pytest.approx(met["per_metric"]["miou"]["step"][-1])
    # cmr leaves a record per task of what CSR counted and what MSS kept
    (d,) = [Path(r["run_dir"]) for r in res if Path(r["run_dir"]).parent.name == "cmr"]
    p = load_protocol(proto)
    names = p.classes
    rows = {r["sample_id"]: r for r in sem_data["manifest"]}
    for t in range(3):
        rec = json.loads((d / f"cmr_task{t}.json").read_text())
        assert rec["task"] == t and ("csr" in rec) == (t > 0)
        assert set(rec["mss"]) == {names[c] for c in p.tasks[t] if c != 0}
        for name, m in rec["mss"].items():
            assert 1 <= len(m["kept"]) <= min(5, m["candidates"])
            for k in m["kept"]:  # a training clip of that class, delta = AV - V
                row = rows[k["sample_id"]]
                assert row["split"] == "train" and names.index(name) - 1 in np.atleast_1d(row["label"])
                assert k["delta"] == pytest.approx(k["miou_av"] - k["miou_v"], abs=2e-4)
        if t:
            old = {names[c] for task in p.tasks[:t] for c in task if c != 0}
            assert set(rec["csr"]["frames_with_collisions"]) == old == set(rec["csr"]["buffer_entries"])
            assert sum(rec["csr"]["share"].values()) in (0.0, pytest.approx(1.0, abs=1e-3))


def test_cmr_keeps_mss_exemplars_and_resamples_by_collisions(sem_data):
    tr = _trainer(sem_data, "cmr", mss_epochs=1)
    tr.fit()
    cmr = tr.method
    mem = tr.memory.per_class()
    # every class keeps its candidates with the smallest |delta| (quota 5 >= 3 train clips: all of them)
    for c in range(1, tr.offsets[-1]):
        cand = tr.train_indices_of_class(c)
        assert sorted(mem[c].tolist()) == sorted(cand.tolist())
    assert mem[0].size == 0  # background is not remembered
    # the last task's candidates were ordered by |delta|
    last = tr.train_indices_of_class(tr.offsets[-1] - 1)
    d = np.abs([cmr.deltas[int(i)] for i in mem[tr.offsets[-1] - 1]])
    assert np.all(np.diff(d) >= 0) and set(mem[tr.offsets[-1] - 1]) == set(last)
    # CSR: proportions over old classes
    assert cmr.collisions and sum(cmr.collisions.values()) in (0.0, pytest.approx(1.0))
    tr.task = tr.T - 1
    tr.old_model = tr.model
    buf = cmr.rehearsal(tr.task, tr.memory.indices())
    assert buf.size == tr.memory.indices().size and set(buf) <= set(tr.memory.indices())


def test_mib_and_plop_refuse_a_binary_segmentation_protocol(sem_data, tmp_path):
    from train.trainer import TrainError

    fs = FeatureSet.from_stores([sem_data["store"]], streams={"visual": "visual_dense"})
    synth.write_seg_protocols(tmp_path, 4)
    p = load_protocol(str(tmp_path / "synth-seg-cil.json"))
    for name in ("mib", "plop", "cmr"):
        with pytest.raises(TrainError, match="semantic"):
            Trainer(fs, p, build_method(name, {"epochs": 1}), head="atlas", head_config={"d_model": 32}, seed=0)


def test_report_gives_seed_003s_table_and_per_class_pictures_for_semantic_runs(sem_data, tmp_path):
    from click.testing import CliRunner

    from train.report import make_report
    from train.report_cli import main as report_main

    proto = sem_data["protocols"]["synth-sem-2-1"]
    res = train_main(["--cache", sem_data["store"], "--protocol", proto, "--method", "finetune,joint",
                      "--seeds", "0,1", "--out", str(tmp_path / "runs"), *TINY])
    assert [r["status"] for r in res] == ["ok"] * 4
    rep = make_report([tmp_path / "runs"], tmp_path / "rep")
    name = load_protocol(proto).name
    t = rep.table
    assert [c[1] for c in t.columns] == ["step 0: 0–2", "step 0: all", "step 1: 0–2", "step 1: 3–3", "step 1: all",
                                         "step 2: 0–2", "step 2: 3–4", "step 2: all"]
    for method in ("finetune", "joint"):
        steps = [np.genfromtxt(tmp_path / "runs" / name / method / f"seed{s}" / "semantic_steps.csv",
                               delimiter=",", names=True, dtype=None, encoding=None) for s in (0, 1)]
        (row,) = [r for r in t.rows if t.runs_per_row[r][0].method == method]
        for col, (field, step) in zip(t.columns, [("miou_base", 0), ("miou_all", 0), ("miou_base", 1),
                                                  ("miou_new", 1), ("miou_all", 1), ("miou_base", 2),
                                                  ("miou_new", 2), ("miou_all", 2)]):
            cell = t.cells[(row, col)]
            assert cell.values == {s: pytest.approx(100 * steps[s][field][step]) for s in (0, 1)}
            assert cell.mean == pytest.approx(50 * (steps[0][field][step] + steps[1][field][step]))
    md = (tmp_path / "rep" / "table.md").read_text()
    assert f"### {name}: mIoU (%) after each step" in md and md.count("\n| ") == 3  # header, 2 methods
    assert {p.name for p in rep.plots} == {f"semantic_curves_{name}.png", f"class_iou_{name}.png"}
    assert all(p.stat().st_size > 5000 for p in rep.plots)
    out = CliRunner().invoke(report_main, [str(tmp_path / "runs"), "--out", str(tmp_path / "cli"), "--no-plots"])
    assert out.exit_code == 0, out.output
    assert (tmp_path / "cli" / "table.csv").read_text().splitlines()[0].startswith("method,method_id,head,")
