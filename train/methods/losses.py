"""Loss terms shared by several methods (pure functions of tensors).

Notation: ``logits`` (B, C) over the seen classes in arrival order, ``y`` (B,)
labels, ``n_old`` classes seen before the current task, ``old_logits``
(B, n_old) of the previous task's model, temperature ``T``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def task_separated_ce(logits: torch.Tensor, y: torch.Tensor, n_old: int) -> torch.Tensor:
    """Separated softmax cross-entropy (SS-IL; the task-separated CE of AV-CIL and LLL).

    Current-task samples (y >= n_old) are scored by a softmax over the current
    classes only, exemplars (y < n_old) by a softmax over the old classes only,
    so learning new classes never pushes old logits down through the softmax:

        L = (1/B) * [ sum_{new} -log softmax(z[n_old:])[y - n_old]
                      + sum_{old} -log softmax(z[:n_old])[y] ].

    With ``n_old == 0`` this is the plain cross-entropy.
    """
    if n_old == 0:
        return F.cross_entropy(logits, y)
    new = y >= n_old
    total = logits.new_zeros(())
    if new.any():
        total = total + F.cross_entropy(logits[new, n_old:], y[new] - n_old, reduction="sum")
    if (~new).any():
        total = total + F.cross_entropy(logits[~new, :n_old], y[~new], reduction="sum")
    return total / y.numel()


def kd_kl(logits: torch.Tensor, old_logits: torch.Tensor, T: float) -> torch.Tensor:
    """KL(softmax(old/T) || softmax(new/T)) * T^2, averaged over the batch (Hinton KD)."""
    return F.kl_div(F.log_softmax(logits / T, dim=1), F.softmax(old_logits / T, dim=1),
                    reduction="batchmean") * (T * T)


def task_wise_kd(logits: torch.Tensor, old_logits: torch.Tensor, boundaries: Sequence[int], T: float) -> torch.Tensor:
    """Task-wise KD: sum over old tasks k of KD within task k's classes.

        L = sum_k T^2 * KL(softmax(old[:, b_k:b_{k+1}] / T) || softmax(z[:, b_k:b_{k+1}] / T)),

    ``boundaries`` = [b_0 = 0, b_1, ..., b_K = n_old] (task offsets of the old tasks).
    Each task's softmax is separate, so distillation never couples old tasks.
    """
    total = logits.new_zeros(())
    for lo, hi in zip(boundaries[:-1], boundaries[1:]):
        total = total + kd_kl(logits[:, lo:hi], old_logits[:, lo:hi], T)
    return total


def sigmoid_distillation(logits: torch.Tensor, old_logits: torch.Tensor) -> torch.Tensor:
    """iCaRL distillation: BCE of sigmoid(z_old) against targets sigmoid(old), sigmoid applied once on each side.

        L = mean_{b, c < n_old} BCE(sigmoid(z[b, c]), sigmoid(old[b, c]))

    computed from the raw logits with ``binary_cross_entropy_with_logits``.
    """
    n_old = old_logits.shape[1]
    return F.binary_cross_entropy_with_logits(logits[:, :n_old], torch.sigmoid(old_logits))


def feature_distillation(feature: torch.Tensor, old_feature: torch.Tensor) -> torch.Tensor:
    """Feature distillation: mean over samples and channels of (f - f_old)^2 (MSE)."""
    return F.mse_loss(feature, old_feature)
