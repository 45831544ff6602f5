"""``lwf``: Learning without Forgetting (Li & Hoiem, 2017), class-incremental, no exemplars.

    L = CE(z, y) + lamb * T^2 * KL(softmax(z_old_model / T) || softmax(z[:, :n_old] / T))

on current-task samples; the distillation term is present from the second task
on. The loss value is computed each step from this method's own terms (the
public AV-CIL baseline shadowed its loss function and crashed at step 0).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from train.methods import losses
from train.methods.base import Hparams, Method, register_method


@dataclass(frozen=True)
class LwFHparams(Hparams):
    lamb: float = 1.0  # weight of the distillation term
    T: float = 2.0  # distillation temperature


@register_method("lwf")
class LwF(Method):
    Hparams = LwFHparams
    replay = "none"
    uses_teacher = True

    def loss(self, batch, out):
        terms = {"ce": F.cross_entropy(out["logits"], batch["y"])}
        old = self.teacher(batch)
        if old is not None:
            terms["kd"] = self.hp.lamb * losses.lwf_kd(out["logits"], old["logits"], self.hp.T)
        return terms
