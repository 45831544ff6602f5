"""``cign``: CIGN (Mo et al., "Class-Incremental Grouping Network for Continual Audio-Visual
Learning", ICCV 2023) — the paper's method (its public code trains differently, see below).

Head ``cign`` with the :class:`~train.heads.cign.CIGNGrouping` classifier (class
tokens c_i, per-modality grouping, p_m[i] = sigmoid(FC_m(g_m[i]))). Exemplars
(the paper: 50 pairs per class, "following L2P", the protocol's memory here) are
mixed with the current data. With y the one-hot label over the n_seen classes,
C_old = n_old, tokens c^t of this model and c^{t-1} of the previous task's:

    L_group = sum_{i < C_old} KL(softmax(c^{t-1}_i) || softmax(c^t_i))                 class-token distillation
              + mean_{i >= C_old} CE(softmax(FC(c^t_i)), i)                             token CE, new tokens
              + sum_m mean_b sum_i BCE(p_m[b, i], y[b, i])                              per-modality BCE
    L_ctl   = sum_m mean_{b, n < C_old} -log( exp(s(g^{t-1}_m[b, n], g^t_m[b, n]) / tau)
                                             / sum_{j >= C_old} exp(s(g^{t-1}_m[b, n], g^t_m[b, j]) / tau) )
    L       = L_group + L_ctl          (task 0: the token CE and the BCE only)

s = cosine similarity; the InfoNCE of L_ctl (Eq. 9) has the anchor = the old
model's grouped feature of old class n, the positive = the current model's
feature of the same class, and only the new classes' current features in the
denominator, for the audio and the visual grouping.

Choices where the paper is open: the KL of Eq. 8 is taken between the softmax
over channels of each token vector (the paper does not say which distribution);
tau = 0.1; the BCE sums over classes and averages over the batch; exemplars are
random. Training: the paper's 100 epochs, batch 128, Adam lr 1e-4.

Departures from the paper: encoders frozen and cached (the paper trains
ResNet18s from EZ-VSL weights). The public code (stoneMo/CIGN) does not run as
published and differs: joint retraining on all previous data, no KL and no
L_ctl, token CE over all tokens; it is not followed here.
Variants of its tables: ``--set head.modality=audio|visual|av``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from train.heads.base import OptionError
from train.heads.cign import CIGNGrouping, CIGNHead
from train.methods.base import Hparams, Method, register_method


@dataclass(frozen=True)
class CIGNHparams(Hparams):
    epochs: int = 100
    batch_size: int = 128
    lr: float = 1e-4
    weight_decay: float = 0.0
    tau: float = 0.1
    token_kl: bool = True
    ctl: bool = True
    lambda_kl: float = 1.0
    lambda_ctl: float = 1.0

    def check(self, what: str) -> None:
        super().check(what)
        if self.tau <= 0:
            raise OptionError(f"{what}: tau must be > 0")


def token_distillation(tokens: torch.Tensor, old_tokens: torch.Tensor) -> torch.Tensor:
    """sum_i KL(softmax(old_i) || softmax(c_i)), softmax over the channels of each token (n_old, d)."""
    return F.kl_div(F.log_softmax(tokens, dim=1), F.log_softmax(old_tokens, dim=1), log_target=True,
                    reduction="sum")


def continual_grouping_contrastive(g: torch.Tensor, g_old: torch.Tensor, n_old: int, tau: float) -> torch.Tensor:
    """L_ctl of one modality: g (B, C, d) current, g_old (B, n_old, d) previous model (module docstring)."""
    a = F.normalize(g_old, dim=-1)  # anchors (B, n_old, d)
    cur = F.normalize(g, dim=-1)
    pos = (a * cur[:, :n_old]).sum(-1) / tau  # (B, n_old)
    neg = a @ cur[:, n_old:].transpose(1, 2) / tau  # (B, n_old, n_new)
    return (torch.logsumexp(neg, dim=-1) - pos).mean()


@register_method("cign")
class CIGN(Method):
    Hparams = CIGNHparams
    replay = "mixed"
    default_head = "cign"

    def make_classifier(self, head, n_classes: int):
        if not isinstance(head, CIGNHead):
            raise OptionError(f"method 'cign' needs head 'cign' (its class-token grouping), got head {head.name!r}")
        return CIGNGrouping(head, n_classes)

    def loss(self, batch, out):
        tr, hp, y = self.trainer, self.hp, batch["y"]
        clf = tr.model.classifier
        last = clf.last
        n_old, n_seen = self.n_old, tr.n_seen
        onehot = F.one_hot(y, n_seen).to(out["logits"].dtype)
        new = torch.arange(n_old, n_seen, device=y.device)
        terms = {"tok_ce": F.cross_entropy(clf.token_logits()[n_old:], new),
                 "bce": sum(F.binary_cross_entropy_with_logits(last[f"p_{m}"], onehot, reduction="sum")
                            for m in clf.modalities) / y.numel()}
        old = tr.old_model
        if old is None:
            return terms
        if hp.token_kl:
            terms["tok_kl"] = hp.lambda_kl * token_distillation(clf.tokens[:n_old], old.classifier.tokens.detach())
        if hp.ctl:
            with torch.no_grad():
                old(batch["x"])
            terms["ctl"] = hp.lambda_ctl * sum(
                continual_grouping_contrastive(last[f"g_{m}"], old.classifier.last[f"g_{m}"], n_old, hp.tau)
                for m in clf.modalities)
        return terms
