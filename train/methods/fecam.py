"""``fecam``: FeCAM (Goswami et al., "FeCAM: Exploiting the Heterogeneity of Class Distributions in
Exemplar-Free Continual Learning", NeurIPS 2023): a Bayes-style classifier with one mean and one
covariance per class on a frozen embedding.

For each class c, learnt once and then kept unchanged (no exemplars):

    x~      = sign(phi) * |phi|^beta                 Tukey's ladder of powers (beta = ``tukey``; 1 = off)
    mu_c    = mean of x~ over c's training samples
    S_c     = covariance of x~ over c's samples (1/(n-1))
    S_c'    = S_c + a1 * V1 * I + a2 * V2 * (1 - I)  covariance shrinkage, V1 / V2 = mean diagonal /
                                                     off-diagonal entry of S_c (a1 = ``shrink1``, a2 = ``shrink2``)
    R_c     = D^-1/2 S_c' D^-1/2, D = diag(S_c')     normalised to a correlation matrix
    score_c = -(u - m_c)^T R_c^-1 (u - m_c),  u = x~/||x~||, m_c = mu_c/||mu_c||   (negative squared Mahalanobis)

Prediction = argmax_c score_c. Since phi is frozen after the first task and an
old class's (mu_c, R_c) never change, the old classes' scores of every sample are
identical after each later task.

Choices where the paper is open or departs here: the Tukey power is applied as
sign(x)|x|^beta because head features can be negative (the paper's ReLU features
are not); features and means are L2-normalised before the distance; the
correlation normalisation of the shrunk covariance puts classes on one scale.
As in :mod:`train.methods.simplecil`, the embedding is the cached encoders'
(``backbone=raw``) or the head adapted on the first task (``adapt``) instead of a
ViT (first-session adaptation of the paper's ViT).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from train.heads.base import OptionError
from train.methods.base import register_method
from train.methods.prototypes import PrototypeHparams, PrototypeMethod


@dataclass(frozen=True)
class FeCAMHparams(PrototypeHparams):
    tukey: float = 0.5
    shrink1: float = 1.0
    shrink2: float = 1.0

    def check(self, what: str) -> None:
        super().check(what)
        if self.tukey <= 0:
            raise OptionError(f"{what}: tukey must be > 0 (1 = no transform), got {self.tukey}")


def shrink_covariance(S: torch.Tensor, a1: float, a2: float) -> torch.Tensor:
    """S + a1 * V1 * I + a2 * V2 * (1 - I), V1 = mean of diag(S), V2 = mean of the off-diagonal entries."""
    d = S.shape[0]
    eye = torch.eye(d, dtype=S.dtype, device=S.device)
    v1 = torch.diagonal(S).mean()
    v2 = (S.sum() - torch.diagonal(S).sum()) / max(d * d - d, 1)
    return S + a1 * v1 * eye + a2 * v2 * (1 - eye)


def correlation(S: torch.Tensor) -> torch.Tensor:
    sd = torch.sqrt(torch.clamp(torch.diagonal(S), min=1e-12))
    return S / (sd[:, None] * sd[None, :])


@register_method("fecam")
class FeCAM(PrototypeMethod):
    Hparams = FeCAMHparams

    def __init__(self, hp) -> None:
        super().__init__(hp)
        self.means: torch.Tensor | None = None  # (n_seen, D) unit rows
        self.precisions: torch.Tensor | None = None  # (n_seen, D, D) R_c^-1

    def _tensors(self) -> dict:
        return {"means": self.means, "precisions": self.precisions}

    def transform(self, phi: torch.Tensor) -> torch.Tensor:
        b = self.hp.tukey
        return phi if b == 1 else torch.sign(phi) * phi.abs().pow(b)

    def update(self, task, new):
        means, precs = [], []
        for c in sorted(new):
            x = self.transform(new[c])
            mu = x.mean(dim=0)
            S = (x - mu).T @ (x - mu) / max(x.shape[0] - 1, 1)
            R = correlation(shrink_covariance(S, self.hp.shrink1, self.hp.shrink2))
            means.append(F.normalize(mu, dim=0))
            precs.append(torch.linalg.inv(R))  # positive definite after the shrinkage
        m, p = torch.stack(means), torch.stack(precs)
        self.means = m if self.means is None else torch.cat([self.means, m])
        self.precisions = p if self.precisions is None else torch.cat([self.precisions, p])

    def scores(self, phi):
        u = F.normalize(self.transform(phi), dim=1)
        diff = u[:, None, :] - self.means[None]  # (B, C, D)
        return -torch.einsum("bcd,cde,bce->bc", diff, self.precisions, diff)
