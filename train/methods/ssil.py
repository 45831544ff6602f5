"""``ssil``: SS-IL (Ahn et al., ICCV 2021): separated softmax + task-wise KD, with exemplar replay.

Each batch of current samples is joined by a batch of exemplars (``'paired'`` replay):

    L = CE_sep(z, y) + lamb * sum_{k < t} T^2 * KL(softmax(z_old[:, task k] / T) || softmax(z[:, task k] / T))

CE_sep is :func:`~train.methods.losses.task_separated_ce` (current samples over
current classes, exemplars over old classes); the task-wise KD runs on every
sample of the batch, as in the AV-CIL benchmark's SS-IL.
"""
from __future__ import annotations

from train.methods.base import register_method
from train.methods.lwf import LwF


@register_method("ssil")
class SSIL(LwF):
    """LwF's loss (separated softmax + task-wise KD) on current samples joined by exemplars."""

    replay = "paired"
