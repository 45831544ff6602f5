"""``guided``: audio-guided attention (the fusion block of "Listen, Look, and Learn").

With visual tokens ``V`` (B, Tv, Dv) and audio tokens ``A`` (B, Ta, Da), both
projected to ``d_model`` by LayerNorm + Linear (:class:`TokenProjection`):

    H = LN(V + MHA(Q=V, K=A, V=A));    H = LN(H + FFN(H))      (audio guides the frames)
    Z = LN(H + MHSA(H));               Z = LN(Z + FFN(Z))      (refinement)
    feature = mean_t Z[:, t]                                   (B, d_model)

MHA/MHSA are multi-head attention with ``n_heads`` heads, FFN is
Linear(d, ffn_mult*d) -> GELU -> Linear(ffn_mult*d, d), dropout ``dropout`` after
attention and FFN. The pooled ``feature`` is the attended feature the ``lll``
method distils. The block is permutation invariant over tokens (no positional
encoding): clips are recognised from what is seen and heard, not when.

With a single audio token (e.g. AV-CIL's AudioMAE clip vector, ``audio`` of
shape (1, Da)) the cross-attention has one key, its softmax is identically 1
and W_q / W_k get no gradient: the block reduces to LN(V + W_o W_v a). The head
warns then; the ``film`` head (:mod:`train.heads.film`) uses one audio vector
by modulating the visual tokens with it instead.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from train.heads.base import AttentionBlock, Head, HeadError, TokenProjection, register_head

log = logging.getLogger("avcl.train")


@register_head("guided")
class GuidedAttentionHead(Head):
    streams = ("audio", "visual")

    @dataclass(frozen=True)
    class Config:
        d_model: int = 256
        n_heads: int = 4
        ffn_mult: int = 2
        dropout: float = 0.1

        def check(self, what: str) -> None:
            if self.d_model <= 0 or self.n_heads <= 0 or self.d_model % self.n_heads:
                raise HeadError(f"{what}: d_model ({self.d_model}) must be a positive multiple of n_heads ({self.n_heads})")

    def __init__(self, dims, cfg: Config) -> None:
        super().__init__(dims, cfg)
        d = cfg.d_model
        if dims["audio"][0] == 1:
            log.warning("head 'guided': the audio stream has a single token per clip, so its cross-attention has "
                        "one key (softmax = 1; query/key weights get no gradient). Use several audio tokens "
                        "(e.g. --stream audio=audio_dense) or --head film, which conditions the visual tokens "
                        "on one audio vector")
        self.audio_in = TokenProjection(dims["audio"][1], d)
        self.visual_in = TokenProjection(dims["visual"][1], d)
        self.cross = AttentionBlock(d, cfg.n_heads, cfg.ffn_mult, cfg.dropout)
        self.refine = AttentionBlock(d, cfg.n_heads, cfg.ffn_mult, cfg.dropout)
        self.out_dim = d

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        a = self.audio_in(batch["audio"])
        v = self.visual_in(batch["visual"])
        h = self.cross(v, a)
        z = self.refine(h)
        return z.mean(dim=1)
