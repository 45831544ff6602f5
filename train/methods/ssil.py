"""``ssil``: SS-IL (Ahn et al., ICCV 2021): separated softmax + task-wise KD, with exemplar replay.

Each batch of current samples is joined by a batch of exemplars (``'paired'`` replay):

    L = CE_sep(z, y) + lamb * sum_{k < t} T^2 * KL(softmax(z_old[:, task k] / T) || softmax(z[:, task k] / T))

CE_sep is :func:`~train.methods.losses.task_separated_ce` (current samples over
current classes, exemplars over old classes); the task-wise KD runs on every
sample of the batch, as in the AV-CIL benchmark's SS-IL.
"""
from __future__ import annotations

from dataclasses import dataclass

from train.methods import losses
from train.methods.base import Hparams, Method, register_method


@dataclass(frozen=True)
class SSILHparams(Hparams):
    lamb: float = 1.0  # weight of the task-wise KD
    T: float = 2.0


@register_method("ssil")
class SSIL(Method):
    Hparams = SSILHparams
    replay = "paired"
    uses_teacher = True

    def loss(self, batch, out):
        terms = {"ce": losses.task_separated_ce(out["logits"], batch["y"], self.n_old)}
        old = self.teacher(batch)
        if old is not None:
            terms["kd"] = self.hp.lamb * losses.task_wise_kd(
                out["logits"], old["logits"], self.trainer.offsets_old, self.hp.T)
        return terms
