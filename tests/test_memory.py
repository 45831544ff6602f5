"""Exemplar selection and the per-class quota rule."""
from __future__ import annotations

import json

import numpy as np
import pytest

from train.memory import ExemplarMemory, herding_select, random_select


def task_classes(first_class, n_classes, per_class=60):
    """{class: FeatureSet indices}, classes laid out in contiguous blocks of rows."""
    return {
        c: np.arange(c * per_class, (c + 1) * per_class)
        for c in range(first_class, first_class + n_classes)
    }


def test_quota_arithmetic_ave_budget():
    mem = ExemplarMemory(340, "random", seed=0)
    mem.update(task_classes(0, 7))
    assert {c: v.size for c, v in mem.per_class().items()} == {c: 48 for c in range(7)}
    assert len(mem) == 336 and mem.indices().size == 336
    mem.update(task_classes(7, 7))
    assert {c: v.size for c, v in mem.per_class().items()} == {c: 24 for c in range(14)}
    mem.update(task_classes(14, 7))
    assert all(v.size == 340 // 21 == 16 for v in mem.per_class().values())
    # exemplars of a class are that class's own samples, without repeats
    for c, v in mem.per_class().items():
        assert np.all((v >= c * 60) & (v < (c + 1) * 60))
        assert np.unique(v).size == v.size
    np.testing.assert_array_equal(mem.labels(), np.repeat(np.arange(21), 16))


def test_old_classes_keep_their_earliest_selected_exemplars():
    mem = ExemplarMemory(340, "random", seed=3)
    mem.update(task_classes(0, 7))
    before = mem.per_class()
    mem.update(task_classes(7, 7))
    after = mem.per_class()
    for c in range(7):
        np.testing.assert_array_equal(after[c], before[c][:24])


def test_small_class_keeps_all_its_samples():
    mem = ExemplarMemory(100, "random", seed=0)
    mem.update({0: np.arange(5), 1: np.arange(5, 200)})
    assert sorted(mem.per_class()[0].tolist()) == [0, 1, 2, 3, 4]
    assert mem.per_class()[1].size == 50


def test_zero_budget_keeps_nothing():
    mem = ExemplarMemory(0)
    mem.update(task_classes(0, 3))
    assert len(mem) == 0 and mem.indices().dtype == np.int64


def test_random_selection_is_deterministic_given_seed_and_order_independent():
    a, b, other = ExemplarMemory(40, seed=7), ExemplarMemory(40, seed=7), ExemplarMemory(40, seed=8)
    classes = task_classes(0, 4)
    a.update(classes)
    b.update(dict(reversed(list(classes.items()))))
    other.update(classes)
    for c in range(4):
        np.testing.assert_array_equal(a.per_class()[c], b.per_class()[c])
    assert any(not np.array_equal(a.per_class()[c], other.per_class()[c]) for c in range(4))


def test_random_select_is_a_uniform_subset_in_selection_order():
    idx = np.arange(100, 110)
    pick = random_select(idx, 4, np.random.default_rng(0))
    assert pick.size == 4 and np.unique(pick).size == 4 and set(pick) <= set(idx)
    np.testing.assert_array_equal(pick, random_select(idx, 4, 0))
    assert random_select(idx, 50, 0).size == 10


def test_herding_hand_built_order_uses_normalised_features():
    # unit directions (1,0), (0,1), (0.8,0.6); mean mu = (0.6, 0.5333)
    # step 1: |(0.8,0.6) - mu| = 0.21 beats 0.67 and 0.76 -> row 2
    # step 2: mean with (0,1) = (0.4,0.8), distance 0.33 < mean with (1,0) = (0.9,0.3), 0.38 -> row 1
    # step 3: row 0. (Unnormalised features would pick 2, 0, 1.)
    feats = np.array([[5.0, 0.0], [0.0, 0.1], [0.8, 0.6]])
    np.testing.assert_array_equal(herding_select(feats, 3), [2, 1, 0])
    np.testing.assert_array_equal(herding_select(feats, 1), [2])


def test_herding_never_picks_a_sample_twice():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(30, 8))
    order = herding_select(feats, 30)
    assert sorted(order.tolist()) == list(range(30))
    # identical rows: selection with replacement would pick the same row again
    dup = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert sorted(herding_select(dup, 2).tolist()) in ([0, 1], [0, 2], [1, 2])
    assert np.unique(herding_select(dup, 3)).size == 3
    assert herding_select(feats, 100).size == 30


def test_memory_with_herding_uses_features_fn():
    feats = np.array([[5.0, 0.0], [0.0, 0.1], [0.8, 0.6], [1.0, 1.0], [1.0, 1.0]])
    mem = ExemplarMemory(4, "herding")
    mem.update({0: np.array([10, 11, 12]), 1: np.array([13, 14])}, features_fn=lambda idx: feats[idx - 10])
    np.testing.assert_array_equal(mem.per_class()[0], [12, 11])
    assert sorted(mem.per_class()[1].tolist()) == [13, 14]
    with pytest.raises(ValueError, match="features_fn"):
        ExemplarMemory(4, "herding").update({0: np.arange(3)})
    with pytest.raises(ValueError, match=r"shape \(2, 2\).*class 0"):
        ExemplarMemory(4, "herding").update({0: np.arange(3)}, features_fn=lambda idx: np.ones((2, 2)))


def test_state_dict_round_trip_through_json():
    mem = ExemplarMemory(30, "random", seed=5)
    mem.update(task_classes(0, 2))
    mem.update(task_classes(2, 1))
    restored = ExemplarMemory(1)
    restored.load_state_dict(json.loads(json.dumps(mem.state_dict())))
    assert restored.classes == [0, 1, 2] and restored.memory_size == 30 and restored.seed == 5
    np.testing.assert_array_equal(restored.indices(), mem.indices())
    restored.update(task_classes(3, 2))
    assert all(v.size == 6 for v in restored.per_class().values())


def test_bad_updates_are_named():
    mem = ExemplarMemory(10)
    mem.update({0: np.arange(3)})
    with pytest.raises(ValueError, match="class 0 is already"):
        mem.update({0: np.arange(3)})
    with pytest.raises(ValueError, match="class 4 contain duplicates"):
        mem.update({4: np.array([1, 1, 2])})
    with pytest.raises(ValueError, match="unknown exemplar selection 'best'"):
        ExemplarMemory(10, "best")
    with pytest.raises(KeyError, match="per_class"):
        mem.load_state_dict({"memory_size": 1, "selection": "random", "seed": 0})
