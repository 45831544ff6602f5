"""``plop``: PLOP (Douillard et al., CVPR 2021) for continual semantic segmentation, on cached features.

From the second task on, with the previous model frozen:

* **Pseudo-labels**: a pixel labelled background in the current labels takes the
  old model's argmax class when its normalised entropy ``H / log(C_old)`` is below
  that class's threshold, and is ignored otherwise. The threshold of class ``c``
  is the median entropy of the current task's training pixels the old model
  assigns to ``c`` (before the task, over the frames with ground truth; a
  1000-bin histogram of [0, 1], the median bin's upper edge), floored at
  ``entropy_floor`` = 0.001 (PLOP's defaults).
* **Cross-entropy** on those labels, each frame's pixel losses scaled by the fraction of
  its background pixels that were confident (``classif_adaptive``), averaged over all
  its pixels (ignored ones count 0), as PLOP does.
* **Local POD** (``pod_factor`` 0.01) between the new and old model's features, and on
  the logits (``pod_logits_factor`` 0.0005; the new classes' logits summed into
  the background's), all times ``sqrt(n_seen / n_new)``. The encoders are frozen
  and cached here, so POD on backbone features would be identically zero; it is
  applied to the trainable features instead: the fused audio-visual tokens on
  their grid (the mask decoder's input) and the decoder's pixel embedding, the
  two summed (OPEN which layers: PLOP distils every ResNet stage and the ASPP output).
* New classifier rows start balanced (MiB / PLOP ``init_balanced``).

Task 0: the plain pixel cross-entropy. Semantic protocols only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from train.methods import semantic_losses as L
from train.methods.base import Hparams, Method, register_method
from train.methods.mib import require_semantic

ENTROPY_BINS = 1000


@dataclass(frozen=True)
class PLOPHparams(Hparams):
    pod_factor: float = 0.01  # Local POD on the fused tokens and pixel embedding
    pod_logits_factor: float = 0.0005  # Local POD on the logits
    pod_scales: tuple[int, ...] = (1, 2, 4)
    pseudo_labels: bool = True
    entropy_floor: float = 0.001
    classif_adaptive: bool = True
    init_balanced: bool = True


class PLOPLosses(Method):
    """PLOP's losses, shared by ``plop`` and ``cmr``."""

    Hparams = PLOPHparams
    uses_teacher = True
    segmentation_only = True

    def __init__(self, hp) -> None:
        super().__init__(hp)
        self.thresholds: torch.Tensor | None = None

    def attach(self, trainer) -> None:
        super().attach(trainer)
        require_semantic(self)

    def before_task(self, task: int) -> None:
        tr = self.trainer
        self.thresholds = None
        if task == 0 or tr.old_model is None:
            return
        if self.hp.init_balanced:
            L.balanced_init(tr.model.classifier, self.n_old, tr.n_seen)
        if self.hp.pseudo_labels:
            self.thresholds = self.entropy_thresholds(tr.split_idx["train"][task])

    @torch.no_grad()
    def entropy_thresholds(self, idx: np.ndarray, batch_size: int = 8) -> torch.Tensor:
        """(C_old,) per-class median normalised entropy of the old model's pixels (see the module docstring)."""
        tr = self.trainer
        n_old = self.n_old
        hist = torch.zeros(n_old, ENTROPY_BINS, dtype=torch.float64, device=tr.device)
        idx_t = torch.as_tensor(idx, dtype=torch.long, device=tr.device)
        for s in range(0, idx_t.numel(), batch_size):
            i = idx_t[s: s + batch_size]
            z = tr.old_model(tr.fs.batch(i, tr._head_streams))["mask_logits"]
            v = tr.problem.valid.index_select(0, i)
            prob = torch.softmax(z[v].float(), dim=1)
            ent = L.normalized_entropy(prob).flatten()
            cls = prob.argmax(dim=1).flatten()
            b = (ent * ENTROPY_BINS).long().clamp(0, ENTROPY_BINS - 1)
            hist.view(-1).index_add_(0, cls * ENTROPY_BINS + b, torch.ones_like(ent, dtype=torch.float64))
        cum = hist.cumsum(dim=1)
        half = cum[:, -1:] / 2
        med_bin = (cum < half).sum(dim=1)
        thr = (med_bin + 1).double() / ENTROPY_BINS
        thr = torch.where(cum[:, -1] > 0, thr, torch.ones_like(thr))
        return thr.clamp(min=self.hp.entropy_floor).float()

    def plop_loss(self, batch: dict, out: dict) -> dict[str, torch.Tensor]:
        tr = self.trainer
        v = batch["valid"]
        z, y = out["mask_logits"][v], batch["masks"][v]
        old = self.teacher(batch)
        if old is None:
            return tr.problem.loss(batch, out)
        n_old, n_seen = self.n_old, tr.n_seen
        terms = {}
        if z.shape[0]:
            zo = old["mask_logits"][v]
            weight = torch.ones(z.shape[0], device=z.device)
            if self.thresholds is not None:
                prob = torch.softmax(zo, dim=1)
                pseudo = prob.argmax(dim=1)
                ent = L.normalized_entropy(prob)
                bg = y == 0
                conf = ent < self.thresholds[pseudo]
                y = torch.where(bg & conf, pseudo, torch.where(bg, torch.full_like(y, L.IGNORE), y))
                if self.hp.classif_adaptive:
                    num = (bg & conf).flatten(1).sum(1).float()
                    den = bg.flatten(1).sum(1).float()
                    weight = torch.where(den > 0, num / den.clamp_min(1), torch.ones_like(den))
            ce = F.cross_entropy(z, y, ignore_index=L.IGNORE, reduction="none")
            terms["ce"] = (ce * weight.view(-1, 1, 1)).mean()
        else:
            terms["ce"] = out["mask_logits"].sum() * 0.0
        factor = math.sqrt(n_seen / max(1, n_seen - n_old))
        if self.hp.pod_factor:
            pod = L.local_pod(out["pixel_embedding"].flatten(0, 1), old["pixel_embedding"].flatten(0, 1),
                              self.hp.pod_scales)
            if "fused" in out and "fused" in old:
                pod = pod + L.local_pod(out["fused"], old["fused"], self.hp.pod_scales)
            terms["pod"] = self.hp.pod_factor * factor * pod
        if self.hp.pod_logits_factor:
            zn = L.sum_new_into_background(out["mask_logits"].flatten(0, 1), n_old)
            terms["pod_logits"] = self.hp.pod_logits_factor * factor * L.local_pod(
                zn, old["mask_logits"].flatten(0, 1), self.hp.pod_scales)
        return terms

    def loss(self, batch, out):
        return self.plop_loss(batch, out)


@register_method("plop")
class PLOP(PLOPLosses):
    replay = "none"
