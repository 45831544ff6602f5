"""``simplecil``: SimpleCIL (Zhou et al., "Revisiting Class-Incremental Learning with Pre-Trained
Models: Generalizability and Adaptivity are All You Need", IJCV 2024): a prototype classifier on a
frozen embedding.

The prototype of class c is the mean embedding of its training samples,
p_c = mean_{i: y_i = c} phi(x_i), computed once when c is learnt and never
changed; the score of class c is the cosine similarity cos(phi(x), p_c).
No exemplars; no SGD after the first task (none at all with ``backbone=raw``).
Because neither phi nor the old prototypes change, the scores of old classes
(and so any prediction among them) are identical after every later task.

Departure: the paper's embedding is a pre-trained ViT, used frozen (SimpleCIL)
or adapted on the first task (APER); here the encoders are cached, so
``backbone=raw`` uses their pooled features and ``backbone=adapt`` (default)
the fusion head trained with CE on the first task (see :mod:`train.methods.prototypes`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from train.methods.base import register_method
from train.methods.prototypes import PrototypeMethod


@register_method("simplecil")
class SimpleCIL(PrototypeMethod):
    def __init__(self, hp) -> None:
        super().__init__(hp)
        self.prototypes: torch.Tensor | None = None  # (n_seen, D) float64

    def _tensors(self) -> dict:
        return {"prototypes": self.prototypes}

    def update(self, task, new):
        rows = torch.stack([new[c].mean(dim=0) for c in sorted(new)])
        self.prototypes = rows if self.prototypes is None else torch.cat([self.prototypes, rows])

    def scores(self, phi):
        return F.normalize(phi, dim=1) @ F.normalize(self.prototypes, dim=1).T
