"""``icarl`` / ``icarl-nme`` / ``icarl-fc``: iCaRL (Rebuffi et al., CVPR 2017) as benchmarked by AV-CIL.

Training (current data and exemplars shuffled together, ``'mixed'`` replay;
exemplars chosen by herding without replacement):

    L = CE(z, y) + lamb * mean_{b, c < n_old} BCE(sigmoid(z[b, c]), sigmoid(z_old[b, c]))

The distillation applies the sigmoid once to each side (through
``binary_cross_entropy_with_logits``); the public AV-CIL baseline applied it twice.

Prediction (``classifier``):

* ``nme``: nearest class mean. With phi(x) = f(x)/||f(x)||, the mean of class c is
  mu_c = m_c/||m_c||, m_c = mean of phi over c's exemplars (recomputed with the
  current model after every task; a class without exemplars keeps the mean of
  its training samples from when it was learnt). Score_c(x) = -||phi(x) - mu_c||.
* ``fc``: the classifier's logits.

With ``--select val-seen``, ``icarl-nme`` selects the epoch whose NME prediction
is best on the val split (class means of that epoch's model; the new classes'
from their training samples, as they have no exemplars yet).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from train.methods import losses
from train.methods.base import Hparams, Method, register_method


@dataclass(frozen=True)
class ICaRLHparams(Hparams):
    classifier: str = "nme"  # nme | fc
    lamb: float = 1.0  # weight of the sigmoid distillation
    selection: str = "herding"
    choices = {"classifier": ("nme", "fc")}


@dataclass(frozen=True)
class ICaRLNMEHparams(ICaRLHparams):
    classifier: str = "nme"


@dataclass(frozen=True)
class ICaRLFCHparams(ICaRLHparams):
    classifier: str = "fc"


def exemplar_class_means(tr, kept: torch.Tensor | None) -> torch.Tensor:
    """Unit class means (n_seen, D) of L2-normalised head features with trainer ``tr``'s current model:
    exemplars' where a class has them, else its training samples' (new classes), else the row of
    ``kept`` (old classes without exemplars keep the mean they had)."""
    n_seen = tr.n_seen
    dim = tr.model.head.out_dim
    means = torch.zeros(n_seen, dim, device=tr.device)
    if kept is not None:
        means[: kept.shape[0]] = kept[:n_seen]
    memory = tr.memory.per_class()
    for c in range(n_seen):
        idx = memory.get(c)
        if idx is None or idx.size == 0:
            if c < tr.n_old:
                continue  # keep the mean it had
            idx = tr.train_indices_of_class(c)
        feats = F.normalize(tr.features_of(idx), dim=1)
        means[c] = F.normalize(feats.mean(dim=0), dim=0)
    return means


@register_method("icarl")
class ICaRL(Method):
    Hparams = ICaRLHparams
    family = "icarl"
    replay = "mixed"
    uses_teacher = True

    def __init__(self, hp) -> None:
        super().__init__(hp)
        self.means: torch.Tensor | None = None  # (n_seen, D), unit rows

    def loss(self, batch, out):
        terms = {"ce": F.cross_entropy(out["logits"], batch["y"])}
        old = self.teacher(batch)
        if old is not None:
            terms["kd"] = self.hp.lamb * losses.sigmoid_distillation(out["logits"], old["logits"])
        return terms

    def _class_means(self, kept: torch.Tensor | None) -> torch.Tensor:
        return exemplar_class_means(self.trainer, kept)

    def before_eval(self) -> None:
        # model selection (--select val-seen) scores epochs by the NME prediction itself: the new
        # classes have no exemplars yet, so their means come from their training samples
        if self.hp.classifier == "nme":
            self._kept = self._kept if getattr(self, "_task_of_kept", None) == self.trainer.task else self.means
            self._task_of_kept = self.trainer.task
            self.means = self._class_means(self._kept)

    def after_task(self, task: int) -> None:
        kept = getattr(self, "_kept", None) if getattr(self, "_task_of_kept", None) == task else self.means
        self._kept = self._task_of_kept = None
        self.means = self._class_means(kept)

    def predict(self, batch, out):
        n_seen = out["logits"].shape[1]
        if self.hp.classifier == "fc" or self.means is None or self.means.shape[0] < n_seen:
            return out["logits"]  # no mean yet for the classes being learnt (during training)
        phi = F.normalize(out["feature"], dim=1)
        return -torch.cdist(phi, self.means[:n_seen])

    def state_dict(self) -> dict:
        return {"means": None if self.means is None else self.means.cpu()}

    def load_state_dict(self, state) -> None:
        m = state.get("means")
        self.means = None if m is None else m.to(self.trainer.device if self.trainer else "cpu")


@register_method("icarl-nme")
class ICaRLNME(ICaRL):
    Hparams = ICaRLNMEHparams


@register_method("icarl-fc")
class ICaRLFC(ICaRL):
    Hparams = ICaRLFCHparams
