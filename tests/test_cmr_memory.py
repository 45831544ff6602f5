"""CMR's memory rules as pure functions: MSS selection and CSR resampling."""
from __future__ import annotations

import numpy as np
import pytest

from train.memory import ExemplarMemory, csr_resample, mss_select


def test_mss_keeps_the_smallest_absolute_deltas_in_order():
    idx = np.array([10, 11, 12, 13, 14])
    delta = [0.3, -0.05, 0.0, -0.4, 0.05]
    assert mss_select(idx, delta, 3).tolist() == [12, 11, 14]  # tie |-0.05| = |0.05|: earlier first
    assert mss_select(idx, delta, 9).tolist() == [12, 11, 14, 10, 13]
    with pytest.raises(ValueError, match="not finite"):
        mss_select(idx, [0, np.nan, 0, 0, 0], 2)


def test_csr_resamples_a_fifth_of_the_buffer_in_proportion_to_collisions():
    per_class = {1: np.arange(0, 5), 2: np.arange(5, 10), 3: np.arange(10, 15), 4: np.arange(15, 20)}
    before = {c: v.copy() for c, v in per_class.items()}
    out = csr_resample(per_class, {1: 0.0, 2: 0.25, 3: 0.75}, 0.2, np.random.default_rng(0))
    assert out.size == 20 and all(np.array_equal(per_class[c], before[c]) for c in per_class)  # pure
    counts = np.bincount(out, minlength=20)
    assert counts.sum() == 20 and (counts <= 5).all()
    # 16 distinct survivors of the buffer + 4 draws from classes 2 and 3 only
    survivors_plus = np.bincount(out // 5, minlength=4)
    big = csr_resample(per_class, {2: 0.25, 3: 0.75}, 1.0, np.random.default_rng(1))
    share = np.bincount(big // 5, minlength=4) / big.size
    assert share[0] == 0 and share[3] == 0 and share[2] > share[1]
    assert survivors_plus.sum() == 20
    # no collision: the buffer unchanged
    np.testing.assert_array_equal(csr_resample(per_class, {}, 0.2, 0), np.arange(20))


def test_replace_class_keeps_the_quota():
    m = ExemplarMemory(4, "random", seed=0)
    m.update({0: np.arange(10), 1: np.arange(10, 20)})
    m.replace_class(1, [19, 18, 17, 16])
    assert m.per_class()[1].tolist() == [19, 18]
    with pytest.raises(ValueError):
        m.replace_class(5, [1])
