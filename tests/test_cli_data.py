"""`avcl-data`: protocol table, manifest checks against dataset folders, help texts."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from avcl_core.cli_data import main
from avcl_core.manifest import Manifest
from test_builders import fake_mp4, garbage, make_ave


def run(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def _table(output):
    rows = {}
    for line in output.splitlines()[1:]:
        parts = line.split()
        if parts and not line.startswith("*"):
            rows[parts[0]] = parts
    return rows


def test_protocols_table_lists_counts_tasks_and_memory():
    res = run("protocols")
    assert res.exit_code == 0
    header = res.output.splitlines()[0].split()
    assert header == ["name", "dataset", "setting", "classes", "tasks", "train", "val", "test", "memory"]
    t = _table(res.output)
    assert t["ave-4x7"] == ["ave-4x7", "ave", "CIL", "28", "4x7", "3294", "391", "394", "340"]
    assert t["ks-5x6"][3:] == ["30", "5x6", "19220", "1947", "1958", "500"]
    assert t["vs100-10x10"][3:] == ["100", "10x10", "51195", "5000", "5000", "1500"]
    assert t["s4-11-2-til"][1:] == ["avsbench-s4", "TIL", "*", "23", "11+6x2", "-", "-", "-", "0"]
    assert t["vgg-instruments-4x9"][-1] == "50/class"
    assert t["avss-60-5"][4] == "61+2x5"
    assert "derived" in res.output


def test_protocols_filtered_by_dataset():
    res = run("protocols", "--dataset", "ave")
    assert res.exit_code == 0 and set(_table(res.output)) == {"ave-4x7", "ave-7x4"}
    res = CliRunner().invoke(main, ["protocols", "--dataset", "nope"])
    assert res.exit_code != 0 and "datasets with protocols" in res.output and "vs100" in res.output


def test_show_prints_tasks_with_class_names():
    res = run("show", "ave-4x7")
    assert res.exit_code == 0
    assert "task 0: 0:Acoustic guitar, 1:Cat" in res.output and "Pian et al." in res.output
    res = CliRunner().invoke(main, ["show", "nope"])
    assert res.exit_code != 0 and "available" in res.output


def test_check_dataset_writes_the_usable_manifest(tmp_path):
    info = make_ave(tmp_path / "AVE_Dataset")
    out = tmp_path / "ave.jsonl"
    rep = tmp_path / "report.json"
    res = run("check", "--dataset", "ave", "--root", str(tmp_path / "AVE_Dataset"), "--out", str(out),
              "--protocol", "ave-4x7", "--report-json", str(rep))
    assert res.exit_code == 0, res.output
    assert "train 2  val 1  test 0" in res.output
    assert "missing file: 1" in res.output and "ccccccccc3x: AVE/ccccccccc3x.mp4" in res.output
    assert "unreadable file: 2" in res.output and "malformed line: 2" in res.output
    assert "protocol ave-4x7: usable samples train 1/3294" in res.output
    m = Manifest.load(out)
    assert sorted(m.sample_ids) == sorted(["aaaaaaaaaa1", "bbbbbbbbbb2", info["cat_id"]])
    assert json.loads(rep.read_text())["counts"] == {"train": 2, "val": 1, "test": 0}


def test_check_fails_only_when_nothing_is_usable(tmp_path):
    root = tmp_path / "AVE_Dataset"
    root.mkdir()
    (root / "Annotations.txt").write_text("Category&VideoID&Quality&StartTime&EndTime\nCat&aaaaaaaaaa1&good&0&10\n")
    (root / "trainSet.txt").write_text("Cat&aaaaaaaaaa1&good&0&10\n")
    out = tmp_path / "ave.jsonl"
    res = CliRunner().invoke(main, ["check", "--dataset", "ave", "--root", str(root), "--out", str(out)])
    assert res.exit_code == 1 and "no usable row" in res.output and not out.exists()
    assert "missing file: 3" in res.output   # the video and the two absent split lists
    res = CliRunner().invoke(main, ["check", "--dataset", "avss", "--root", str(root)])
    assert res.exit_code == 1 and "metadata.csv" in res.output


def test_check_own_manifest(tmp_path):
    fake_mp4(tmp_path / "data" / "a.mp4")
    garbage(tmp_path / "data" / "b.mp4")
    rows = [{"sample_id": s, "dataset": "mine", "split": "train", "label": 0, "class_name": "x",
             "video": f"{s}.mp4"} for s in ("a", "b", "c")]
    Manifest(rows).save(tmp_path / "mine.csv")
    res = run("check", "--manifest", str(tmp_path / "mine.csv"), "--root", str(tmp_path / "data"),
              "--out", str(tmp_path / "ok.jsonl"))
    assert res.exit_code == 0
    assert "unreadable file: 1" in res.output and "b: b.mp4" in res.output and "c: c.mp4" in res.output
    assert Manifest.load(tmp_path / "ok.jsonl").sample_ids == ["a"]
    (tmp_path / "broken.jsonl").write_text('{"sample_id": "a"\n')
    res = CliRunner().invoke(main, ["check", "--manifest", str(tmp_path / "broken.jsonl"), "--root", str(tmp_path)])
    assert res.exit_code == 1 and "broken.jsonl:1" in res.output


def test_check_needs_exactly_one_source(tmp_path):
    res = CliRunner().invoke(main, ["check", "--root", str(tmp_path)])
    assert res.exit_code == 2 and "exactly one of --dataset" in res.output


@pytest.mark.parametrize("cmd", [[], ["protocols"], ["show"], ["check"], ["synth"]])
def test_every_command_has_help_with_an_example(cmd):
    res = run(*cmd, "--help")
    assert res.exit_code == 0 and "Example" in res.output and "avcl-data" in res.output
