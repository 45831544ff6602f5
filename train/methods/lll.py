"""``lll``: "Listen, Look, and Learn" (seed 001): audio-guided attention + dual-level distillation.

Head ``guided`` (:mod:`train.heads.guided_attention`); each batch of current
samples is joined by a batch of exemplars (``'paired'`` replay). From the
second task on:

    L = CE_sep(z, y)                                               (task-separated CE)
        + lambda_feat * mean_{exemplars, channels} (f - f_old)^2   (feature distillation)
        + lambda_kd * sum_{k < t} T^2 KL(softmax(z_old[:, task k]/T) || softmax(z[:, task k]/T))
                                                                    (task-wise logit KD)

where f is the attended (pooled) feature of the head and f_old, z_old those of
the previous task's model. The KD runs on every sample of the batch, the
feature distillation on the exemplars only. Switches for the paper's loss
ablation: ``sep_ce=false`` (plain CE over all seen classes), ``feat_kd=false``,
``logit_kd=false``.

Optimiser defaults are the paper's: SGD, lr 5e-5, weight decay 1e-4, cosine
annealing, 200 epochs per task. The paper does not give the momentum: 0.9 is
assumed. ``--preset av-cil`` trains with AV-CIL's settings instead (Adam, lr 1e-3,
constant); ``--preset synth`` with the settings tuned for the embedded synth data.
The paper states neither the distance of the feature distillation (mean
squared error assumed) nor the loss weights (1 assumed) nor the temperature
(2, as in AV-CIL's task-wise KD, assumed).

Batch size: the paper does not state it; AV-CIL's 256 current samples + 128
exemplars per step are assumed (the shared defaults). The paper's learning rate
was set for that batch size on large datasets: with SGD at 5e-5 and batches of
256, a small dataset gives a few steps per epoch and the head barely moves
(the trainer warns when a task ends near chance); use ``--preset av-cil`` or
``--preset synth`` there, or scale ``lr`` with ``batch_size``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from train.methods import losses
from train.methods.base import Hparams, Method, register_method


@dataclass(frozen=True)
class LLLHparams(Hparams):
    optimizer: str = "sgd"
    lr: float = 5e-5
    momentum: float = 0.9
    weight_decay: float = 1e-4
    scheduler: str = "cosine"
    epochs: int = 200
    sep_ce: bool = True
    feat_kd: bool = True
    logit_kd: bool = True
    lambda_feat: float = 1.0
    lambda_kd: float = 1.0
    T: float = 2.0


@register_method("lll")
class LLL(Method):
    Hparams = LLLHparams
    replay = "paired"
    uses_teacher = True
    default_head = "guided"

    def loss(self, batch, out):
        hp, y = self.hp, batch["y"]
        if hp.sep_ce:
            terms = {"ce": losses.task_separated_ce(out["logits"], y, self.n_old)}
        else:
            terms = {"ce": F.cross_entropy(out["logits"], y)}
        old = self.teacher(batch)
        if old is None:
            return terms
        if hp.feat_kd:
            ex = y < self.n_old
            if ex.any():
                terms["feat_kd"] = hp.lambda_feat * losses.feature_distillation(out["feature"][ex], old["feature"][ex])
        if hp.logit_kd:
            terms["logit_kd"] = hp.lambda_kd * losses.task_wise_kd(
                out["logits"], old["logits"], self.trainer.offsets_old, hp.T)
        return terms
