"""Quadratic parameter regularisers, written once for classification and segmentation.

After each task the method keeps an *anchor* ``theta*`` (the task's final
parameters) and an *importance* ``Omega`` per parameter; while the next tasks
train, the loss gets

    L_reg = (strength / 2) * sum_i Omega_i (theta_i - theta*_i)^2

summed over the anchored parameters (:meth:`ParamRegularizer.anchored`). The
task loss is the problem's own (cross-entropy for classification; BCE + Dice
for segmentation, :mod:`train.problems`), so the same class serves both.
Parameters that grew since the anchor (the classifier's rows of new classes)
are compared on their old part only. Importances accumulate over tasks
(``Omega <- Omega + Omega_task``).

Importance estimators:

* :func:`fisher_diagonal` (EWC, Kirkpatrick et al. 2017): the empirical Fisher,
  ``E[(dL/dtheta)^2]`` over the task's training batches (squared gradients of the
  batch-mean task loss, weighted by batch size, as FACIL does);
* :func:`output_sensitivity` (MAS, Aljundi et al. 2018): ``E[|d ||f(x)||_2 / dtheta|]``
  with ``f`` the model's outputs (class logits; for segmentation the mask logits),
  per batch (FACIL's batch-level variant of the per-sample original);
* :class:`PathIntegral` (SI, Zenke et al. 2017): ``omega_i = sum_steps -g_i * Delta theta_i``
  along training, with ``g`` the gradient of the task loss (the penalty's own
  gradient ``strength * Omega (theta - theta*)`` is subtracted from the
  parameter's gradient, which is exact), then
  ``Omega_task = max(0, omega / ((theta_end - theta_start)^2 + xi))``.
  OPEN in SI and in CL-AVS's LRA, chosen here: ``omega`` restarts every task,
  ``Omega`` accumulates; the clamp at 0 keeps the penalty a bowl (a negative
  path integral would reward drift); no gradient clipping.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from train.methods.base import Hparams, Method


def _old_part(p: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``p`` cut to ``ref``'s shape along every axis (a parameter that grew keeps its old part first)."""
    if p.shape == ref.shape:
        return p
    return p[tuple(slice(0, s) for s in ref.shape)]


def quadratic_penalty(params: Mapping[str, torch.Tensor], anchor: Mapping[str, torch.Tensor],
                      importance: Mapping[str, torch.Tensor], strength: float) -> torch.Tensor:
    """``(strength / 2) * sum_i Omega_i (theta_i - theta*_i)^2`` over the names in ``anchor``."""
    total = None
    for name, ref in anchor.items():
        p = params.get(name)
        if p is None:
            continue
        term = (importance[name] * (_old_part(p, ref) - ref) ** 2).sum()
        total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return 0.5 * strength * total


def _batches(trainer, idx: np.ndarray, batch_size: int) -> Iterable[dict]:
    idx_t = torch.as_tensor(idx, dtype=torch.long, device=trainer.device)
    for s in range(0, idx_t.numel(), batch_size):
        i = idx_t[s: s + batch_size]
        batch = {"idx": i, "x": trainer.fs.batch(i, trainer._head_streams), "y": trainer.y[i]}
        batch.update(trainer.problem.targets(i))
        yield batch


def _gradient_importance(trainer, params: Mapping[str, nn.Parameter], idx: np.ndarray, batch_size: int,
                         objective, magnitude) -> dict:
    """Batch-size-weighted mean over batches of ``magnitude(d objective(batch, outputs) / dtheta)``
    (model in eval mode; its training mode and gradients are restored after)."""
    model = trainer.model
    was = model.training
    model.eval()
    out = {n: torch.zeros_like(p) for n, p in params.items()}
    total = 0
    for batch in _batches(trainer, idx, batch_size):
        model.zero_grad(set_to_none=True)
        objective(batch, model(batch["x"])).backward()
        b = batch["idx"].numel()
        for n, p in params.items():
            if p.grad is not None:
                out[n] += magnitude(p.grad.detach()) * b
        total += b
    model.zero_grad(set_to_none=True)
    model.train(was)
    return {n: v / max(total, 1) for n, v in out.items()}


def fisher_diagonal(trainer, params: Mapping[str, nn.Parameter], idx: np.ndarray, batch_size: int) -> dict:
    """Empirical Fisher diagonal of the problem's task loss over samples ``idx`` (model in eval mode)."""
    return _gradient_importance(trainer, params, idx, batch_size,
                                lambda batch, res: sum(Method.loss(trainer.method, batch, res).values()),
                                lambda g: g ** 2)


def output_sensitivity(trainer, params: Mapping[str, nn.Parameter], idx: np.ndarray, batch_size: int) -> dict:
    """MAS importance: mean over batches of ``|d mean_b ||f(x_b)||_2 / dtheta|`` (weighted by batch size)."""

    def output_norm(batch, res):
        f = res["mask_logits"] if "mask_logits" in res else res["logits"]
        return torch.linalg.vector_norm(f.flatten(1), dim=1).mean()

    return _gradient_importance(trainer, params, idx, batch_size, output_norm, torch.abs)


class PathIntegral:
    """SI's online path integral (see the module docstring); one per task."""

    def __init__(self, params: Mapping[str, nn.Parameter]) -> None:
        self.params = dict(params)
        self.start = {n: p.detach().clone() for n, p in self.params.items()}
        self.omega = {n: torch.zeros_like(p) for n, p in self.params.items()}
        self._prev: dict[str, torch.Tensor] | None = None
        self._grad: dict[str, torch.Tensor] | None = None

    def _close_step(self) -> None:
        if self._prev is None:
            return
        for n, p in self.params.items():
            self.omega[n] -= self._grad[n] * (p.detach() - self._prev[n])
        self._prev = self._grad = None

    def step(self, grads: Mapping[str, torch.Tensor]) -> None:
        """Record the task-loss gradient of the step about to be taken (called before the update)."""
        self._close_step()
        self._prev = {n: p.detach().clone() for n, p in self.params.items()}
        self._grad = {n: g.detach().clone() for n, g in grads.items()}

    def importance(self, xi: float) -> dict[str, torch.Tensor]:
        """``max(0, omega / ((theta_end - theta_start)^2 + xi))`` after the task's last step."""
        self._close_step()
        return {n: torch.clamp(self.omega[n] / ((p.detach() - self.start[n]) ** 2 + xi), min=0.0)
                for n, p in self.params.items()}


@dataclass(frozen=True)
class RegHparams(Hparams):
    strength: float = 1.0  # lambda (EWC, MAS) or c (SI) of the penalty
    importance_batch_size: int = 64  # batch size of the post-task importance passes (EWC, MAS)


class ParamRegularizer(Method):
    """Base of EWC, SI, MAS and ATLAS's anchoring: the penalty, the anchor and the importance bookkeeping.

    Subclasses set :attr:`estimate` (or implement :meth:`task_importance`, e.g. to
    accumulate online) and may narrow :meth:`anchored` (default: every trainable parameter).
    """

    Hparams = RegHparams
    replay = "none"
    #: ``estimate(trainer, params, idx, batch_size)``: importance of ``params`` over the training
    #: samples ``idx`` (:func:`fisher_diagonal`, :func:`output_sensitivity`), as a staticmethod
    estimate: ClassVar[Callable[..., dict[str, torch.Tensor]] | None] = None

    def __init__(self, hp) -> None:
        super().__init__(hp)
        self.anchor: dict[str, torch.Tensor] = {}
        self.importance: dict[str, torch.Tensor] = {}

    # -- what is anchored --------------------------------------------------------------
    def anchored(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.trainer.model.named_parameters() if p.requires_grad}

    def penalty(self) -> torch.Tensor:
        params = dict(self.trainer.model.named_parameters())
        return quadratic_penalty(params, self.anchor, self.importance, self.hp.strength)

    # -- hooks -------------------------------------------------------------------------
    def loss(self, batch, out):
        terms = super().loss(batch, out)
        if self.anchor and self.hp.strength:
            terms["reg"] = self.penalty().to(next(iter(terms.values())).device)
        return terms

    def task_importance(self, task: int) -> dict[str, torch.Tensor]:
        """Importance of the anchored parameters for task ``task`` (:attr:`estimate` over its training samples)."""
        if self.estimate is None:
            raise NotImplementedError(f"{type(self).__name__}: set estimate or implement task_importance")
        return self.estimate(self.trainer, self.anchored(), self.train_indices(task), self.hp.importance_batch_size)

    def after_task(self, task: int) -> None:
        new = self.task_importance(task)
        for n, v in new.items():
            old = self.importance.get(n)
            if old is not None and old.shape != v.shape:
                v = v.clone()
                v[tuple(slice(0, s) for s in old.shape)] += old
                self.importance[n] = v
            else:
                self.importance[n] = v if old is None else old + v
        self.anchor = {n: p.detach().clone() for n, p in self.anchored().items() if n in self.importance}

    def train_indices(self, task: int) -> np.ndarray:
        return self.trainer.split_idx["train"][task]

    # -- checkpoints -------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"anchor": {n: v.cpu() for n, v in self.anchor.items()},
                "importance": {n: v.cpu() for n, v in self.importance.items()}}

    def load_state_dict(self, state) -> None:
        dev = self.trainer.device if self.trainer is not None else "cpu"
        self.anchor = {n: v.to(dev) for n, v in (state.get("anchor") or {}).items()}
        self.importance = {n: v.to(dev) for n, v in (state.get("importance") or {}).items()}


class OnlinePathIntegral(ParamRegularizer):
    """SI-style regulariser: importance from the path integral of the task's own training."""

    def before_task(self, task: int) -> None:
        self._path = PathIntegral(self.anchored())

    def after_backward(self) -> None:
        path = getattr(self, "_path", None)
        if path is None:
            return
        grads = {}
        strength = self.hp.strength
        for n, p in path.params.items():
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            if n in self.anchor and strength:
                # the task loss's gradient: remove the penalty's (strength * Omega * (theta - theta*))
                ref = self.anchor[n]
                pen = torch.zeros_like(p)
                pen[tuple(slice(0, s) for s in ref.shape)] = strength * self.importance[n] * (_old_part(p, ref).detach() - ref)
                g = g - pen
            grads[n] = g
        path.step(grads)

    def task_importance(self, task: int) -> dict[str, torch.Tensor]:
        imp = self._path.importance(self.hp.xi)
        self._path = None
        return imp
