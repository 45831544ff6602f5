"""Continual-learning metrics: pure functions on step accuracies and accuracy matrices.

Notation used by every docstring below:

* ``T`` tasks (incremental steps), numbered ``0 .. T-1``.
* ``A`` is a ``(T, T)`` array; ``A[t, i]`` is the score (top-1 accuracy, or any
  per-task score such as mIoU) after training task ``t``, measured on the test
  samples of task ``i``. Entries with ``i > t`` (tasks not trained yet) are
  ignored by every function except :func:`forward_transfer`; they may be NaN.
* ``acc_t`` (``step_acc[t]``) is the sample-weighted accuracy after task ``t``
  over the test samples of all tasks seen so far (:func:`step_accuracy`).

Values are fractions in ``[0, 1]``; reports multiply by 100. No function
modifies its inputs. Metrics that need at least two tasks (forgetting,
transfer) return NaN for ``T = 1``, where they are undefined.

Mean Accuracy and Average Forgetting follow the published audio-visual
class-incremental benchmarks (AVE-CI, KS-CI, VS100-CI); LA, AA, F, BWT and FWT
follow the continual audio-visual segmentation literature.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = [
    "accuracy_matrix",
    "average_accuracy",
    "average_forgetting",
    "backward_transfer",
    "final_forgetting",
    "forgetting_per_step",
    "forward_transfer",
    "last_accuracy",
    "learning_accuracy",
    "mean_accuracy",
    "step_accuracy",
    "summarize",
    "task_balanced_accuracy",
]


# -- input checks (copies, so callers' arrays are never touched) -----------------
def _matrix(A) -> np.ndarray:
    M = np.array(A, dtype=np.float64, copy=True)
    if M.ndim != 2 or M.shape[0] != M.shape[1] or M.shape[0] == 0:
        raise ValueError(
            f"accuracy matrix must be a non-empty square (T, T) array, got shape {M.shape}"
        )
    bad = np.argwhere(~np.isfinite(M) & np.tri(M.shape[0], dtype=bool))
    if bad.size:
        t, i = bad[0]
        raise ValueError(f"accuracy matrix entry A[{t}, {i}] (i <= t) is not finite: {M[t, i]}")
    return M


def _steps(step_acc) -> np.ndarray:
    s = np.array(step_acc, dtype=np.float64, copy=True)
    if s.ndim != 1 or s.size == 0:
        raise ValueError(f"step accuracies must be a non-empty 1-D sequence, got shape {s.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError(f"step accuracy at step {int(np.argmin(np.isfinite(s)))} is not finite")
    return s


# -- step-accuracy metrics ---------------------------------------------------------
def mean_accuracy(step_acc: Sequence[float]) -> float:
    """Mean Accuracy = (1/T) * sum_{t=0}^{T-1} acc_t, step 0 included.

    ``acc_t`` is the sample-weighted accuracy over all seen classes' test samples
    after task ``t`` (:func:`step_accuracy`).
    """
    return float(_steps(step_acc).mean())


def last_accuracy(step_acc: Sequence[float]) -> float:
    """Last accuracy = acc_{T-1}, the step accuracy after the final task."""
    return float(_steps(step_acc)[-1])


def step_accuracy(correct_per_task, count_per_task, t: int) -> float:
    """Sample-weighted accuracy over the tasks seen after task ``t``.

    acc_t = sum_{i<=t} correct[i] / sum_{i<=t} count[i]

    ``correct_per_task[i]`` is the number of correctly classified test samples of
    task ``i`` (evaluated after task ``t``) and ``count_per_task[i]`` the number
    of test samples of task ``i``; both are 1-D with at least ``t + 1`` entries
    (later entries are ignored).
    """
    correct = np.asarray(correct_per_task, dtype=np.float64)
    count = np.asarray(count_per_task, dtype=np.float64)
    if correct.ndim != 1 or count.ndim != 1:
        raise ValueError(
            f"correct_per_task and count_per_task must be 1-D, got shapes {correct.shape} and {count.shape}"
        )
    if t < 0 or correct.size <= t or count.size <= t:
        raise ValueError(
            f"step t={t} needs at least {t + 1} tasks; got {correct.size} correct counts "
            f"and {count.size} sample counts"
        )
    n = count[: t + 1].sum()
    if n <= 0:
        raise ValueError(f"no test samples in tasks 0..{t}: cannot compute the step accuracy")
    c = correct[: t + 1]
    if np.any(c < 0) or np.any(c > count[: t + 1]):
        raise ValueError(f"correct counts {c.tolist()} must lie between 0 and the sample counts {count[: t + 1].tolist()}")
    return float(c.sum() / n)


# -- accuracy-matrix metrics -------------------------------------------------------
def task_balanced_accuracy(A, t: int) -> float:
    """Task-balanced accuracy after task ``t`` = (1/(t+1)) * sum_{i<=t} A[t, i].

    Unlike :func:`step_accuracy`, every seen task weighs the same whatever its
    number of test samples.
    """
    M = _matrix(A)
    if not 0 <= t < M.shape[0]:
        raise ValueError(f"step t={t} is outside 0..{M.shape[0] - 1}")
    return float(M[t, : t + 1].mean())


def forgetting_per_step(A) -> np.ndarray:
    """Per-step forgetting F_t for t = 1 .. T-1 (array of length T-1).

    F_t = (1/t) * sum_{i<t} (best_i(t) - A[t, i]),
    best_i(t) = max_{i <= tau < t} A[tau, i],

    i.e. the running best of task ``i`` is taken over the steps *before* ``t``
    (it is updated after F_t is computed). F_t may be negative when old tasks
    improve.
    """
    M = _matrix(A)
    T = M.shape[0]
    per_step = np.empty(T - 1)
    best = M[:1, 0].copy()
    for t in range(1, T):
        per_step[t - 1] = np.mean(best - M[t, :t])
        # update the running best only now, then add the new task's first score
        best = np.append(np.maximum(best, M[t, :t]), M[t, t])
    return per_step


def average_forgetting(A) -> float:
    """Average Forgetting of the audio-visual class-incremental benchmarks.

    AF = (1/(T-1)) * sum_{t=1}^{T-1} F_t, with F_t from :func:`forgetting_per_step`:
    F_t = (1/t) * sum_{i<t} (max_{i <= tau < t} A[tau, i] - A[t, i]).
    May be negative. NaN for T = 1.
    """
    per_step = forgetting_per_step(A)
    return float(per_step.mean()) if per_step.size else float("nan")


def final_forgetting(A) -> float:
    """Final forgetting F = (1/(T-1)) * sum_{k<T-1} (max_{k<=t<=T-1} A[t, k] - A[T-1, k]).

    How far each old task ends below its best score; never negative. NaN for T = 1.
    """
    M = _matrix(A)
    T = M.shape[0]
    if T < 2:
        return float("nan")
    best = np.array([M[k:, k].max() for k in range(T - 1)])
    return float(np.mean(best - M[T - 1, : T - 1]))


def learning_accuracy(A) -> float:
    """Learning accuracy LA = (1/T) * sum_k A[k, k] (each task right after learning it)."""
    M = _matrix(A)
    return float(np.mean(np.diag(M)))


def average_accuracy(A) -> float:
    """Average accuracy AA = (1/T) * sum_k A[T-1, k] (all tasks after the final task)."""
    M = _matrix(A)
    return float(np.mean(M[-1]))


def backward_transfer(A) -> float:
    """Backward transfer BWT = (1/(T-1)) * sum_{k<T-1} (A[T-1, k] - A[k, k]).

    Negative when learning later tasks hurts earlier ones. NaN for T = 1.
    """
    M = _matrix(A)
    T = M.shape[0]
    if T < 2:
        return float("nan")
    return float(np.mean(M[T - 1, : T - 1] - np.diag(M)[: T - 1]))


def forward_transfer(A) -> float:
    """Forward transfer FWT = (1/(T-1)) * sum_{k>=1} A[k-1, k].

    The score on task ``k`` just *before* training on it (the superdiagonal;
    the only metric reading entries with i > t). NaN for T = 1.
    """
    M = _matrix(A)
    T = M.shape[0]
    if T < 2:
        return float("nan")
    sup = np.diag(M, k=1)
    if not np.all(np.isfinite(sup)):
        k = int(np.argmin(np.isfinite(sup))) + 1
        raise ValueError(f"forward transfer needs A[{k - 1}, {k}], which is not finite: {sup[k - 1]}")
    return float(np.mean(sup))


def accuracy_matrix(predictions_per_step, labels, task_of_sample, num_tasks: int | None = None) -> np.ndarray:
    """Accuracy matrix from the predictions made after each task.

    ``predictions_per_step[t]`` holds the predicted class of every test sample
    (shape ``(N,)``) after training task ``t``; ``labels`` the true classes
    ``(N,)``; ``task_of_sample`` the task id of each sample's class ``(N,)``.

    Returns ``A`` of shape ``(T, num_tasks)`` (``num_tasks`` defaults to the
    number of steps) with ``A[t, i] = mean(pred_t[s] == labels[s] for s in task i)``,
    NaN for a task without test samples. Every entry is computed, including
    future tasks (i > t), which :func:`forward_transfer` reads.
    """
    labels = np.asarray(labels)
    tasks = np.asarray(task_of_sample)
    if labels.ndim != 1 or labels.shape != tasks.shape:
        raise ValueError(
            f"labels and task_of_sample must be 1-D of equal length, got {labels.shape} and {tasks.shape}"
        )
    steps = [np.asarray(p) for p in predictions_per_step]
    T = len(steps)
    n_tasks = T if num_tasks is None else int(num_tasks)
    A = np.full((T, n_tasks), np.nan)
    for t, pred in enumerate(steps):
        if pred.shape != labels.shape:
            raise ValueError(f"predictions after task {t} have shape {pred.shape}, labels {labels.shape}")
        hit = pred == labels
        for i in range(n_tasks):
            sel = tasks == i
            if sel.any():
                A[t, i] = hit[sel].mean()
    return A


def summarize(A, step_acc: Sequence[float]) -> dict[str, float]:
    """All summary metrics of one run, as fractions.

    Keys: ``mean_accuracy``, ``last_accuracy`` (from ``step_acc``),
    ``average_forgetting``, ``final_forgetting``, ``learning_accuracy``,
    ``average_accuracy``, ``backward_transfer``, ``forward_transfer`` (from ``A``;
    NaN here when the superdiagonal of ``A`` was not recorded). ``step_acc`` must have one entry per row of ``A``.
    """
    M = _matrix(A)
    s = _steps(step_acc)
    if s.size != M.shape[0]:
        raise ValueError(f"{s.size} step accuracies for an accuracy matrix of {M.shape[0]} tasks")
    T = M.shape[0]
    fwt = forward_transfer(A) if T < 2 or np.all(np.isfinite(np.diag(M, k=1))) else float("nan")
    return {
        "mean_accuracy": mean_accuracy(s),
        "last_accuracy": last_accuracy(s),
        "average_forgetting": average_forgetting(M),
        "final_forgetting": final_forgetting(M),
        "learning_accuracy": learning_accuracy(M),
        "average_accuracy": average_accuracy(M),
        "backward_transfer": backward_transfer(M),
        "forward_transfer": fwt,
    }
