"""``lwf``: Learning without Forgetting (Li & Hoiem, ECCV 2016) as benchmarked by AV-CIL; no exemplars.

LwF trains the new task's outputs on the new data and keeps every old task's
outputs on that data close to what the previous model gave (each old task's
classes form their own softmax, as LwF's old task heads do). From the second
task on, with ``n_old`` old classes and old-task boundaries ``b_k``:

    L = CE(softmax(z[:, n_old:]), y - n_old)
        + lamb * sum_{k < t} T^2 * KL(softmax(z_old[:, b_k:b_{k+1}] / T) || softmax(z[:, b_k:b_{k+1}] / T))

(at task 0 the plain cross-entropy). Predictions are the argmax over all seen
classes. The loss is computed each step from this method's own terms (the
public AV-CIL baseline shadowed its loss function with a variable and crashed
at step 0).

Segmentation: the problem's loss (BCE + Dice, + class CE in CIL) plus ``lamb`` x
the BCE of the new mask logits against the old model's mask probabilities on
every frame of the batch (+ KD on the old classes' logits with a class head);
:meth:`train.problems.SegmentationProblem.distill`.
"""
from __future__ import annotations

from dataclasses import dataclass

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
        problem = self.trainer.problem
        if problem.kind != "classification":
            # segmentation: the task loss plus distillation of the old model's masks (and old classes)
            terms = problem.loss(batch, out)
            old = self.teacher(batch)
            if old is not None:
                terms["kd"] = self.hp.lamb * problem.distill(batch, out, old)
            return terms
        # only current-task samples here, so this is the CE over the new classes
        terms = {"ce": losses.task_separated_ce(out["logits"], batch["y"], self.n_old)}
        old = self.teacher(batch)
        if old is not None:
            terms["kd"] = self.hp.lamb * losses.task_wise_kd(
                out["logits"], old["logits"], self.trainer.offsets_old, self.hp.T)
        return terms
