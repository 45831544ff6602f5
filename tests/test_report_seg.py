"""avcl-report on fabricated segmentation run directories (the trainer's run-directory contract)."""
from __future__ import annotations

import csv
import json
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from train.report import ReportError, build_table, load_runs, make_report, plot_mask_overlays, plot_maxf_heatmaps
from train.report_cli import main

SEG_METRICS = ("map", "maxf1", "fscore", "miou", "dice")
SUMMARY_KEYS = ("mean_accuracy", "average_forgetting", "learning_accuracy", "average_accuracy",
                "backward_transfer", "forward_transfer")


def write_matrix(path: Path, A: np.ndarray) -> None:
    """The trainer's matrix format (``write_acc_matrix``): header, one row per task, repr floats."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["after_task"] + [f"task_{i}" for i in range(A.shape[1])])
        for t in range(A.shape[0]):
            w.writerow([t] + [repr(float(x)) for x in A[t]])


def seg_matrix(rng, T, level, forget):
    """Lower triangle + superdiagonal measured (the next task is evaluated), NaN above."""
    A = np.full((T, T), np.nan)
    for t in range(T):
        for k in range(min(t + 2, T)):
            if k > t:
                A[t, k] = 0.2 * level + rng.uniform(0, 0.05)  # before training on it
            else:
                A[t, k] = level - forget * (t - k) + rng.uniform(-0.02, 0.02)
    return A


def write_seg_run(d: Path, method, seed, protocol="synth-seg-cil", T=4, level=0.7, forget=0.05,
                  metrics=SEG_METRICS, step_acc=True, overlays=True, image=True, per_metric_nulls=()):
    """A segmentation run directory exactly as the contract describes; returns its matrices."""
    d.mkdir(parents=True)
    rng = np.random.default_rng([zlib.crc32(f"{method}/{protocol}".encode()), seed])
    cfg = {"method": method, "protocol": protocol, "seed": seed, "head": "atlas",
           "hparams": {"lr": 1e-3}, "problem": "segmentation", "primary_metric": "map"}
    (d / "config.json").write_text(json.dumps(cfg))
    mats = {m: seg_matrix(rng, T, level * (0.9 if m != "map" else 1.0), forget) for m in metrics}
    write_matrix(d / "acc_matrix.csv", mats["map"])
    for m, A in mats.items():
        write_matrix(d / "matrices" / f"{m}.csv", A)
    per_metric = {}
    for m, A in mats.items():
        last = A[-1]
        per_metric[m] = {
            "mean_accuracy": float(np.mean([np.mean(A[t, : t + 1]) for t in range(T)])),
            "average_forgetting": None,  # "values may be null"
            "learning_accuracy": float(np.mean(np.diag(A))),
            "average_accuracy": float(np.mean(last)),
            "backward_transfer": float(np.mean(last[:-1] - np.diag(A)[:-1])),
            "forward_transfer": float(np.mean(np.diag(A, 1))),
        }
        for key in per_metric_nulls:
            per_metric[m][key] = None
    met = {k: per_metric["map"][k] for k in SUMMARY_KEYS if per_metric["map"][k] is not None}
    met.update(per_metric=per_metric, primary_metric="map")
    if step_acc:
        met["step_acc"] = [float(np.mean(mats["map"][t, : t + 1])) for t in range(T)]
    (d / "metrics.json").write_text(json.dumps(met))
    if overlays:
        K, H, W = 3, 32, 40
        gt = np.zeros((K, H, W), np.uint8)
        for k in range(K):
            gt[k, 6 + 3 * k: 20 + 3 * k, 8 + 4 * k: 26 + 4 * k] = 1
        shift = 0 if method == "atlas" else 5  # finetune's masks are off target
        prob = np.roll(gt, shift, axis=2).astype(np.float16) * np.float16(0.9) + np.float16(0.05)
        arrays = dict(sample_id=np.array([f"clip{k:03d}" for k in range(K)]), frame=np.array([0, 2, 4]),
                      prob=prob, gt=gt)
        if image:
            yy, xx = np.mgrid[0:H, 0:W]
            arrays["image"] = np.stack([np.stack([xx * 6, yy * 7, np.full_like(xx, 90)], -1)] * K).astype(np.uint8)
        np.savez(d / "overlays.npz", **arrays)
    return mats


def expected_aa_f(A):
    """Independent CL-AVS eq. 15 and eq. 16."""
    T = A.shape[0]
    aa = np.mean(A[T - 1])
    f = np.mean([max(A[t, k] for t in range(k, T)) - A[T - 1, k] for k in range(T - 1)])
    return aa, f


@pytest.fixture
def seg_root(tmp_path):
    root = tmp_path / "runs-seg"
    mats = {}
    for method, level, forget in (("finetune", 0.6, 0.12), ("atlas", 0.75, 0.03), ("ewc", 0.65, 0.06)):
        for seed in range(3):
            mats[(method, seed)] = write_seg_run(root / method / f"seed{seed}", method, seed, level=level,
                                                 forget=forget, step_acc=seed != 1)
    return root, mats


def md_table(markdown, first_header):
    lines = markdown.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("| Method |") and first_header in ln)
    rows = []
    for ln in lines[start:]:
        if not ln.startswith("|"):
            break
        rows.append([c.strip() for c in ln.strip("|").split("|")])
    header, body = rows[0], {r[0]: dict(zip(rows[0][1:], r[1:])) for r in rows[2:]}
    return header, body


def test_seg_table_shows_avg_map_and_forgetting_over_seeds(seg_root, tmp_path):
    root, mats = seg_root
    rep = make_report([root], tmp_path / "out", plots=False)
    assert rep.plots == []
    header, body = md_table(rep.markdown, "Avg mAP")
    assert header == ["Method", "synth-seg-cil Avg mAP ↑", "synth-seg-cil Avg For ↓"]
    assert list(body) == ["Fine-tuning", "EWC", "ATLAS"]  # baselines first, the paper's method last
    for method, name in (("atlas", "ATLAS"), ("finetune", "Fine-tuning")):
        aa, f = np.array([expected_aa_f(mats[(method, s)]["map"]) for s in range(3)]).T * 100
        cell_aa = body[name]["synth-seg-cil Avg mAP ↑"]
        cell_f = body[name]["synth-seg-cil Avg For ↓"]
        assert cell_aa.strip("*").startswith(f"{aa.mean():.2f} ± {aa.std(ddof=1):.2f}")
        assert cell_f.strip("*").startswith(f"{f.mean():.2f} ± {f.std(ddof=1):.2f}")
    # ATLAS forgets least and scores best here: bold in both columns
    assert body["ATLAS"]["synth-seg-cil Avg mAP ↑"].startswith("**")
    assert body["ATLAS"]["synth-seg-cil Avg For ↓"].startswith("**")
    # the detail table names which F it shows
    header, detail = md_table(rep.markdown, "Avg Max-F1")
    assert "synth-seg-cil Avg Max-F1 ↑" in header and "synth-seg-cil Avg F-score (β²=0.3) ↑" in header
    aa_f1 = np.mean([expected_aa_f(mats[("atlas", s)]["maxf1"])[0] for s in range(3)]) * 100
    assert detail["ATLAS"]["synth-seg-cil Avg Max-F1 ↑"].strip("*").startswith(f"{aa_f1:.2f}")
    assert "Max-F1 is the CL-AVS Max-F with β = 1" in rep.markdown
    assert "F-score (β²=0.3) is AVSBench's" in rep.markdown
    # CSV with full precision and the files listed
    assert [p.name for p in rep.files] == ["table.md", "table.csv", "table_detail.csv"]
    with rep.table_csv.open() as f:
        rows = {r["method_id"]: r for r in csv.DictReader(f)}
    aa = np.array([expected_aa_f(mats[("ewc", s)]["map"])[0] for s in range(3)]) * 100
    assert float(rows["ewc"]["synth-seg-cil/map/average_accuracy/mean"]) == pytest.approx(aa.mean(), rel=1e-9)


def test_summaries_missing_from_metrics_json_are_computed_from_the_matrix(tmp_path):
    # final_forgetting is never stored; average_accuracy null here: both come from the matrix
    mats = write_seg_run(tmp_path / "r", "atlas", 0, per_metric_nulls=("average_accuracy",))
    (run,) = load_runs([tmp_path])
    assert run.is_segmentation and run.primary_metric == "map"
    for m in SEG_METRICS:
        aa, f = expected_aa_f(mats[m])
        assert run.metrics[f"{m}/average_accuracy"] == pytest.approx(aa, rel=1e-12)
        assert run.metrics[f"{m}/final_forgetting"] == pytest.approx(f, rel=1e-12)
        assert run.metrics[f"{m}/forward_transfer"] == pytest.approx(np.mean(np.diag(mats[m], 1)), rel=1e-12)
    # a hand-computed case: 3 tasks
    A = np.array([[0.8, 0.1, np.nan], [0.6, 0.7, 0.2], [0.5, 0.65, 0.9]])
    d = tmp_path / "hand"
    write_seg_run(d, "finetune", 0, T=3, overlays=False)
    write_matrix(d / "acc_matrix.csv", A)
    write_matrix(d / "matrices" / "map.csv", A)
    met = json.loads((d / "metrics.json").read_text())
    met.pop("step_acc")
    met["per_metric"]["map"] = {}
    (d / "metrics.json").write_text(json.dumps(met))
    (run,) = load_runs([d])
    assert run.metrics["map/average_accuracy"] == pytest.approx((0.5 + 0.65 + 0.9) / 3)
    assert run.metrics["map/final_forgetting"] == pytest.approx(((0.8 - 0.5) + (0.7 - 0.65)) / 2)
    assert run.metrics["map/forward_transfer"] == pytest.approx((0.1 + 0.2) / 2)
    # without step_acc: the task-balanced mean of each row over the tasks seen
    np.testing.assert_allclose(run.step_acc, [0.8, 0.65, (0.5 + 0.65 + 0.9) / 3])


def _image(p):
    return np.asarray(Image.open(p).convert("RGB")).astype(int)


def test_seg_figures_are_written_and_readable(seg_root, tmp_path):
    root, _ = seg_root
    rep = make_report([root], tmp_path / "out")
    names = sorted(p.name for p in rep.plots)
    assert names == ["mask_overlays_synth-seg-cil.png", "maxf_heatmaps_synth-seg-cil.png",
                     "score_curves_synth-seg-cil.png", "score_matrices_synth-seg-cil.png",
                     "transfer_vs_forgetting_synth-seg-cil.png"]
    for p in rep.plots:
        img = _image(p)
        assert img.shape[0] > 400 and img.shape[1] > 600, p.name
        colours = (img[..., 0] << 16) | (img[..., 1] << 8) | img[..., 2]
        assert len(np.unique(colours)) > 100, p.name
    # overlays: red predicted fill and green ground-truth outlines are drawn
    img = _image(tmp_path / "out" / "mask_overlays_synth-seg-cil.png")
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    assert ((r > 150) & (g < 120) & (b < 150)).sum() > 500
    assert ((g > 170) & (r < 120) & (b < 120)).sum() > 200


def test_overlays_without_image_and_maxf_fallback(tmp_path):
    for seed in range(2):
        write_seg_run(tmp_path / f"a{seed}", "atlas", seed, metrics=("map", "fscore"), image=False)
    table = build_table(load_runs([tmp_path]))
    out = tmp_path / "out"
    out.mkdir()
    # without maxf1 matrices the heatmaps show AVSBench's F-score
    assert [p.name for p in plot_maxf_heatmaps(table, out)] == ["maxf_heatmaps_synth-seg-cil.png"]
    (overlay,) = plot_mask_overlays(table, out, max_frames=2)
    img = _image(overlay)
    assert ((img[..., 0] > 150) & (img[..., 1] < 120)).sum() > 200
    rep = make_report([tmp_path], tmp_path / "out2", seg_metrics=["fscore/average_accuracy"], plots=False)
    header, _ = md_table(rep.markdown, "Avg F-score")
    assert header == ["Method", "synth-seg-cil Avg F-score (β²=0.3) ↑"]


def test_classification_and_segmentation_together(seg_root, tmp_path):
    from tests.test_report import write_run

    root, _ = seg_root
    cls_root = tmp_path / "cls"
    for seed in range(2):
        write_run(cls_root / f"l{seed}", "lll", seed, 0.8 + 0.01 * seed, 0.05)
    alone = make_report([cls_root], tmp_path / "cls-only", plots=False)
    both = make_report([cls_root, root], tmp_path / "both", plots=False)
    # the classification table is exactly what it is without segmentation runs
    assert (tmp_path / "both" / "table.md").read_text() == alone.markdown
    assert both.table is not None and both.seg_table is not None
    assert both.markdown.startswith(alone.markdown)
    assert [p.name for p in both.files] == ["table.md", "table.csv", "seg_table.md", "seg_table.csv",
                                            "seg_table_detail.csv"]
    assert "synth-seg-cil Avg mAP" in (tmp_path / "both" / "seg_table.md").read_text()


def test_bad_segmentation_run_directories_are_named(tmp_path):
    d = tmp_path / "r"
    write_seg_run(d, "atlas", 0)
    write_matrix(d / "matrices" / "miou.csv", np.zeros((3, 3)))
    with pytest.raises(ReportError, match=r"matrices/miou.csv: 3 tasks, but acc_matrix.csv has 4"):
        load_runs([d])
    write_matrix(d / "matrices" / "miou.csv", np.zeros((4, 4)))
    np.savez(d / "overlays.npz", sample_id=np.array(["a"]), frame=np.array([0]), prob=np.zeros((1, 4, 4)))
    with pytest.raises(ReportError, match=r"overlays.npz: missing array 'gt'"):
        plot_mask_overlays(build_table(load_runs([d])), tmp_path)
    met = json.loads((d / "metrics.json").read_text())
    met["per_metric"]["map"]["average_accuracy"] = "high"
    (d / "metrics.json").write_text(json.dumps(met))
    with pytest.raises(ReportError, match=r"metrics.json: per_metric\['map'\]\['average_accuracy'\] = 'high'"):
        load_runs([d])
    with pytest.raises(ReportError, match="unknown metric 'map/best'"):
        build_table([], ["map/best"])


def test_cli_segmentation_columns(seg_root, tmp_path):
    root, _ = seg_root
    out = tmp_path / "rep"
    res = CliRunner().invoke(main, [str(root), "--out", str(out),
                                    "--seg-metrics", "map/average_accuracy,miou/average_accuracy", "--no-plots"])
    assert res.exit_code == 0, res.output
    assert "| Method | synth-seg-cil Avg mAP ↑ | synth-seg-cil Avg mIoU ↑ |" in res.output
    assert f"table: {out / 'table_detail.csv'}" in res.output and "plot:" not in res.output
    bad = CliRunner().invoke(main, [str(root), "--out", str(out), "--seg-metrics", "map/best"])
    assert bad.exit_code != 0 and "unknown metric 'map/best'" in bad.output
