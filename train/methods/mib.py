"""``mib``: Modeling the Background (Cermelli et al., CVPR 2020) for continual semantic segmentation.

From the second task on: the unbiased cross-entropy on the current labels (a
background pixel may be any old class) plus ``lambda_kd`` x the unbiased
distillation from the previous model (its background matches the new model's
"background or a new class"); the new classes' classifier rows start as the
background row with the bias shifted by ``-log(n_new + 1)``
(:mod:`train.methods.semantic_losses`). Task 0: the plain pixel cross-entropy.
``lambda_kd = 10`` is MiB's Pascal-VOC setting. Semantic protocols only.
"""
from __future__ import annotations

from dataclasses import dataclass

from train.methods import semantic_losses as L
from train.methods.base import Hparams, Method, register_method


def require_semantic(method: Method) -> None:
    from train.trainer import TrainError

    tr = method.trainer
    if tr.problem.kind != "semantic":
        raise TrainError(f"method {method.name!r} trains semantic segmentation protocols (kind 'semantic'); "
                         f"protocol {tr.protocol.name!r} is {tr.protocol.kind!r}")


@dataclass(frozen=True)
class MiBHparams(Hparams):
    lambda_kd: float = 10.0  # weight of the unbiased distillation
    init_balanced: bool = True  # new rows start as the background row


@register_method("mib")
class MiB(Method):
    Hparams = MiBHparams
    replay = "none"
    uses_teacher = True
    segmentation_only = True

    def attach(self, trainer) -> None:
        super().attach(trainer)
        require_semantic(self)

    def before_task(self, task: int) -> None:
        if task > 0 and self.hp.init_balanced:
            L.balanced_init(self.trainer.model.classifier, self.n_old, self.trainer.n_seen)

    def loss(self, batch, out):
        v = batch["valid"]
        z, y = out["mask_logits"][v], batch["masks"][v]
        if z.shape[0] == 0:
            return {"ce": out["mask_logits"].sum() * 0.0}
        if self.n_old == 0:
            return self.trainer.problem.loss(batch, out)
        terms = {"ce": L.unbiased_ce(z, y, self.n_old)}
        old = self.teacher(batch)
        if old is not None and self.hp.lambda_kd:
            terms["kd"] = self.hp.lambda_kd * L.unbiased_kd(z, old["mask_logits"][v])
        return terms
