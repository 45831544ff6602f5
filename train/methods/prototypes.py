"""Shared part of the exemplar-free prototype / analytic methods (``simplecil``, ``ranpac``, ``fecam``).

These methods fit a classifier in closed form on a *frozen* embedding; they
train by SGD at most on the first task and keep no exemplars. The embedding
``phi(x)`` is chosen by ``backbone``:

* ``adapt`` (default): the head is trained with cross-entropy on the first task
  (the methods' "first-session adaptation", which RanPAC and APER/SimpleCIL's
  adapted variant apply to a pre-trained backbone), then frozen; phi(x) is the
  head's feature (B, out_dim).
* ``raw``: no training at all; phi(x) = [a/||a||; v/||v||] with a, v the token
  means of the cached audio and visual streams (the frozen encoders' outputs),
  as SimpleCIL does with a pre-trained backbone.

The encoders of the papers are ImageNet/ViT backbones adapted with PETL; here the
encoders are frozen and cached, so the trainable part that can be "adapted" is
the fusion head (a departure the method docstrings repeat).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from train.heads.base import OptionError
from train.methods.base import Hparams, Method

BACKBONES = ("adapt", "raw")


@dataclass(frozen=True)
class PrototypeHparams(Hparams):
    backbone: str = "adapt"  # adapt | raw (see the module docstring)

    def check(self, what: str) -> None:
        super().check(what)
        if self.backbone not in BACKBONES:
            raise OptionError(f"{what}: backbone must be one of {', '.join(BACKBONES)}, got {self.backbone!r}")


class PrototypeMethod(Method):
    """Base of the closed-form methods: SGD only on task 0 (``adapt``), a fitted scorer after every task.

    Subclasses implement :meth:`update` (add the new classes' embeddings to the
    method's statistics) and :meth:`scores` (B, n_seen) from embeddings.
    """

    Hparams = PrototypeHparams
    replay = "none"

    def __init__(self, hp) -> None:
        super().__init__(hp)
        self.n_fitted = 0  # classes the closed-form scorer covers

    def fit_task(self, task: int) -> bool:
        return self.hp.backbone == "raw" or task > 0

    @torch.no_grad()
    def embed(self, idx) -> torch.Tensor:
        """phi of FeatureSet indices ``idx`` (n, D), float64 (see the module docstring)."""
        tr = self.trainer
        if self.hp.backbone == "adapt":
            return tr.features_of(idx).double()
        idx = torch.as_tensor(np.asarray(idx), dtype=torch.long, device=tr.device)
        streams = sorted(tr.fs.streams)
        x = tr.fs.batch(idx, streams)
        return torch.cat([F.normalize(x[k].double().mean(dim=1), dim=1) for k in streams], dim=1)

    def after_task(self, task: int) -> None:
        tr = self.trainer
        new = {c: self.embed(tr.train_indices_of_class(c)) for c in range(tr.n_old, tr.n_seen)}
        self.update(task, new)
        self.n_fitted = tr.n_seen

    def update(self, task: int, new: dict[int, torch.Tensor]) -> None:
        raise NotImplementedError

    def scores(self, phi: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def predict(self, batch, out):
        n_seen = out["logits"].shape[1]
        if self.n_fitted < n_seen:  # the first task while its head is adapted (model selection)
            return out["logits"]
        return self.scores(self.embed(batch["idx"])).float()[:, :n_seen]

    def _tensors(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {"n_fitted": self.n_fitted,
                **{k: (None if v is None else v.cpu()) for k, v in self._tensors().items()}}

    def load_state_dict(self, state) -> None:
        self.n_fitted = int(state.get("n_fitted", 0))
        dev = self.trainer.device if self.trainer else "cpu"
        for k in self._tensors():
            v = state.get(k)
            setattr(self, k, None if v is None else v.to(dev))
