"""``cign``: CIGN (Mo et al., "Class-Incremental Grouping Network for Continual Audio-Visual
Learning", ICCV 2023) — the token projections and the class-token grouping network.

The head projects each stream's tokens to ``d_model`` (LayerNorm + Linear):
audio (B, Ta, d) (the paper: one global audio vector) and visual (B, Tv, d) (the
paper: a 7 x 7 ResNet18 map, P = 49), and returns them flattened,
(B, (Ta + Tv) * d). The class tokens grow with the classes, so they and the
grouping live in :class:`CIGNGrouping`, the classifier the ``cign`` method puts
on this head (the trainer grows classifiers task by task). With learnable class
tokens c_i (d), shared by the two modalities, for each modality m in the head's
``modality`` (``av``: audio and visual; ``audio``; ``visual``):

    [f^_m; c^_m] = Transformer_m([f_m; c])            ``depth`` pre-norm self-attention blocks (paper: 3)
    A_m[p, i]    = softmax_i( (W_q f^_m[p]) . (W_k c^_m[i]) / sqrt(d) )       assignment of token p to class i
    g_m[i]       = c^_m[i] + W_o sum_p A_m[p, i] W_v f^_m[p] / sum_p A_m[p, i]  (B, n_classes, d)
    p_m[i]       = sigmoid(FC_m(g_m[i]))                                      (one FC d -> 1 per modality)
    prediction   = argmax_i p_a[i] * p_v[i]   (``av``; p_a or p_v alone for one modality)

The classifier's logits are log p_a + log p_v (the log of the product). Choices where
the paper is open: the softmax runs over the class axis (as GroupViT and the
public code; the paper's Table 5 softmax), the normalisation over positions has no
+1 (the paper's Eq. 7; the code adds 1), the 1/sqrt(d) scale, and class tokens
start from N(0, ``token_std``^2), std 1 (the code: zeros), so that the softmax over a
token's channels, which the class-token distillation compares, is not flat. With a single audio token the
normalisation makes g_a[i] = c^_a[i] + W_o W_v f^_a: the class dependence then
comes from the self-attention. Departures: the paper trains ResNet18 encoders
initialised from EZ-VSL weights; here the encoders are frozen and cached.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from train.heads.base import (
    FeedForward, Head, HeadError, MultiHeadAttention, TokenProjection, check_attention_width, register_head,
)

MODALITIES = {"av": ("audio", "visual"), "audio": ("audio",), "visual": ("visual",)}


@register_head("cign")
class CIGNHead(Head):
    streams = ("audio", "visual")

    @dataclass(frozen=True)
    class Config:
        d_model: int = 512
        n_heads: int = 8
        depth: int = 3
        ffn_mult: int = 4
        dropout: float = 0.1
        modality: str = "av"
        token_std: float = 1.0

        def check(self, what: str) -> None:
            check_attention_width(what, self.d_model, self.n_heads)
            if self.depth < 0 or self.modality not in MODALITIES:
                raise HeadError(f"{what}: depth must be >= 0 and modality one of {', '.join(MODALITIES)}")

    def __init__(self, dims, cfg: Config) -> None:
        super().__init__(dims, cfg)
        d = cfg.d_model
        self.audio_in = TokenProjection(dims["audio"][1], d)
        self.visual_in = TokenProjection(dims["visual"][1], d)
        self.n_tokens = {"audio": dims["audio"][0], "visual": dims["visual"][0]}
        self.out_dim = (self.n_tokens["audio"] + self.n_tokens["visual"]) * d

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        a, v = self.audio_in(batch["audio"]), self.visual_in(batch["visual"])
        return torch.cat([a, v], dim=1).flatten(1)


class PreNormBlock(nn.Module):
    """x = x + Drop(MHSA(LN(x)));  x = x + Drop(FFN(LN(x)))."""

    def __init__(self, d: int, heads: int, mult: int, dropout: float) -> None:
        super().__init__()
        self.n1, self.attn = nn.LayerNorm(d), MultiHeadAttention(d, heads, dropout)
        self.n2, self.ffn = nn.LayerNorm(d), FeedForward(d, mult, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.n1(x)
        x = x + self.drop(self.attn(h, h))
        return x + self.drop(self.ffn(self.n2(x)))


class ModalityGrouping(nn.Module):
    """One modality's transformer over [features; tokens] and its class grouping (module docstring)."""

    def __init__(self, d: int, heads: int, depth: int, mult: int, dropout: float) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(PreNormBlock(d, heads, mult, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc = nn.Linear(d, 1)

    def forward(self, f: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """f (B, P, d), tokens (C, d) -> (g (B, C, d), logit of p (B, C))."""
        B, P, d = f.shape
        x = torch.cat([f, tokens[None].expand(B, -1, -1)], dim=1)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        fh, ch = x[:, :P], x[:, P:]
        A = torch.softmax(self.q(fh) @ self.k(ch).transpose(1, 2) / math.sqrt(d), dim=2)  # (B, P, C): over classes
        pooled = A.transpose(1, 2) @ self.v(fh) / A.sum(dim=1)[..., None].clamp_min(1e-12)  # (B, C, d)
        g = ch + self.o(pooled)
        return g, self.fc(g).squeeze(-1)


class CIGNGrouping(nn.Module):
    """CIGN's classifier on a ``cign`` head: class tokens, per-modality grouping, product of probabilities.

    ``n_classes``, ``grow(n_new)`` (new tokens and token-classifier rows; old ones kept),
    ``forward(f) -> logits`` = sum over modalities of log sigmoid(FC_m(g_m)) (B, n_classes).
    Every forward leaves ``self.last`` = {``g_audio``/``g_visual``: (B, C, d), ``p_audio``/``p_visual``:
    probability logits (B, C)} for the ``cign`` method's losses.
    """

    def __init__(self, head: CIGNHead, n_classes: int) -> None:
        super().__init__()
        cfg = head.cfg
        self.d = cfg.d_model
        self.n_audio = head.n_tokens["audio"]
        self.token_std = cfg.token_std
        self.modalities = MODALITIES[cfg.modality]
        self.groupings = nn.ModuleDict({m: ModalityGrouping(cfg.d_model, cfg.n_heads, cfg.depth, cfg.ffn_mult,
                                                            cfg.dropout) for m in self.modalities})
        self.tokens = nn.Parameter(torch.zeros(0, self.d))
        # token CE: FC(c_i) = W c_i + b should name class i
        self.token_w = nn.Parameter(torch.zeros(0, self.d))
        self.token_b = nn.Parameter(torch.zeros(0))
        self.last: dict[str, torch.Tensor] = {}
        if n_classes:
            self.grow(n_classes)

    @property
    def n_classes(self) -> int:
        return int(self.tokens.shape[0])

    def grow(self, n_new: int) -> None:
        dev = self.tokens.device
        new = torch.empty(n_new, self.d, device=dev)
        nn.init.normal_(new, std=self.token_std)
        self.tokens = nn.Parameter(torch.cat([self.tokens.detach(), new]))
        fc = nn.Linear(self.d, n_new).to(dev)  # new rows initialised like nn.Linear, old rows kept
        self.token_w = nn.Parameter(torch.cat([self.token_w.detach(), fc.weight.detach()]))
        self.token_b = nn.Parameter(torch.cat([self.token_b.detach(), fc.bias.detach()]))

    def token_logits(self) -> torch.Tensor:
        """FC(c_i) (n_classes, n_classes)."""
        return F.linear(self.tokens, self.token_w, self.token_b)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        t = f.view(f.shape[0], -1, self.d)
        parts = {"audio": t[:, : self.n_audio], "visual": t[:, self.n_audio:]}
        logits = 0
        self.last = {}
        for m in self.modalities:
            g, z = self.groupings[m](parts[m], self.tokens)
            self.last[f"g_{m}"], self.last[f"p_{m}"] = g, z
            logits = logits + F.logsigmoid(z)
        return logits

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        tok = state_dict.get(prefix + "tokens")
        if tok is not None and tok.shape[0] != self.n_classes:
            dev = self.tokens.device
            self.tokens = nn.Parameter(torch.zeros(0, self.d, device=dev))
            self.token_w = nn.Parameter(torch.zeros(0, self.d, device=dev))
            self.token_b = nn.Parameter(torch.zeros(0, device=dev))
            self.grow(int(tok.shape[0]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
