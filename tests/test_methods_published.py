"""Published numbers shipped as data, and ``avcl-report --published`` beside our runs."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from train_fixtures import one_torch_thread  # noqa: F401 (autouse fixture)
from train_fixtures import make_toy
from train.cli import main as train_main
from train.published import compare, find_runs, load_published
from train.report_cli import main as report_main


def _row(docs, source_part, table_part, **match):
    for d in docs:
        if source_part in d["source"]:
            for t in d["tables"]:
                if table_part in t["table"]:
                    for r in t["rows"]:
                        if all(r.get(k) == v for k, v in match.items()):
                            return r, t
    raise AssertionError(f"no row {match}")


def test_shipped_tables_hold_the_papers_numbers_with_provenance():
    docs = load_published()
    assert len(docs) == 3 and all(d["source"] and d["tables"] for d in docs)
    r, t = _row(docs, "seed 001", "Table 1", method="avcil", protocol="ave-4x7")
    assert (r["mean_accuracy"], r["average_forgetting"]) == (74.04, 7.63) and "AV-CIL" in t["setting"]
    r, _ = _row(docs, "seed 001", "Table 1", method="lll", protocol="vs100-10x10")
    assert (r["mean_accuracy"], r["average_forgetting"]) == (79.64, 0.34)
    r, _ = _row(docs, "seed 004", "Table 2", method="cign", modality="audio")
    assert (r["protocol"], r["mean_accuracy"], r["average_forgetting"]) == ("vgg-100-4x25", 45.83, 10.21)
    r, _ = _row(docs, "seed 004", "Table 3", method="joint", modality="audio-visual")
    assert r["mean_accuracy"] == 53.75 and "average_forgetting" not in r
    r, t = _row(docs, "seed 002", "Table 1", method="ranpac", protocol="s4-11-2-dil")
    assert (r["avg_map"], r["avg_forgetting"]) == (43.99, 0.0) and t["ours"]["avg_map"] == "average_accuracy"
    protocols = {r["protocol"] for d in docs for t in d["tables"] for r in t["rows"]}
    from avcl_core.protocols import load_protocol
    for p in protocols:  # every row names a shipped protocol
        assert load_protocol(p).name == p


def _fake_run(root, name, method, protocol, acc, forg, preset=None, overrides=None, encoder="audiomae", head="avcil"):
    d = root / name
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({
        "method": method, "protocol": protocol, "head": head, "head_config": {}, "preset": preset,
        "overrides": overrides or {}, "epochs_override": None,
        "cache_paths": [{"encoder": encoder}, {"encoder": "videomae"}]}))
    (d / "metrics.json").write_text(json.dumps({"mean_accuracy": acc, "average_forgetting": forg}))


def test_ours_beside_published_with_the_paper_settings_marked(tmp_path):
    _fake_run(tmp_path, "a", "avcil", "ave-4x7", 0.70, 0.10, preset="av-cil")
    _fake_run(tmp_path, "b", "avcil", "ave-4x7", 0.72, 0.08, preset="av-cil")
    _fake_run(tmp_path, "c", "avcil", "ave-4x7", 0.10, 0.90, preset="av-cil", overrides={"lr": "1"})
    _fake_run(tmp_path, "d", "ssil", "ave-4x7", 0.50, 0.20, preset="synth", head="guided")
    text = compare(find_runs([tmp_path]), only_with_ours=True)
    lines = {ln.split(" | ")[0].lstrip("| "): ln for ln in text.splitlines() if ln.startswith("| ")}
    # AV-CIL: the two runs with AV-CIL's settings only, mean ± std in percent
    assert "| 74.04 | 71.00 ± 1.41 | 7.63 | 9.00 ± 1.41 | 2 | yes |" in lines["AV-CIL"]
    assert "| 61.94 | 50.00 ± 0.00 | 22.49 | 20.00 ± 0.00 | 1 | no |" in lines["SS-IL"]
    assert "AFC-NME" not in lines  # no run of ours: left out
    assert "seed 001" in text and "Table 1" in text


def test_avcl_report_published_prints_and_writes_the_comparison(tmp_path):
    toy = make_toy(tmp_path, n_classes=6, classes_per_task=2, memory=12)
    res = train_main(["--cache", toy.store, "--class-order", "sorted", "--classes-per-task", "2",
                      "--protocol", "ave-4x7", "--method", "ssil", "--epochs", "1", "--set", "head.d_model=16",
                      "--set", "head.n_heads=2", "--out", str(tmp_path / "runs"), "-q"])
    assert res[0]["status"] == "ok"
    out = CliRunner().invoke(report_main, [str(tmp_path / "runs"), "--out", str(tmp_path / "rep"), "--published"])
    assert out.exit_code == 0, out.output
    assert "SS-IL" in out.output and "61.94" in out.output and "| no |" in out.output
    assert (tmp_path / "rep" / "published.md").read_text().count("SS-IL") == 1
