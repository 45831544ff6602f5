"""avcl-train end to end: every method through the CLI, run directories, skip/force/resume, sweeps."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from train_fixtures import one_torch_thread  # noqa: F401 (autouse fixture)
from train_fixtures import make_toy
from train.cli import CliError, main
from train.heads.base import OptionError
from train.methods import METHODS
from train.methods.base import Method, register_method

FAST = ["--epochs", "2", "--set", "batch_size=16", "--set", "head.d_model=16", "--set", "head.n_heads=2", "-q"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy(tmp_path_factory.mktemp("toy"), n_classes=6, classes_per_task=2, memory=12)


def run(toy, out, *extra):
    return main(["--cache", toy.store, "--protocol", toy.protocol, "--out", str(out), *FAST, *extra])


def test_every_method_runs_end_to_end(toy, tmp_path, capsys):
    methods = sorted(n for n, c in METHODS.items() if not getattr(c, "segmentation_only", False))
    tiny = tmp_path / "tiny.json"  # RanPAC's paper width (M=10000) is not tiny
    tiny.write_text(json.dumps({"methods": {"ranpac": {"M": 64}}}))
    res = run(toy, tmp_path, "--method", ",".join(methods), "--seeds", "0,1", "--preset", str(tiny))
    assert [(r["method"], r["seed"], r["status"]) for r in res] == [(m, s, "ok") for m in methods for s in (0, 1)]
    out = capsys.readouterr().out
    assert "mean accuracy / average forgetting" in out and all(m in out for m in methods)
    for r in res:
        d = tmp_path / "toy-3x2" / r["method"] / f"seed{r['seed']}"
        assert r["run_dir"] == str(d)
        assert {p.name for p in d.iterdir()} == {"config.json", "acc_matrix.csv", "metrics.json", "log.jsonl",
                                                "ckpt_task0.pt", "ckpt_task1.pt", "ckpt_task2.pt"}
        cfg = json.loads((d / "config.json").read_text())
        assert (cfg["method"], cfg["seed"], cfg["protocol"], cfg["head"]) == \
            (r["method"], r["seed"], "toy-3x2", METHODS[r["method"]].default_head)
        assert cfg["hparams"]["epochs"] == 2 and cfg["head_config"]["d_model"] == 16
        assert cfg["caches"][0]["key"] and cfg["cache_paths"][0]["path"] == toy.store
        assert cfg["classes_per_task"] == [2, 2, 2] and cfg["select"] == "last" and not cfg["leaks_old_class_val"]
        with open(d / "acc_matrix.csv") as f:
            rows = list(csv.reader(f))
        assert rows[0] == ["after_task", "task_0", "task_1", "task_2"]
        A = np.array([[float(x) for x in row[1:]] for row in rows[1:]])
        assert A.shape == (3, 3) and np.all((A >= 0) & (A <= 1))
        np.testing.assert_array_equal(A, r["acc_matrix"])
        met = json.loads((d / "metrics.json").read_text())
        assert {"step_acc", "mean_accuracy", "average_forgetting", "last_accuracy", "learning_accuracy",
                "average_accuracy", "backward_transfer", "forward_transfer"} <= set(met)
        assert met["mean_accuracy"] == pytest.approx(np.mean(met["step_acc"]))
        # one line per SGD epoch; the closed-form methods train by SGD on the first task at most
        sgd_tasks = 1 if r["method"] in ("simplecil", "ranpac", "fecam") else 3
        assert sum(1 for _ in open(d / "log.jsonl")) == sgd_tasks * 2


def test_done_runs_are_skipped_forced_or_refused(toy, tmp_path):
    first = run(toy, tmp_path, "--method", "finetune")
    again = run(toy, tmp_path, "--method", "finetune")
    assert again[0]["status"] == "skipped" and again[0]["message"] == "already done"
    assert again[0]["metrics"]["step_acc"] == first[0]["metrics"]["step_acc"]
    forced = run(toy, tmp_path, "--method", "finetune", "--force")
    assert forced[0]["status"] == "ok"
    np.testing.assert_array_equal(forced[0]["acc_matrix"], first[0]["acc_matrix"])  # deterministic
    other = run(toy, tmp_path, "--method", "finetune", "--set", "lr=0.01")
    assert other[0]["status"] == "failed" and "different configuration" in other[0]["error"]
    assert "--force" in other[0]["error"]
    d = tmp_path / "toy-3x2" / "finetune" / "seed0"
    assert not (d / "error.txt").exists() and json.loads((d / "config.json").read_text())["hparams"]["lr"] != 0.01


def test_resume_continues_from_the_last_task_checkpoint(toy, tmp_path):
    full = run(toy, tmp_path, "--method", "lll")[0]
    d = tmp_path / "toy-3x2" / "lll" / "seed0"
    (d / "metrics.json").unlink()
    (d / "ckpt_task2.pt").unlink()
    res = run(toy, tmp_path, "--method", "lll", "--resume")[0]
    assert res["status"] == "ok" and res["resumed_from"] == 2
    np.testing.assert_array_equal(res["acc_matrix"], full["acc_matrix"])
    assert sum(1 for _ in open(d / "log.jsonl")) == 6


def test_heads_val_seen_and_bring_your_own_protocol(toy, tmp_path):
    res = main(["--cache", toy.store, "--class-order", "sorted", "--classes-per-task", "3", "--memory", "6",
                "--protocol", "mine", "--method", "ssil", "--head", "guided,concat", "--select", "val-seen",
                "--out", str(tmp_path), *FAST])
    assert [(r["head"], r["status"]) for r in res] == [("guided", "ok"), ("concat", "ok")]
    assert (tmp_path / "mine" / "ssil" / "seed0").is_dir() and (tmp_path / "mine" / "ssil-concat" / "seed0").is_dir()
    cfg = json.loads((tmp_path / "mine" / "ssil-concat" / "seed0" / "config.json").read_text())
    assert cfg["protocol_info"]["tasks"] == [[0, 1, 2], [3, 4, 5]] and cfg["protocol_info"]["memory"] == 6
    assert cfg["select"] == "val-seen" and cfg["leaks_old_class_val"] is True
    assert np.array(res[1]["acc_matrix"]).shape == (2, 2)


def test_bad_arguments_are_reported_before_training(toy, tmp_path):
    with pytest.raises(OptionError, match=r"unknown key\(s\) lamda.*valid keys for method 'lwf'.*lamb"):
        run(toy, tmp_path, "--method", "lwf", "--set", "lamda=2")
    with pytest.raises(CliError, match=r"unknown method\(s\) \['lwf2'\]"):
        run(toy, tmp_path, "--method", "lwf2")
    with pytest.raises(CliError, match="--class-order needs --classes-per-task"):
        main(["--cache", toy.store, "--class-order", "sorted", "--method", "lwf", "--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())


class _Broken(Method):
    def before_task(self, task):
        if task == 1:
            raise RuntimeError("boom in task 1")


def test_a_failed_run_is_reported_and_the_others_finish(toy, tmp_path, capsys):
    register_method("broken-for-test")(_Broken)
    try:
        res = run(toy, tmp_path, "--method", "broken-for-test,finetune")
    finally:
        METHODS.pop("broken-for-test")
    assert [r["status"] for r in res] == ["failed", "ok"]
    err = (tmp_path / "toy-3x2" / "broken-for-test" / "seed0" / "error.txt").read_text()
    assert "boom in task 1" in err and "Traceback" in err
    assert "FAILED broken-for-test seed0: RuntimeError: boom in task 1" in capsys.readouterr().out


def test_local_processes_give_the_same_results(toy, tmp_path):
    seq = run(toy, tmp_path / "a", "--method", "finetune,ssil")
    par = run(toy, tmp_path / "b", "--method", "finetune,ssil", "--jobs", "2")
    assert [r["status"] for r in par] == ["ok", "ok"]
    for a, b in zip(seq, par):
        np.testing.assert_array_equal(a["acc_matrix"], b["acc_matrix"])


def test_dask_local_cluster_runs_the_sweep(toy, tmp_path):
    seq = run(toy, tmp_path / "a", "--method", "finetune", "--seeds", "0,1")
    res = run(toy, tmp_path / "b", "--method", "finetune", "--seeds", "0,1", "--scheduler", "local:2")
    assert [(r["seed"], r["status"]) for r in res] == [(0, "ok"), (1, "ok")]
    for a, b in zip(seq, res):
        np.testing.assert_array_equal(a["acc_matrix"], b["acc_matrix"])
    assert (tmp_path / "b" / "toy-3x2" / "finetune" / "seed1" / "metrics.json").is_file()


def test_small_heads_train_on_one_thread_large_ones_on_more(toy):
    from train.features import FeatureSet
    from train.heads import head_config
    from train.methods import method_hparams
    from train.sweep import auto_threads

    fs = FeatureSet.from_stores([toy.store])
    small = auto_threads(fs, method_hparams("lll", {"batch_size": 32}), head_config("guided", {"d_model": 16}))
    assert small == 1
    big = auto_threads(fs, method_hparams("lll", {"batch_size": 100000}), head_config("guided"), parallel=1)
    import os

    assert big == os.cpu_count()
    assert auto_threads(fs, method_hparams("lll", {"batch_size": 100000}), head_config("guided"),
                        parallel=os.cpu_count()) == 1


def test_single_task_metrics_json_is_strict_json(toy, tmp_path):
    res = main(["--cache", toy.store, "--class-order", "sorted", "--classes-per-task", "6", "--protocol", "one-task",
                "--method", "finetune", "--out", str(tmp_path), *FAST])
    assert res[0]["status"] == "ok"
    text = (tmp_path / "one-task" / "finetune" / "seed0" / "metrics.json").read_text()
    met = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert met["average_forgetting"] is None and met["backward_transfer"] is None  # undefined for one task
    assert 0.0 <= met["mean_accuracy"] <= 1.0
    # the run is done: the second call reads metrics.json back (nulls included) for its summary
    again = main(["--cache", toy.store, "--class-order", "sorted", "--classes-per-task", "6", "--protocol", "one-task",
                  "--method", "finetune", "--out", str(tmp_path), *FAST])
    assert again[0]["status"] == "skipped"
