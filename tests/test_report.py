"""avcl-report on fabricated run directories with known numbers."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from scipy import stats

from avcl_core import metrics as M
from train.report import ReportError, build_table, load_runs, make_report
from train.report_cli import main

PROTO = "ave-4x7"
# seed -> (mean accuracy, average forgetting), fractions
KNOWN = {
    "lll": {0: (0.80, 0.05), 1: (0.82, 0.03), 2: (0.84, 0.04)},
    "icarl-fc": {0: (0.60, 0.01), 1: (0.65, 0.02), 2: (0.61, 0.03)},
}


def write_run(d: Path, method, seed, mean_acc, forgetting, head="guided", protocol=PROTO,
              hparams=None, T=4, drop=()):
    """A run directory as the trainer writes it; ``drop`` removes metrics.json keys."""
    d.mkdir(parents=True)
    rng = np.random.default_rng(seed + 10 * len(method))
    A = np.tril(rng.uniform(0.3, 0.95, size=(T, T)))
    A[np.triu_indices(T, 1)] = rng.uniform(0.0, 0.1, size=T * (T - 1) // 2)
    step_acc = mean_acc + np.linspace(0.06, -0.06, T)
    cfg = {"method": method, "head": head, "protocol": protocol, "seed": seed,
           "hparams": hparams or {"lr": 5e-5}, "classes_per_task": 7}
    (d / "config.json").write_text(json.dumps(cfg))
    with (d / "acc_matrix.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["after_task"] + [f"task_{i}" for i in range(T)])
        for t in range(T):
            w.writerow([t] + [f"{v:.6f}" for v in A[t]])
    met = {k: v for k, v in M.summarize(A, step_acc).items()}
    met.update(step_acc=step_acc.tolist(), mean_accuracy=mean_acc, average_forgetting=forgetting)
    for k in drop:
        met.pop(k)
    (d / "metrics.json").write_text(json.dumps(met))
    return A


@pytest.fixture
def runs_root(tmp_path):
    root = tmp_path / "runs"
    for method, per_seed in KNOWN.items():
        for seed, (acc, forg) in per_seed.items():
            # directory names sort in a different order than seeds: pairing must use the seed
            write_run(root / method / f"run-{(seed * 2) % 3}", method, seed, acc, forg)
    return root


def md_rows(markdown):
    lines = [ln for ln in markdown.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    body = {}
    for ln in lines[2:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        body[cells[0]] = dict(zip(header[1:], cells[1:]))
    return header, body


def test_table_cells_bold_and_p_values(runs_root, tmp_path):
    rep = make_report([runs_root], tmp_path / "out")
    header, body = md_rows(rep.markdown)
    assert header == ["Method", "ave-4x7 Mean Acc. ↑", "ave-4x7 Avg. Forgetting ↓"]
    # paper names and table order (baselines first, ours last)
    assert list(body) == ["iCaRL-FC", "LLL"]
    acc, forg = header[1], header[2]

    # lll accuracy 80, 82, 84 -> 82.00 ± 2.00 (best); iCaRL-FC 60, 65, 61 -> 62.00 ± sqrt(7)
    p_acc = stats.ttest_rel([60.0, 65.0, 61.0], [80.0, 82.0, 84.0]).pvalue
    assert body["LLL"][acc] == "**82.00 ± 2.00**"
    assert body["iCaRL-FC"][acc] == f"62.00 ± 2.65 (p={p_acc:.3f})"
    # forgetting: lower is better -> iCaRL-FC (1, 2, 3 -> 2.00 ± 1.00) is bold, not lll (4.00 ± 1.00)
    p_forg = stats.ttest_rel([5.0, 3.0, 4.0], [1.0, 2.0, 3.0]).pvalue
    assert body["iCaRL-FC"][forg] == "**2.00 ± 1.00**"
    assert body["LLL"][forg] == f"4.00 ± 1.00 (p={p_forg:.3f})"
    assert "paired t-test" in rep.markdown and "best method of that column" in rep.markdown

    with rep.table_csv.open() as f:
        rows = list(csv.DictReader(f))
    cols = ["method", "method_id", "head"] + [
        f"{PROTO}/{m}/{k}" for m in ("mean_accuracy", "average_forgetting")
        for k in ("mean", "std", "n", "p_vs_best", "is_best")
    ]
    assert list(rows[0]) == cols
    icarl = rows[0]
    assert icarl["method"] == "iCaRL-FC" and icarl["method_id"] == "icarl-fc"
    assert float(icarl[f"{PROTO}/mean_accuracy/mean"]) == pytest.approx(62.0)
    assert float(icarl[f"{PROTO}/mean_accuracy/std"]) == pytest.approx(np.sqrt(7.0))
    assert icarl[f"{PROTO}/mean_accuracy/n"] == "3"
    assert float(icarl[f"{PROTO}/mean_accuracy/p_vs_best"]) == pytest.approx(p_acc, rel=1e-12)
    assert icarl[f"{PROTO}/mean_accuracy/is_best"] == "0"
    assert icarl[f"{PROTO}/average_forgetting/is_best"] == "1"
    assert icarl[f"{PROTO}/average_forgetting/p_vs_best"] == ""
    assert float(rows[1][f"{PROTO}/average_forgetting/p_vs_best"]) == pytest.approx(p_forg, rel=1e-12)


def test_plots_are_written_and_non_trivial(runs_root, tmp_path):
    rep = make_report([runs_root / "lll", runs_root / "icarl-fc"], tmp_path / "out")
    names = sorted(p.name for p in rep.plots)
    assert names == ["acc_matrices_ave-4x7.png", "accuracy_curves_ave-4x7.png",
                     "transfer_vs_forgetting_ave-4x7.png"]
    for p in rep.plots:
        img = np.asarray(Image.open(p).convert("RGB"))
        assert img.shape[0] > 400 and img.shape[1] > 600
        # real content: many distinct colours and not a blank canvas
        assert len(np.unique(img.reshape(-1, 3), axis=0)) > 100
        assert (img < 200).any(axis=2).mean() > 0.02


def test_metric_missing_from_metrics_json_is_computed_from_the_matrix(tmp_path):
    A = write_run(tmp_path / "r0", "lll", 0, 0.8, 0.05, drop=("backward_transfer",))
    write_run(tmp_path / "r1", "lll", 1, 0.8, 0.05)
    runs = load_runs([tmp_path])
    table = build_table(runs, ["backward_transfer"])
    cell = table.cells[("LLL", (PROTO, "backward_transfer"))]
    assert cell.values[0] == pytest.approx(100 * M.backward_transfer(np.round(A, 6)))
    assert cell.p_value is None and cell.is_best


def test_heads_and_differing_hparams_name_the_rows(tmp_path):
    write_run(tmp_path / "a", "lll", 0, 0.8, 0.05, head="guided")
    write_run(tmp_path / "b", "lll", 0, 0.7, 0.05, head="naive")
    write_run(tmp_path / "c", "finetune", 0, 0.4, 0.5, head="guided", hparams={"lr": 0.1})
    write_run(tmp_path / "d", "finetune", 0, 0.3, 0.6, head="guided", hparams={"lr": 0.01})
    table = build_table(load_runs([tmp_path]))
    assert table.rows == ["Fine-tuning (guided, lr=0.01)", "Fine-tuning (guided, lr=0.1)",
                          "LLL (guided)", "LLL (naive)"]
    # one seed per cell: no std, and no p-value possible
    cell = table.cells[("LLL (naive)", (PROTO, "mean_accuracy"))]
    assert np.isnan(cell.std) and np.isnan(cell.p_value)


def test_bad_run_directories_are_named(tmp_path):
    write_run(tmp_path / "a", "lll", 0, 0.8, 0.05)
    write_run(tmp_path / "b", "lll", 0, 0.7, 0.05)
    with pytest.raises(ReportError, match=r"seed 0: .*a and .*b"):
        build_table(load_runs([tmp_path]))
    (tmp_path / "b" / "config.json").unlink()
    with pytest.raises(ReportError, match=r"b/config.json: missing"):
        load_runs([tmp_path])
    (tmp_path / "b" / "config.json").write_text(json.dumps({"method": "lll", "seed": 1}))
    with pytest.raises(ReportError, match=r"config.json: missing key 'protocol'"):
        load_runs([tmp_path / "b"])
    (tmp_path / "a" / "acc_matrix.csv").write_text("step,t0\n0,1\n")
    with pytest.raises(ReportError, match=r"a/acc_matrix.csv: header"):
        load_runs([tmp_path / "a"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ReportError, match=r"empty: no run directories"):
        load_runs([empty])


def test_cli_prints_table_and_plot_paths(runs_root, tmp_path):
    out = tmp_path / "report"
    res = CliRunner().invoke(main, [str(runs_root), "--out", str(out),
                                    "--metrics", "mean_accuracy,last_accuracy"])
    assert res.exit_code == 0, res.output
    assert "| Method | ave-4x7 Mean Acc. ↑ | ave-4x7 Last Acc. ↑ |" in res.output
    assert f"plot: {out / 'accuracy_curves_ave-4x7.png'}" in res.output
    assert (out / "table.md").read_text().startswith("| Method |")
    bad = CliRunner().invoke(main, [str(runs_root), "--out", str(out), "--metrics", "accuracy"])
    assert bad.exit_code != 0 and "unknown metric" in bad.output
    assert "Example" in CliRunner().invoke(main, ["--help"]).output


def test_upper_bound_is_never_the_best(tmp_path):
    for seed in range(2):
        write_run(tmp_path / f"j{seed}", "joint", seed, 0.95, 0.0)
        write_run(tmp_path / f"l{seed}", "lll", seed, 0.80 + 0.01 * seed, 0.05)
        write_run(tmp_path / f"f{seed}", "finetune", seed, 0.40, 0.60 + 0.05 * seed)
    table = build_table(load_runs([tmp_path]))
    col = (PROTO, "mean_accuracy")
    assert table.rows == ["Fine-tuning", "LLL", "Upper bound (joint)"]
    assert table.best[col] == "LLL"
    assert not table.cells[("Upper bound (joint)", col)].is_best
    assert table.cells[("Upper bound (joint)", col)].p_value == pytest.approx(
        stats.ttest_rel([95.0, 95.0], [80.0, 81.0]).pvalue)
