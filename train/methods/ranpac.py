"""``ranpac``: RanPAC (McDonnell et al., "RanPAC: Random Projections and Pre-trained Models for
Continual Learning", NeurIPS 2023): a frozen random ReLU projection of a frozen embedding, and a
ridge-regression classifier fitted from second-order statistics accumulated over tasks.

With phi(x) the frozen embedding (D), a fixed random matrix W_r (D, M) with
entries N(0, 1) (drawn once from the run's seed) and one-hot targets y:

    h(x) = ReLU(phi(x) W_r)                      (M,)  random projection + nonlinearity
    G    = sum_i h(x_i) h(x_i)^T                  (M, M) Gram matrix, accumulated task by task
    C    = sum_i h(x_i) y_i^T                     (M, n_seen) (column c = sum of h over class c)
    W_o  = (G + lambda I)^-1 C;   score(x) = h(x) W_o

Only G and C are kept (no exemplars). Because sums do not depend on the order
in which samples arrive, the classifier after task t is exactly the ridge
regression fitted on the training data of tasks 0..t at once (the joint
solution), for any task order. lambda: ``ridge`` > 0 fixes it; ``ridge=0``
(default) chooses it at every task from 10^-8 .. 10^8 (the paper's grid) by the
accuracy on a held-out 20 % of the current task's training samples (G, C of the
other 80 % and of the old tasks), then refits with all samples. One
eigendecomposition of G serves the whole grid.

Departures: the paper's phi is a ViT adapted on the first task with a PETL
method (Phase 1); here the encoders are cached, so phi is the fusion head
trained with CE on the first task (``backbone=adapt``, default) or the pooled
cached features (``backbone=raw``). M defaults to the paper's 10000; a smaller
``M`` trades accuracy for time on small data (the synth preset uses 2048).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from train.heads.base import OptionError
from train.methods.base import register_method
from train.methods.prototypes import PrototypeHparams, PrototypeMethod

RIDGE_GRID = tuple(10.0 ** k for k in range(-8, 9))


@dataclass(frozen=True)
class RanPACHparams(PrototypeHparams):
    M: int = 10000  # random projection width
    ridge: float = 0.0  # lambda; 0 = chosen per task on held-out training samples
    holdout: float = 0.2

    def check(self, what: str) -> None:
        super().check(what)
        if self.M < 1 or self.ridge < 0 or not 0 < self.holdout < 1:
            raise OptionError(f"{what}: need M >= 1, ridge >= 0 and 0 < holdout < 1")


def ridge_solve(G: torch.Tensor, C: torch.Tensor, lam: float) -> torch.Tensor:
    """(G + lam I)^-1 C."""
    eye = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    return torch.linalg.solve(G + lam * eye, C)


def ridge_grid_scores(G: torch.Tensor, C: torch.Tensor, h: torch.Tensor, grid) -> list[torch.Tensor]:
    """h (G + lam I)^-1 C for every lam of ``grid``, from one eigendecomposition G = Q diag(e) Q^T:
    (G + lam I)^-1 = Q diag(1 / (e + lam)) Q^T (G is symmetric positive semi-definite)."""
    evals, Q = torch.linalg.eigh(G)
    QC, hQ = Q.T @ C, h @ Q
    return [hQ @ (QC / (evals.clamp(min=0) + lam)[:, None]) for lam in grid]


@register_method("ranpac")
class RanPAC(PrototypeMethod):
    Hparams = RanPACHparams

    def __init__(self, hp) -> None:
        super().__init__(hp)
        self.W_r: torch.Tensor | None = None
        self.G: torch.Tensor | None = None
        self.C: torch.Tensor | None = None
        self.W_o: torch.Tensor | None = None
        self.ridges: list[float] = []

    def _tensors(self) -> dict:
        return {"W_r": self.W_r, "G": self.G, "C": self.C, "W_o": self.W_o}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "ridges": list(self.ridges)}

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        self.ridges = [float(x) for x in state.get("ridges", [])]

    def project(self, phi: torch.Tensor) -> torch.Tensor:
        return torch.relu(phi @ self.W_r)

    def _stats(self, h: torch.Tensor, y: torch.Tensor, n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
        Y = torch.nn.functional.one_hot(y, n_classes).to(h.dtype)
        return h.T @ h, h.T @ Y

    def update(self, task, new):
        tr = self.trainer
        n_seen = tr.n_seen
        if self.W_r is None:
            dim = next(iter(new.values())).shape[1]
            gen = torch.Generator().manual_seed(int(tr.seed))
            self.W_r = torch.randn(dim, self.hp.M, generator=gen, dtype=torch.float64).to(tr.device)
            self.G = torch.zeros(self.hp.M, self.hp.M, dtype=torch.float64, device=tr.device)
            self.C = torch.zeros(self.hp.M, 0, dtype=torch.float64, device=tr.device)
        classes = sorted(new)
        h = self.project(torch.cat([new[c] for c in classes]))
        y = torch.cat([torch.full((new[c].shape[0],), c, dtype=torch.long, device=h.device) for c in classes])
        C_old = torch.cat([self.C, self.C.new_zeros(self.C.shape[0], n_seen - self.C.shape[1])], dim=1)
        lam = self.hp.ridge or self._choose_ridge(h, y, C_old, task)
        G_new, C_new = self._stats(h, y, n_seen)
        self.G, self.C = self.G + G_new, C_old + C_new
        self.W_o = ridge_solve(self.G, self.C, lam)
        self.ridges.append(lam)

    def _choose_ridge(self, h, y, C_old, task) -> float:
        """lambda of :data:`RIDGE_GRID` with the best accuracy on a held-out part of this task's samples."""
        n = h.shape[0]
        gen = np.random.default_rng([int(self.trainer.seed), int(task), 7])
        perm = torch.as_tensor(gen.permutation(n), device=h.device)
        n_val = max(1, int(round(self.hp.holdout * n)))
        val, fit = perm[:n_val], perm[n_val:]
        G_f, C_f = self._stats(h[fit], y[fit], C_old.shape[1])
        best, best_acc = RIDGE_GRID[0], -1.0
        for lam, scores in zip(RIDGE_GRID, ridge_grid_scores(self.G + G_f, C_old + C_f, h[val], RIDGE_GRID)):
            acc = float((scores.argmax(dim=1) == y[val]).double().mean())
            if acc > best_acc:  # ties keep the smaller lambda
                best, best_acc = lam, acc
        return best

    def scores(self, phi):
        return self.project(phi) @ self.W_o
