"""Training past the size of memory and long runs: streamed features, progress, NaN stop, kill and resume."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from avcl_core.protocols import load_protocol
from train_fixtures import one_torch_thread  # noqa: F401 (autouse fixture)
from train_fixtures import make_toy
from train.features import FeatureSet, FeatureSetError, parse_size
from train.methods import build_method
from train.trainer import Trainer

TINY = {"epochs": 3, "batch_size": 16, "exemplar_batch_size": 8, "lr": 3e-3}
HEAD = {"d_model": 16, "n_heads": 2}


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """6 classes x 22 clips in shards of 8 rows (17 blocks)."""
    root = tmp_path_factory.mktemp("sharded")
    return make_toy(root, n_classes=6, classes_per_task=2, memory=12, rows_per_shard=8)


def _run(fs, toy, method, seed=0):
    m = build_method(method, TINY)
    return Trainer(fs, load_protocol(toy.protocol), m, head_config=HEAD, seed=seed).fit()


def test_parse_size():
    assert parse_size("8G") == 8 * 2**30 and parse_size("512MB") == 512 * 2**20
    assert parse_size("1.5KiB") == 1536 and parse_size("1000") == 1000 and parse_size(None) is None
    with pytest.raises(FeatureSetError, match="expected a size"):
        parse_size("lots")


def test_streamed_set_serves_the_same_rows_within_its_budget(sharded):
    resident = FeatureSet.from_stores([sharded.store])
    row_bytes = (4 * 8 + 3 * 12) * 2
    budget = 3 * 8 * row_bytes  # three blocks of 8 rows
    fs = FeatureSet.from_stores([sharded.store], memory_budget=budget)
    assert fs.streamed and not fs.streams and fs.streamer.capacity == 3 and fs.shuffle_blocks == 1
    assert fs.dims == resident.dims and len(fs) == len(resident) == 132
    assert fs.nbytes() <= budget
    idx = torch.tensor([131, 0, 77, 8, 9, 64, 3])
    for k, v in fs.batch(idx).items():
        assert v.dtype == torch.float32
        np.testing.assert_array_equal(v.numpy(), sharded.features[k][idx.numpy()].astype(np.float32))
    # one epoch in window order reads each block once and never holds more than the budget
    fs.streamer.reads = 0
    order = fs.epoch_order(torch.arange(len(fs)), torch.Generator().manual_seed(0))
    assert sorted(order.tolist()) == list(range(132))
    for s in range(0, 132, 16):
        fs.batch(order[s: s + 16])
    fs.streamer.close()
    assert fs.streamer.reads <= 17 + 3  # every block once, plus at most the blocks read ahead at the start
    assert fs.streamer.max_resident <= 3


def test_streamed_blocks_are_inner_chunks_so_an_epoch_decodes_only_the_chunks_it_uses(tmp_path, monkeypatch):
    import avcl_core.cache as C

    row_bytes = (4 * 8 + 3 * 12) * 2
    monkeypatch.setattr(C, "TARGET_CHUNK_BYTES", 4 * row_bytes)  # shards of 8 rows in chunks of 4
    toy = make_toy(tmp_path, n_classes=4, rows_per_shard=8)
    fs = FeatureSet.from_stores([toy.store], memory_budget=3 * 4 * row_bytes)
    assert fs.streamed and fs.block_rows == 4 and fs.streamer.capacity == 3
    # class 0's 12 training rows: 3 chunks of 4, where shard-sized blocks would decode 16 rows
    fs.streamer.reads = 0
    pool = torch.arange(12)
    order = fs.epoch_order(pool, torch.Generator().manual_seed(1))
    got = {k: [] for k in fs.dims}
    for s in range(0, 12, 5):
        for k, v in fs.batch(order[s: s + 5]).items():
            got[k].append(v)
    fs.streamer.close()
    assert fs.streamer.reads * fs.block_rows == 12
    for k, parts in got.items():
        np.testing.assert_array_equal(torch.cat(parts).numpy(), toy.features[k][order.numpy()].astype(np.float32))


def test_epoch_order_windows_blocks_and_matches_between_resident_and_streamed(sharded):
    a = FeatureSet.from_stores([sharded.store], shuffle_blocks=2, block_rows=8)
    b = FeatureSet.from_stores([sharded.store], memory_budget=4 * 8 * 136, block_rows=8)
    assert not a.streamed and b.streamed and b.shuffle_blocks == 2
    pool = torch.arange(40, 120)
    oa = a.epoch_order(pool, torch.Generator().manual_seed(3))
    ob = b.epoch_order(pool, torch.Generator().manual_seed(3))
    assert torch.equal(oa, ob) and sorted(oa.tolist()) == pool.tolist()
    # consecutive rows of a window come from at most 2 blocks
    blocks = (oa // 8).tolist()
    windows = [set(blocks[i: i + 16]) for i in range(0, 80, 16)]
    assert all(len(w) == 2 for w in windows)  # pool 40..119 = blocks 5..14, two per window
    # without windows: one permutation of all rows, as before
    plain = FeatureSet.from_stores([sharded.store])
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(plain.epoch_order(pool, g1), pool[torch.randperm(80, generator=g2)])


@pytest.mark.parametrize("method", ["lll", pytest.param("icarl", marks=pytest.mark.slow)])
def test_streamed_and_in_memory_training_give_identical_accuracy_matrices(sharded, method):
    """lll: paired exemplar batches (pinned rows) and a teacher; icarl: herding over every class."""
    resident = FeatureSet.from_stores([sharded.store], shuffle_blocks=1, block_rows=8)
    streamed = FeatureSet.from_stores([sharded.store], memory_budget=2 * 8 * 136, block_rows=8)
    assert streamed.streamed and streamed.shuffle_blocks == 1
    r1, r2 = _run(resident, sharded, method), _run(streamed, sharded, method)
    streamed.streamer.close()
    np.testing.assert_array_equal(r1.acc_matrix, r2.acc_matrix)
    assert r1.acc_matrix[0, 0] > 0.5  # it learned something


# -- long runs people can watch ------------------------------------------------------------------
def test_nan_loss_stops_naming_task_and_epoch_and_keeps_the_last_good_checkpoint(sharded, tmp_path):
    from train.trainer import NonFiniteLoss

    m = build_method("finetune", TINY)
    orig = m.loss

    calls = []

    def loss(batch, out):
        terms = orig(batch, out)
        if m.trainer.task == 1:
            calls.append(1)
            if len(calls) > 2 * 2:  # task 1 has 24 train clips: 2 steps of 16 per epoch; NaN from epoch 2 on
                terms = {k: v * float("nan") for k, v in terms.items()}
        return terms

    m.loss = loss
    tr = Trainer(FeatureSet.from_stores([sharded.store]), load_protocol(sharded.protocol), m, head_config=HEAD,
                 run_dir=tmp_path / "run")
    with pytest.raises(NonFiniteLoss, match=r"task 1 epoch 2: the training loss is not finite \(.*loss=nan") as e:
        tr.fit()
    assert "ckpt_task0.pt, is kept" in str(e.value)
    assert (tmp_path / "run" / "ckpt_task0.pt").is_file() and not (tmp_path / "run" / "ckpt_task1.pt").exists()
    assert not (tmp_path / "run" / "metrics.json").exists()


def _cli(toy, out, *extra):
    from train.cli import main

    return main(["--cache", toy.store, "--protocol", toy.protocol, "--method", "lll", "--threads", "1",
                 "--set", "head.d_model=16", "--set", "head.n_heads=2", "--set", "batch_size=16",
                 "--set", "exemplar_batch_size=8", "--out", str(out), *extra])


def test_progress_bar_shows_epochs_and_loss_and_is_quiet_with_q(sharded, tmp_path, capfd):
    _cli(sharded, tmp_path / "a", "--epochs", "2")
    err = capfd.readouterr().err
    assert "6/6" in err and "epoch 2/2 loss" in err  # 3 tasks x 2 epochs
    _cli(sharded, tmp_path / "b", "--epochs", "2", "-q")
    err = capfd.readouterr().err
    assert "/6" not in err and "epoch 2/2 loss" not in err  # warnings may still be logged, the bar is gone


def test_sigkill_mid_task_then_resume_gives_the_uninterrupted_accuracy_matrix(sharded, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from train.trainer import read_acc_matrix

    epochs = "20"
    ref = _cli(sharded, tmp_path / "ref", "--epochs", epochs, "-q")[0]
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "train.cli", "--cache", sharded.store, "--protocol", sharded.protocol,
           "--method", "lll", "--threads", "1", "--set", "head.d_model=16", "--set", "head.n_heads=2",
           "--set", "batch_size=16", "--set", "exemplar_batch_size=8", "--epochs", epochs, "--out", str(out), "-q"]
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rdir = Path(ref["run_dir"].replace(str(tmp_path / "ref"), str(out)))
    deadline = time.time() + 120
    try:
        log = rdir / "log.jsonl"
        # kill once task 1 has logged an epoch: mid-task, after task 0's checkpoint
        while time.time() < deadline and proc.poll() is None:
            if log.is_file() and '"task": 1' in log.read_text():
                break
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert (rdir / "ckpt_task0.pt").exists() and not (rdir / "metrics.json").exists()
    killed_after = max(int(p.stem.removeprefix("ckpt_task")) for p in rdir.glob("ckpt_task*.pt"))
    assert killed_after < 2, "the run finished before it could be killed; raise the epochs"
    res = _cli(sharded, out, "--epochs", epochs, "-q", "--resume")[0]
    assert res["status"] == "ok" and res["resumed_from"] == killed_after + 1
    np.testing.assert_array_equal(np.array(res["acc_matrix"]), np.array(ref["acc_matrix"]))
    np.testing.assert_array_equal(read_acc_matrix(rdir / "acc_matrix.csv"), np.array(ref["acc_matrix"]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_run_with_bf16_autocast_streamed_and_resident(sharded, tmp_path):
    """On a GPU: resident features on the device, bf16 autocast recorded in the config, streamed = resident."""
    import json

    res = _cli(sharded, tmp_path / "gpu", "--epochs", "3", "-q", "--device", "cuda", "--amp", "bf16")[0]
    assert res["status"] == "ok", res.get("error")
    cfg = json.loads((tmp_path / "gpu" / "toy-3x2" / "lll" / "seed0" / "config.json").read_text())
    assert cfg["amp"] == "bf16" and cfg["device"] == "cuda"
    A = np.array(res["acc_matrix"])
    assert np.isfinite(A).all() and A[0, 0] > 0.5
    resident = FeatureSet.from_stores([sharded.store], device="cuda", shuffle_blocks=1, block_rows=8)
    assert resident.streams["audio"].is_cuda and resident.streams["audio"].dtype == torch.float16
    streamed = FeatureSet.from_stores([sharded.store], device="cuda", memory_budget=2 * 8 * 136, block_rows=8)
    r1, r2 = _run(resident, sharded, "lll"), _run(streamed, sharded, "lll")
    streamed.streamer.close()
    np.testing.assert_array_equal(r1.acc_matrix, r2.acc_matrix)


# -- batched seeds ----------------------------------------------------------------------------------
@pytest.mark.parametrize("method,drop_last", [("lll", True), pytest.param("finetune", False, marks=pytest.mark.slow)])
def test_batched_seeds_give_the_accuracy_matrices_of_separate_runs(sharded, tmp_path, method, drop_last):
    """drop_last (as --preset av-cil sets it): 24 clips per task in batches of 16 drop the last 8."""
    from train.batched import fit_batched, why_not_batched

    fs = FeatureSet.from_stores([sharded.store])
    head = {**HEAD, "dropout": 0.0}

    def trainer(seed, **kw):
        return Trainer(fs, load_protocol(sharded.protocol), build_method(method, {**TINY, "drop_last": drop_last}),
                       head_config=head, seed=seed, **kw)

    separate = [trainer(s).fit() for s in (0, 1, 2)]
    batched = fit_batched([trainer(s) for s in (0, 1, 2)])
    for a, b in zip(separate, batched):
        np.testing.assert_array_equal(a.acc_matrix, b.acc_matrix)
    assert not np.array_equal(separate[0].acc_matrix, separate[1].acc_matrix)  # the seeds do differ
    # dropout draws masks per run: not batched
    with_dropout = [Trainer(fs, load_protocol(sharded.protocol), build_method(method, TINY),
                            head_config={**HEAD, "dropout": 0.1}, seed=s) for s in (0, 1)]
    assert "dropout" in why_not_batched(with_dropout)


def test_cli_batch_seeds_writes_the_runs_of_separate_seeds(sharded, tmp_path):
    base = ["--set", "head.dropout=0", "--epochs", "3", "-q", "--seeds", "0,1"]
    sep = _cli(sharded, tmp_path / "sep", *base)
    bat = _cli(sharded, tmp_path / "bat", *base, "--batch-seeds")
    assert [r["seed"] for r in bat] == [0, 1] and all(r.get("batched_seeds") == 2 for r in bat)
    for a, b in zip(sep, bat):
        assert a["acc_matrix"] == b["acc_matrix"]
        rdir = tmp_path / "bat" / "toy-3x2" / "lll" / f"seed{b['seed']}"
        assert (rdir / "metrics.json").is_file() and (rdir / "config.json").is_file()
    # a configuration that is not sound batched (dropout) runs seed by seed, with the same results
    drop = _cli(sharded, tmp_path / "drop", "--epochs", "2", "-q", "--seeds", "0,1", "--batch-seeds")
    assert all(r["status"] == "ok" and "batched_seeds" not in r for r in drop)
