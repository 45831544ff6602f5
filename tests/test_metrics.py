"""Continual-learning metrics against published numbers and hand-computed matrices."""
from __future__ import annotations

import numpy as np
import pytest

from avcl_core import metrics as m

# Published step accuracies / per-step forgetting on AVE-CI (4 tasks of 7 classes).
AVCIL_STEPS = [0.798077, 0.771429, 0.714286, 0.677665]
AVCIL_F = [0.076923, 0.091165, 0.060869]
ICARL_FC_STEPS = [0.798077, 0.685714, 0.615873, 0.535533]
ICARL_FC_F = [0.182692, 0.272406, 0.327337]


def matrix_with_forgetting(f_per_step, top=0.95, spread=0.02):
    """A (T, T) accuracy matrix whose per-step forgetting F_t equals ``f_per_step``.

    The diagonal is ``top`` and every old task drops below it, so the running best
    of every task stays ``top``; row t's old-task scores are ``top - F_t`` plus
    offsets that sum to zero (so the per-task values differ but their mean does not).
    """
    T = len(f_per_step) + 1
    A = np.full((T, T), np.nan)
    for t in range(T):
        A[t, t] = top
        if t:
            offsets = np.linspace(spread, -spread, t) if t > 1 else np.zeros(1)
            A[t, :t] = top - f_per_step[t - 1] + offsets
    return A


# Hand-computed 3-task example where an old task improves (negative forgetting)
# and the running best matters. Superdiagonal = scores before training a task.
HAND = np.array(
    [
        [0.50, 0.10, 0.00],
        [0.80, 0.70, 0.20],
        [0.60, 0.75, 0.90],
    ]
)


def test_mean_accuracy_reproduces_published_ave_numbers():
    assert round(100 * m.mean_accuracy(AVCIL_STEPS), 2) == 74.04
    assert round(100 * m.mean_accuracy(ICARL_FC_STEPS), 2) == 65.88


@pytest.mark.parametrize("f_steps, expected", [(AVCIL_F, 7.63), (ICARL_FC_F, 26.08)])
def test_average_forgetting_reproduces_published_ave_numbers(f_steps, expected):
    A = matrix_with_forgetting(f_steps)
    np.testing.assert_allclose(m.forgetting_per_step(A), f_steps, atol=1e-12)
    assert round(100 * m.average_forgetting(A), 2) == expected


def test_average_forgetting_hand_computed_with_running_best_and_negative_value():
    # F_1 = best_0 - A[1,0] = 0.5 - 0.8 = -0.3 (task 0 improved: negative forgetting)
    # F_2: best_0 = max(0.5, 0.8) = 0.8, best_1 = 0.7 -> ((0.8-0.6) + (0.7-0.75)) / 2 = 0.075
    np.testing.assert_allclose(m.forgetting_per_step(HAND), [-0.3, 0.075])
    assert m.average_forgetting(HAND) == pytest.approx((-0.3 + 0.075) / 2)
    assert m.average_forgetting(HAND) < 0


def test_average_forgetting_second_hand_example():
    A = np.array([[0.9, 0, 0], [0.6, 0.8, 0], [0.7, 0.5, 0.9]])
    # F_1 = 0.9 - 0.6 = 0.3; F_2 = ((0.9-0.7) + (0.8-0.5)) / 2 = 0.25
    assert m.average_forgetting(A) == pytest.approx(0.275)


def test_running_best_excludes_the_current_step():
    # Task 0 peaks at step 2; F_2 must compare with the best *before* step 2 (0.6),
    # giving -0.3, and F_3 then uses the updated best 0.9.
    A = np.array(
        [
            [0.6, 0, 0, 0],
            [0.5, 0.7, 0, 0],
            [0.9, 0.7, 0.8, 0],
            [0.4, 0.6, 0.8, 0.9],
        ]
    )
    # F_1 = 0.6 - 0.5 = 0.1
    # F_2 = ((0.6-0.9) + (0.7-0.7)) / 2 = -0.15
    # F_3 = ((0.9-0.4) + (0.7-0.6) + (0.8-0.8)) / 3 = 0.2
    np.testing.assert_allclose(m.forgetting_per_step(A), [0.1, -0.15, 0.2])


def test_matrix_summaries_hand_computed():
    assert m.final_forgetting(HAND) == pytest.approx(((0.8 - 0.6) + (0.75 - 0.75)) / 2)
    assert m.learning_accuracy(HAND) == pytest.approx((0.5 + 0.7 + 0.9) / 3)
    assert m.average_accuracy(HAND) == pytest.approx((0.6 + 0.75 + 0.9) / 3)
    assert m.backward_transfer(HAND) == pytest.approx(((0.6 - 0.5) + (0.75 - 0.7)) / 2)
    assert m.forward_transfer(HAND) == pytest.approx((0.1 + 0.2) / 2)
    assert m.task_balanced_accuracy(HAND, 1) == pytest.approx((0.8 + 0.7) / 2)
    assert m.task_balanced_accuracy(HAND, 0) == pytest.approx(0.5)


def test_step_metrics_hand_computed():
    assert m.last_accuracy([0.9, 0.8, 0.55]) == pytest.approx(0.55)
    assert m.mean_accuracy([1.0]) == 1.0
    # AVE test split: 104, 106, 105, 79 clips in tasks 0..3 (published step 3 = 267/394)
    counts = [104, 106, 105, 79]
    correct = [60, 70, 70, 67]
    assert m.step_accuracy(correct, counts, 3) == pytest.approx(0.677665, abs=1e-6)
    # only tasks 0..1 count at step 1: (60 + 70) / (104 + 106)
    assert m.step_accuracy(correct, counts, 1) == pytest.approx(130 / 210)


def test_step_accuracy_differs_from_task_balanced_accuracy():
    # 90 samples at 100 % and 10 samples at 0 %: sample-weighted 0.9, task-balanced 0.5
    assert m.step_accuracy([90, 0], [90, 10], 1) == pytest.approx(0.9)
    A = np.array([[1.0, 0.0], [1.0, 0.0]])
    assert m.task_balanced_accuracy(A, 1) == pytest.approx(0.5)


def test_entries_above_the_diagonal_are_ignored_except_by_forward_transfer():
    A = HAND.copy()
    A[0, 1], A[0, 2], A[1, 2] = np.nan, 0.99, np.nan
    for f in (m.average_forgetting, m.final_forgetting, m.learning_accuracy,
              m.average_accuracy, m.backward_transfer):
        assert f(A) == pytest.approx(f(HAND))
    with pytest.raises(ValueError, match=r"A\[0, 1\]"):
        m.forward_transfer(A)
    assert np.isnan(m.summarize(A, [0.5, 0.75, 0.75])["forward_transfer"])


def test_functions_never_mutate_inputs():
    A = HAND.copy()
    A_list = HAND.tolist()
    steps = np.array([0.5, 0.7, 0.6])
    steps_before, A_before = steps.copy(), A.copy()
    for f in (m.average_forgetting, m.forgetting_per_step, m.final_forgetting,
              m.learning_accuracy, m.average_accuracy, m.backward_transfer, m.forward_transfer):
        f(A)
        f(A_list)
    m.task_balanced_accuracy(A, 2)
    m.mean_accuracy(steps)
    m.last_accuracy(steps)
    m.summarize(A, steps)
    np.testing.assert_array_equal(A, A_before)
    np.testing.assert_array_equal(steps, steps_before)
    assert A_list == HAND.tolist()


def test_summarize_returns_every_metric():
    out = m.summarize(HAND, [0.5, 0.75, 0.75])
    assert out == pytest.approx(
        {
            "mean_accuracy": (0.5 + 0.75 + 0.75) / 3,
            "last_accuracy": 0.75,
            "average_forgetting": (-0.3 + 0.075) / 2,
            "final_forgetting": 0.1,
            "learning_accuracy": 0.7,
            "average_accuracy": 0.75,
            "backward_transfer": 0.075,
            "forward_transfer": 0.15,
        }
    )


def test_single_task_has_undefined_forgetting_and_transfer():
    A = [[0.8]]
    assert np.isnan(m.average_forgetting(A))
    assert np.isnan(m.final_forgetting(A))
    assert np.isnan(m.backward_transfer(A))
    assert np.isnan(m.forward_transfer(A))
    assert m.learning_accuracy(A) == pytest.approx(0.8)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match=r"shape \(2, 3\)"):
        m.average_forgetting(np.zeros((2, 3)))
    A = HAND.copy()
    A[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"A\[2, 1\]"):
        m.learning_accuracy(A)
    with pytest.raises(ValueError, match="step 1"):
        m.mean_accuracy([0.5, float("nan")])
    with pytest.raises(ValueError, match="3 step accuracies"):
        m.summarize(np.eye(2), [1, 1, 1])
    with pytest.raises(ValueError, match="t=2"):
        m.step_accuracy([1, 2], [3, 4], 2)


def test_accuracy_matrix_from_predictions():
    labels = np.array([0, 1, 2, 3])
    task = np.array([0, 0, 1, 1])
    preds = [np.array([0, 1, 0, 0]), np.array([0, 0, 2, 3])]
    A = m.accuracy_matrix(preds, labels, task)
    np.testing.assert_allclose(A, [[1.0, 0.0], [0.5, 1.0]])
