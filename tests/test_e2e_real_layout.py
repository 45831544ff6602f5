"""The README's real-data recipe, end to end, on a folder laid out like the official AVE release.

The fixture writes ``AVE_Dataset/`` as AVE ships it (``Annotations.txt`` with its
``Category&VideoID&Quality&StartTime&EndTime`` header, ``trainSet.txt``,
``valSet.txt``, ``testSet.txt`` in the same line format, ``AVE/<id>.mp4``), for
the shipped ``ave-4x7`` protocol: for each of its 28 classes the first 2 listed
train ids and the first listed test id (sorted), 84 real mp4 clips. AVE class
``k`` (protocol order) gets the clips of synth class ``k``. Two rows are broken
on purpose:

- ``MISSING_ID`` (the 3rd train id of class 0) is annotated and listed but has no mp4;
- ``CORRUPT_ID`` (the 3rd train id of class 1) has an mp4 cut to its first half:
  its header is intact, its ``moov`` box (written at the end) is gone.

Then ``avcl-data check``, ``avcl-extract --encoder signal``, ``avcl-train`` and
``avcl-report`` run in-process exactly as the README's AVE recipe does.
"""
from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from avcl_core import synth
from avcl_core.cache import STATUS_OK, STATUS_UNREADABLE, open_store
from avcl_core.manifest import Manifest
from avcl_core.protocols import load_protocol

PROTOCOL = "ave-4x7"
TRAIN_PER_CLASS, TEST_PER_CLASS = 2, 1
HEADER = "Category&VideoID&Quality&StartTime&EndTime"


def _ids(protocol, split: str, cls: int) -> list[str]:
    """Sorted ids the protocol lists for ``split`` with protocol class ``cls``."""
    return sorted(i for i in protocol.splits[split] if protocol.sample_labels[i] == cls)


@pytest.fixture(scope="module")
def ave(tmp_path_factory):
    """The AVE-layout dataset folder and what was put in it."""
    p = load_protocol(PROTOCOL)
    base = tmp_path_factory.mktemp("e2e_ave")
    src = base / "synth"
    synth.render(src, classes=p.num_classes, clips_per_class=TRAIN_PER_CLASS + TEST_PER_CLASS, seed=0, workers=1,
                 size=32, seconds=1.0, fps=4)
    clips = {}  # synth class -> its clip files
    for r in Manifest.load(src / "manifest.jsonl").rows:
        clips.setdefault(r["label"], []).append(src / r["video"])

    root = base / "AVE_Dataset"
    (root / "AVE").mkdir(parents=True)
    lines = {"train": [], "val": [], "test": []}
    kept = {"train": [], "test": []}
    for k, name in enumerate(p.classes):
        train, test = _ids(p, "train", k), _ids(p, "test", k)
        for vid, clip in zip(train[:TRAIN_PER_CLASS] + test[:TEST_PER_CLASS], clips[k]):
            shutil.copyfile(clip, root / "AVE" / f"{vid}.mp4")
        kept["train"] += train[:TRAIN_PER_CLASS]
        kept["test"] += test[:TEST_PER_CLASS]
        lines["train"] += [f"{name}&{v}&good&0&10" for v in train[:TRAIN_PER_CLASS]]
        lines["test"] += [f"{name}&{v}&good&0&10" for v in test[:TEST_PER_CLASS]]
    missing_id = _ids(p, "train", 0)[TRAIN_PER_CLASS]
    corrupt_id = _ids(p, "train", 1)[TRAIN_PER_CLASS]
    lines["train"] += [f"{p.classes[0]}&{missing_id}&good&2&8", f"{p.classes[1]}&{corrupt_id}&bad&0&10"]
    data = clips[1][0].read_bytes()
    (root / "AVE" / f"{corrupt_id}.mp4").write_bytes(data[: len(data) // 2])

    (root / "Annotations.txt").write_text("\n".join([HEADER, *lines["train"], *lines["test"]]) + "\n",
                                          encoding="utf-8")
    for split, fname in (("train", "trainSet.txt"), ("val", "valSet.txt"), ("test", "testSet.txt")):
        (root / fname).write_text("".join(f"{ln}\n" for ln in lines[split]), encoding="utf-8")
    return {"root": root, "base": base, "protocol": p, "missing": missing_id, "corrupt": corrupt_id, "kept": kept}


def test_fixture_has_the_official_layout(ave):
    root = ave["root"]
    assert sorted(p.name for p in root.iterdir()) == ["AVE", "Annotations.txt", "testSet.txt", "trainSet.txt",
                                                      "valSet.txt"]
    assert (root / "Annotations.txt").read_text().splitlines()[0] == HEADER
    assert len(list((root / "AVE").glob("*.mp4"))) == 28 * 3 + 1  # + the truncated one; the missing one is absent
    assert not (root / "AVE" / f"{ave['missing']}.mp4").exists()


def test_check_names_the_missing_and_the_corrupt_file(ave, tmp_path):
    from avcl_core.cli_data import main

    out = tmp_path / "m.jsonl"
    # --deep decodes every clip: the truncated file keeps a valid mp4 header, so only decoding finds it
    res = CliRunner().invoke(main, ["check", "--dataset", "ave", "--root", str(ave["root"]), "--protocol", PROTOCOL,
                                    "--out", str(out), "--deep", "--report-json", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    assert f"missing file: 1\n    {ave['missing']}: AVE/{ave['missing']}.mp4\n" in res.output
    assert f"unreadable file: 1\n    {ave['corrupt']}: AVE/{ave['corrupt']}.mp4 (cannot be decoded" in res.output
    assert "manifest rows: train 56  val 0  test 28  (total 84; 2 left out)" in res.output
    assert "annotated samples: 86" in res.output
    assert f"protocol {PROTOCOL}: usable samples train 56/3294  val 0/391  test 28/394" in res.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert set(report["problems"]) == {"missing file", "unreadable file"}

    m = Manifest.load(out)
    p = ave["protocol"]
    assert len(m) == 84 and m.counts() == {"train": 56, "val": 0, "test": 28}
    assert sorted(r["sample_id"] for r in m.rows if r["split"] == "train") == sorted(ave["kept"]["train"])
    # every row keeps the protocol's class name exactly, and class ids index the sorted names
    assert all(r["class_name"] == p.classes[p.sample_labels[r["sample_id"]]] for r in m.rows)
    assert m.classes() == sorted(p.classes)
    assert all(r["video"] == f"AVE/{r['sample_id']}.mp4" for r in m.rows)

    # the default (header-only) check still names the missing file and keeps the truncated one
    res = CliRunner().invoke(main, ["check", "--dataset", "ave", "--root", str(ave["root"])])
    assert res.exit_code == 0 and f"missing file: 1\n    {ave['missing']}:" in res.output
    assert "unreadable file" not in res.output and "train 57  val 0  test 28  (total 85; 1 left out)" in res.output


def _extract_args(ave) -> list[str]:
    return ["--dataset", "ave", "--root", str(ave["root"]), "--encoder", "signal", "-o", "clip_seconds=1.0",
            "-o", "frames_per_clip=4", "-o", "image_size=32", "--cache-dir", str(ave["base"] / "cache"),
            "--workers", "0", "--no-progress"]


@pytest.fixture(scope="module")
def extracted(ave):
    from extract.cli import cli

    res = CliRunner().invoke(cli, _extract_args(ave))
    stores = sorted((ave["base"] / "cache" / "ave").glob("signal-*.zarr"))
    return res, stores


def test_extract_writes_a_complete_store_with_the_corrupt_clip_marked(ave, extracted):
    res, stores = extracted
    assert res.exit_code == 0, res.output
    assert len(stores) == 1
    store = open_store(stores[0])
    assert store.status == "complete" and stores[0].name == f"signal-{store.key[:12]}.zarr"
    # the builder left the missing clip out of the manifest (reported on stderr); the truncated one is a row
    assert f"missing file: 1\n    {ave['missing']}: AVE/{ave['missing']}.mp4" in res.stderr
    assert f"store   {stores[0]}" in res.stdout
    assert "ok      84\nfailed  1 (unreadable 1)" in res.stdout
    assert f"e.g. {ave['corrupt']} [unreadable]" in res.stdout

    ids = list(store.sample_ids)
    assert len(ids) == 85 and ave["missing"] not in ids
    assert sorted(ids) == sorted(ave["kept"]["train"] + ave["kept"]["test"] + [ave["corrupt"]])
    status = store.row_status()
    assert status[ids.index(ave["corrupt"])] == STATUS_UNREADABLE
    assert (np.delete(status, ids.index(ave["corrupt"])) == STATUS_OK).all()
    assert store.attrs["counts"] == {"ok": 84, "unreadable": 1}
    visual, audio = store.read("visual"), store.read("audio")
    assert visual.shape[:2] == (85, 4) and audio.shape[0] == 85
    assert not np.any(visual[ids.index(ave["corrupt"])])  # a failed clip is stored as zeros
    assert np.all(np.abs(visual[status == STATUS_OK]).sum(axis=(1, 2)) > 0)

    # rerunning the same command finds the complete store and does nothing
    from extract.cli import cli

    again = CliRunner().invoke(cli, _extract_args(ave))
    assert again.exit_code == 0 and "already complete" in again.stdout


@pytest.fixture(scope="module")
def trained(ave, extracted):
    from train.cli import main

    _, stores = extracted
    runs = ave["base"] / "runs"
    results = main(["--cache", str(stores[0]), "--protocol", PROTOCOL, "--method", "finetune", "--epochs", "2",
                    "--set", "batch_size=16", "--set", "head.d_model=16", "--set", "head.n_heads=2",
                    "--out", str(runs), "-q"])
    return results, runs, stores[0]


def test_train_gives_a_4x4_accuracy_matrix_traced_to_the_store(ave, trained):
    results, runs, store_path = trained
    assert [(r["method"], r["seed"], r["status"]) for r in results] == [("finetune", 0, "ok")]
    d = runs / PROTOCOL / "finetune" / "seed0"
    assert results[0]["run_dir"] == str(d)
    with open(d / "acc_matrix.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["after_task", "task_0", "task_1", "task_2", "task_3"]
    A = np.array([[float(x) for x in row[1:]] for row in rows[1:]])
    assert A.shape == (4, 4)
    # each task has 7 test clips (one per class), so every seen-task accuracy is a multiple of 1/7
    seen = A[np.tril_indices(4)]
    np.testing.assert_allclose(seen * 7, np.round(seen * 7), atol=1e-6)
    assert np.all((seen >= 0) & (seen <= 1))
    np.testing.assert_array_equal(A, results[0]["acc_matrix"])

    met = json.loads((d / "metrics.json").read_text())
    assert met["n_test"] == [7, 7, 7, 7]  # the 28 test clips, one per class, all selected by the protocol
    assert len(met["step_acc"]) == 4 and met["mean_accuracy"] == pytest.approx(np.mean(met["step_acc"]))
    # accuracy after task t over the 7(t+1) seen test clips = the mean of the seen tasks' accuracies
    np.testing.assert_allclose(met["step_acc"], [A[t, : t + 1].mean() for t in range(4)], atol=1e-6)

    cfg = json.loads((d / "config.json").read_text())
    store = open_store(store_path)
    assert cfg["protocol"] == PROTOCOL and cfg["method"] == "finetune"
    assert cfg["caches"][0]["key"] == store.key
    assert cfg["cache_paths"][0]["path"] == str(store_path)
    assert cfg["excluded_rows"] == {f"unreadable in {store.path}": 1}


def test_report_has_the_finetune_row_and_the_protocol_column(trained, tmp_path):
    from train.report_cli import main

    _, runs, _ = trained
    res = CliRunner().invoke(main, [str(runs), "--out", str(tmp_path / "report")])
    assert res.exit_code == 0, res.output
    table = (tmp_path / "report" / "table.md").read_text()
    header = table.splitlines()[0]
    assert PROTOCOL in header
    finetune = [ln for ln in table.splitlines() if ln.startswith("| Fine-tuning")]
    assert len(finetune) == 1
    # one seed: the cell is that run's mean accuracy in percent
    met = json.loads((runs / PROTOCOL / "finetune" / "seed0" / "metrics.json").read_text())
    assert f"{100 * met['mean_accuracy']:.2f}" in finetune[0].split("|")[2]
    assert (tmp_path / "report" / "table.csv").is_file()
