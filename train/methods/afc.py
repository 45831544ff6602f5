"""``afc`` / ``afc-nme`` / ``afc-lsc``: AFC (Kang et al., "Class-Incremental Learning by Knowledge
Distillation with Adaptive Feature Consolidation", CVPR 2022).

Classifier (LSC, :class:`CosineProxyClassifier`): K proxies per class; with unit
feature f^ and unit proxies w^_{c,k}, s_{c,k} = -||f^ - w^_{c,k}||^2 and the class
similarity s_c = sum_k softmax_k(s_{c,k}) s_{c,k}. Old classes' proxies are frozen
once their task is over (the official ``old_weights`` lr 0); a learnt scale
eta (init 1) multiplies the similarities in the loss.

Classification loss NCA (as in both codebases):
    z = eta (s - margin);  z <- z - max_j z_j;  L = -mean_i [ z_{i,y} - log(1 + sum_{j != y} exp z_{i,j}) ]
(the margin is subtracted from every class, so it cancels: a no-op kept for fidelity).

Importance-weighted feature distillation, from task 1 on, with feature groups g
(the ``avcil`` head: pooled visual v_bar, a', v'; any other head: its feature)
L2-normalised (x^) and those of the previous task's model (x^_old):

* ``importance='task'`` (official AFC): after each task, I_{g,c} = sum over the task's
  training batches (new data + exemplars) of mean_n (dNCA/dx_{n,g,c})^2, computed with the
  final model and normalised to mean 1 over c; at the next task
  L_disc = mean_g mean_n sum_c I_{g,c} (x^_{n,g,c} - x^old_{n,g,c})^2.
* ``importance='port'`` (AV-CIL's port): every batch, I_{n,g} = ||dNCA_old/dx_{n,g}|| of the
  previous model *with the new, randomly initialised proxies*, normalised to sum 1 over g;
  L_disc = sum_g mean_n I_{n,g} ||x^_{n,g} - x^old_{n,g}||.

Loss = NCA + lambda_disc * sqrt(n_seen / n_new) * L_disc (for equal tasks sqrt(n_seen/n_new)
= sqrt(t+1), the port's factor).

New-class imprinting (``imprint``): before a task's training, each new class's K
proxies are the k-means centres of its L2-normalised training features, times the
mean norm of the old proxies. Class-balanced finetuning (``cbf``, official AFC,
not in the port): after every task from 1 on, only the classifier (all proxies and
eta) is trained on the exemplar memory (equal per class), SGD momentum 0.9,
``cbf_lr``, ``cbf_epochs``. Exemplars: herding on normalised features; replay
mixes them with the current data.

Prediction (``classifier``): ``lsc`` = argmax of the class similarities; ``nme`` =
nearest mean of L2-normalised exemplar features (as ``icarl-nme``).

Departures and choices: the official AFC distils POD-collapsed spatial maps of 4
ResNet stages; here the distilled features are vectors (one value per channel), so
the per-channel distance is the squared difference of the unit vectors' entries.
The official main phase trains a ResNet with SGD lr 0.1 (cosine, wd 5e-4, batch
128, gradients clamped to +-5) and lambda 4 (CIFAR-100) / 10 (ImageNet); here the
shared optimiser defaults (AV-CIL's Adam, lr 1e-3) and lambda_disc 4 are used, and no
gradient clamping. ``--preset av-cil`` reproduces AV-CIL's port instead
(importance='port', no CBF, lambda_disc 0.5, its epochs per dataset); its other
differences from official AFC: importance recomputed every batch, from the old
model with random new proxies, per sample instead of per channel.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from train.heads.base import OptionError
from train.methods.base import Hparams, Method, register_method
from train.methods.icarl import exemplar_class_means

FEATURE_GROUPS = ("pooled", "audio", "visual")  # of the avcil head, as AV-CIL's port distils them


class CosineProxyClassifier(nn.Module):
    """LSC: ``K`` proxies per class, class similarity = softmax-weighted proxy similarity (module docstring).

    ``frozen`` (buffer) holds the proxies of classes of earlier tasks, ``weight`` those of the
    current task; :meth:`grow` freezes the current ones and appends ``n_new`` x K new proxies.
    """

    def __init__(self, in_dim: int, n_classes: int, K: int) -> None:
        super().__init__()
        self.in_dim, self.K = in_dim, K
        self.register_buffer("frozen", torch.zeros(0, in_dim))
        self.weight = nn.Parameter(torch.zeros(0, in_dim))
        self.factor = nn.Parameter(torch.tensor(1.0))
        if n_classes:
            self.grow(n_classes)

    @property
    def n_classes(self) -> int:
        return (self.frozen.shape[0] + self.weight.shape[0]) // self.K

    def proxies(self) -> torch.Tensor:
        return torch.cat([self.frozen, self.weight])

    def grow(self, n_new: int) -> None:
        w = torch.empty(n_new * self.K, self.in_dim, device=self.weight.device)
        nn.init.kaiming_normal_(w, nonlinearity="linear")
        self.frozen = torch.cat([self.frozen, self.weight.detach()])
        self.weight = nn.Parameter(w)

    def proxy_similarities(self, f: torch.Tensor) -> torch.Tensor:
        """-||f^ - w^||^2 (B, n_classes * K)."""
        fn, wn = F.normalize(f, dim=-1), F.normalize(self.proxies(), dim=-1)
        return -(2 - 2 * fn @ wn.T).clamp_min(0)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        s = self.proxy_similarities(f).view(f.shape[0], -1, self.K)
        return (torch.softmax(s, dim=-1) * s).sum(dim=-1)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a checkpoint splits the proxies into frozen / current rows as they were when saved
        fz, w = state_dict.get(prefix + "frozen"), state_dict.get(prefix + "weight")
        if fz is not None and w is not None:
            dev = self.weight.device
            self.frozen = torch.zeros(fz.shape, device=dev)
            self.weight = nn.Parameter(torch.zeros(w.shape, device=dev))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def nca_loss(sim: torch.Tensor, y: torch.Tensor, scale: torch.Tensor | float = 1.0, margin: float = 0.6) -> torch.Tensor:
    """NCA of the AFC codebases (module docstring): the positive slot stays in the denominator as exp(0) = 1."""
    z = scale * (sim - margin)
    z = z - z.max(dim=1, keepdim=True).values
    rows = torch.arange(z.shape[0], device=z.device)
    pos = z[rows, y]
    others = z.clone()
    others[rows, y] = 0.0
    return -(pos - torch.log(torch.exp(others).sum(dim=1))).mean()


def kmeans(x: torch.Tensor, k: int, gen: torch.Generator, iters: int = 30) -> torch.Tensor:
    """Lloyd's k-means of rows ``x`` (n, D) from ``k`` distinct random rows; (k, D) centres.
    With n <= k the rows themselves, repeated cyclically, are the centres."""
    n = x.shape[0]
    if n <= k:
        return x[torch.arange(k) % n].clone()
    c = x[torch.randperm(n, generator=gen)[:k].to(x.device)].clone()
    for _ in range(iters):
        assign = torch.cdist(x, c).argmin(dim=1)
        for j in range(k):
            m = assign == j
            if m.any():
                c[j] = x[m].mean(dim=0)
    return c


@dataclass(frozen=True)
class AFCHparams(Hparams):
    classifier: str = "lsc"  # lsc | nme
    K: int = 10
    margin: float = 0.6
    lambda_disc: float = 4.0
    importance: str = "task"  # task (official) | port (AV-CIL's)
    imprint: bool = True
    cbf: bool = True
    cbf_epochs: int = 20
    cbf_lr: float = 0.05
    selection: str = "herding"
    choices = {"classifier": ("lsc", "nme"), "importance": ("task", "port")}

    def check(self, what: str) -> None:
        super().check(what)
        if self.K < 1 or self.cbf_epochs < 0 or self.cbf_lr <= 0:
            raise OptionError(f"{what}: need K >= 1, cbf_epochs >= 0, cbf_lr > 0")


@dataclass(frozen=True)
class AFCNMEHparams(AFCHparams):
    classifier: str = "nme"


@dataclass(frozen=True)
class AFCLSCHparams(AFCHparams):
    classifier: str = "lsc"


@register_method("afc")
class AFC(Method):
    Hparams = AFCHparams
    family = "afc"
    replay = "mixed"

    def __init__(self, hp) -> None:
        super().__init__(hp)
        self.importance: dict[str, torch.Tensor] | None = None  # official: per group (D_g,), mean 1
        self.means: torch.Tensor | None = None
        self._kept = None
        self._port_old: nn.Module | None = None

    def make_classifier(self, head, n_classes: int) -> nn.Module:
        return CosineProxyClassifier(head.out_dim, n_classes, self.hp.K)

    # -- features -----------------------------------------------------------------------
    @staticmethod
    def groups(model, out_feature: torch.Tensor) -> dict[str, torch.Tensor]:
        last = getattr(model.head, "last", None) or {}
        if all(g in last for g in FEATURE_GROUPS):
            return {g: last[g] for g in FEATURE_GROUPS}
        return {"feature": out_feature}

    def _gen(self, task: int) -> torch.Generator:
        return torch.Generator().manual_seed(int(np.random.SeedSequence([self.trainer.seed, task, 11]).generate_state(1)[0]))

    # -- hooks --------------------------------------------------------------------------------
    def before_task(self, task: int) -> None:
        tr = self.trainer
        self._kept = self.means
        if task == 0:
            return
        clf = tr.model.classifier
        if self.hp.importance == "port":
            # the port's old model is copied after the new (random) proxies were added, before imprinting
            self._port_old = copy.deepcopy(tr.model).eval()
        if self.hp.imprint:
            gen = self._gen(task)
            norm = clf.frozen.norm(dim=1).mean()
            rows = []
            for c in range(tr.n_old, tr.n_seen):
                f = F.normalize(tr.features_of(tr.train_indices_of_class(c)), dim=1)
                rows.append(kmeans(f, self.hp.K, gen) * norm)
            with torch.no_grad():
                clf.weight.copy_(torch.cat(rows))

    def loss(self, batch, out):
        tr, hp, y = self.trainer, self.hp, batch["y"]
        clf = tr.model.classifier
        terms = {"nca": nca_loss(out["logits"], y, clf.factor, hp.margin)}
        if tr.old_model is None:
            return terms
        feats = self.groups(tr.model, out["feature"])
        factor = hp.lambda_disc * math.sqrt(tr.n_seen / (tr.n_seen - tr.n_old))
        if hp.importance == "port":
            old = self._port_old
            with torch.enable_grad():
                o = old(batch["x"])
                old_feats = self.groups(old, o["feature"])
                names = list(old_feats)
                grads = torch.autograd.grad(nca_loss(o["logits"], y, old.classifier.factor, hp.margin),
                                            [old_feats[g] for g in names], allow_unused=True)
            norms = torch.stack([g.norm(dim=1) if g is not None else torch.zeros_like(y, dtype=torch.float)
                                 for g in grads], dim=1)
            w = norms / norms.sum(dim=1, keepdim=True).clamp_min(1e-12)
            disc = sum((w[:, j] * (F.normalize(feats[g], dim=1) - F.normalize(old_feats[g].detach(), dim=1))
                        .norm(dim=1)).mean() for j, g in enumerate(names))
        else:
            with torch.no_grad():
                o = tr.old_model(batch["x"])
                old_feats = {g: v.detach() for g, v in self.groups(tr.old_model, o["feature"]).items()}
            parts = []
            for g, x in feats.items():
                imp = self.importance[g] if self.importance and g in self.importance else torch.ones(x.shape[1], device=x.device)
                d2 = (F.normalize(x, dim=1) - F.normalize(old_feats[g], dim=1)) ** 2
                parts.append((d2 * imp).sum(dim=1).mean())
            disc = sum(parts) / len(parts)
        terms["disc"] = factor * disc
        return terms

    def before_eval(self) -> None:
        if self.hp.classifier == "nme":
            self.means = exemplar_class_means(self.trainer, self._kept)

    def after_task(self, task: int) -> None:
        self._port_old = None
        if task > 0 and self.hp.cbf and len(self.trainer.memory):
            self._class_balanced_finetuning(task)
        if self.hp.importance == "task":
            self.importance = self._task_importance(task)
        if self.hp.classifier == "nme":
            self.means = exemplar_class_means(self.trainer, self._kept)

    def predict(self, batch, out):
        n_seen = out["logits"].shape[1]
        if self.hp.classifier == "lsc" or self.means is None or self.means.shape[0] < n_seen:
            return out["logits"]
        return -torch.cdist(F.normalize(out["feature"], dim=1), self.means[:n_seen])

    # -- stages after the task ----------------------------------------------------------------
    def _class_balanced_finetuning(self, task: int) -> None:
        """Train only the classifier (all proxies, eta) on the exemplar memory (equal per class)."""
        tr, hp = self.trainer, self.hp
        clf = tr.model.classifier
        idx = tr.memory.indices()
        f = tr.features_of(idx)
        y = tr.y[torch.as_tensor(idx, device=tr.device)]
        n_frozen = clf.frozen.shape[0]
        P = nn.Parameter(clf.proxies().detach().clone())
        eta = nn.Parameter(clf.factor.detach().clone())
        opt = torch.optim.SGD([P, eta], lr=hp.cbf_lr, momentum=0.9)
        gen = self._gen(task + 1000)
        probe = CosineProxyClassifier(clf.in_dim, 0, clf.K).to(tr.device)
        for _ in range(hp.cbf_epochs):
            order = torch.randperm(f.shape[0], generator=gen).to(tr.device)
            for s in range(0, f.shape[0], hp.batch_size):
                b = order[s: s + hp.batch_size]
                probe.weight = P  # the probe computes the LSC similarities with the trainable proxies
                loss = nca_loss(probe(f[b]), y[b], eta, hp.margin)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        with torch.no_grad():
            clf.frozen = P.detach()[:n_frozen].clone()
            clf.weight = nn.Parameter(P.detach()[n_frozen:].clone())
            clf.factor.copy_(eta.detach())

    def _task_importance(self, task: int) -> dict[str, torch.Tensor]:
        """Official AFC: I_{g,c} = sum over batches of mean_n (dNCA/dx_{n,g,c})^2, normalised to mean 1."""
        tr, hp = self.trainer, self.hp
        model = tr.model
        idx = np.concatenate([tr.split_idx["train"][task], tr.memory.indices()])
        sums: dict[str, torch.Tensor] = {}
        was = model.training
        model.eval()
        for s in range(0, idx.size, hp.batch_size):
            b = torch.as_tensor(idx[s: s + hp.batch_size], device=tr.device)
            out = model(tr.fs.batch(b, tr._head_streams))
            feats = self.groups(model, out["feature"])
            names = list(feats)
            grads = torch.autograd.grad(nca_loss(out["logits"], tr.y[b], model.classifier.factor, hp.margin),
                                        [feats[g] for g in names], allow_unused=True)
            for g, gr in zip(names, grads):
                if gr is not None:
                    sums[g] = sums.get(g, 0) + (gr.detach() ** 2).mean(dim=0)
        model.train(was)
        return {g: v / v.mean().clamp_min(1e-30) for g, v in sums.items()}

    def state_dict(self) -> dict:
        return {"means": None if self.means is None else self.means.cpu(),
                "importance": None if self.importance is None else {k: v.cpu() for k, v in self.importance.items()}}

    def load_state_dict(self, state) -> None:
        dev = self.trainer.device if self.trainer else "cpu"
        m, imp = state.get("means"), state.get("importance")
        self.means = None if m is None else m.to(dev)
        self.importance = None if imp is None else {k: v.to(dev) for k, v in imp.items()}


@register_method("afc-nme")
class AFCNME(AFC):
    Hparams = AFCNMEHparams


@register_method("afc-lsc")
class AFCLSC(AFC):
    Hparams = AFCLSCHparams
