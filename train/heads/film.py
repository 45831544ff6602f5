"""``film``: audio-conditioned visual tokens (FiLM), for audio given as one vector per clip.

When the audio stream holds a single token (AV-CIL's AudioMAE clip vector), an
attention with audio as keys is degenerate (one key). This head lets that vector
modulate every visual token channel-wise instead (Perez et al., FiLM, AAAI 2018).
With a = mean_t A (B, Da) and visual tokens V (B, Tv, Dv):

    a' = LN(a) W_a + b_a                               (B, d)   audio projection
    gamma, beta = a' W_g + b_g, a' W_b + b_b           (B, d)   zero-initialised: identity at start
    H = (1 + gamma) * (LN(V) W_v + b_v) + beta         (B, Tv, d)
    H = AttentionBlock(H) x ``layers``                 (self-attention over the modulated frames)
    feature = mean_t H + a'                            (B, d)

so the audio decides which visual channels matter and still contributes to the
clip feature directly. Several audio tokens are averaged first.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from train.heads.base import AttentionBlock, Head, HeadError, TokenProjection, register_head
from train.heads.guided_attention import GuidedAttentionHead


@register_head("film")
class FiLMHead(Head):
    streams = ("audio", "visual")

    @dataclass(frozen=True)
    class Config(GuidedAttentionHead.Config):
        layers: int = 1

        def check(self, what: str) -> None:
            super().check(what)
            if self.layers < 0:
                raise HeadError(f"{what}: layers must be >= 0, got {self.layers}")

    def __init__(self, dims, cfg: Config) -> None:
        super().__init__(dims, cfg)
        d = cfg.d_model
        self.audio_in = TokenProjection(dims["audio"][1], d)
        self.visual_in = TokenProjection(dims["visual"][1], d)
        self.gamma = nn.Linear(d, d)
        self.beta = nn.Linear(d, d)
        for lin in (self.gamma, self.beta):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        self.blocks = nn.ModuleList(AttentionBlock(d, cfg.n_heads, cfg.ffn_mult, cfg.dropout) for _ in range(cfg.layers))
        self.out_dim = d

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        a = self.audio_in(batch["audio"].mean(dim=1))
        h = (1 + self.gamma(a))[:, None] * self.visual_in(batch["visual"]) + self.beta(a)[:, None]
        for blk in self.blocks:
            h = blk(h)
        return h.mean(dim=1) + a
