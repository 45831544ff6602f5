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


@pytest.mark.parametrize("method", ["lll", "icarl"])
def test_streamed_and_in_memory_training_give_identical_accuracy_matrices(sharded, method):
    """lll: paired exemplar batches (pinned rows) and a teacher; icarl: herding over every class."""
    resident = FeatureSet.from_stores([sharded.store], shuffle_blocks=1, block_rows=8)
    streamed = FeatureSet.from_stores([sharded.store], memory_budget=2 * 8 * 136, block_rows=8)
    assert streamed.streamed and streamed.shuffle_blocks == 1
    r1, r2 = _run(resident, sharded, method), _run(streamed, sharded, method)
    streamed.streamer.close()
    np.testing.assert_array_equal(r1.acc_matrix, r2.acc_matrix)
    assert r1.acc_matrix[0, 0] > 0.5  # it learned something
