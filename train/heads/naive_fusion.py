"""Naive audio-visual fusion heads: ``concat`` and ``sum`` (no cross-modal attention).

Both pool each stream over its tokens first, so neither modality can select
which of the other's tokens matter (the "naive fusion" of seed 001's Fig. 1):

* ``concat``: feature = W2 GELU(W1 [LN(mean_t A); LN(mean_t V)] + b1) + b2, (B, d_model);
* ``sum``:    feature = W2 GELU(P_a(mean_t A) + P_v(mean_t V)) + b2, with
  P_s = LayerNorm + Linear to ``d_model`` per stream.

Dropout ``dropout`` is applied after the GELU.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from train.heads.base import Head, HeadError, TokenProjection, register_head


@dataclass(frozen=True)
class FusionConfig:
    d_model: int = 256
    dropout: float = 0.1

    def check(self, what: str) -> None:
        if self.d_model <= 0:
            raise HeadError(f"{what}: d_model must be positive, got {self.d_model}")


@register_head("concat")
class ConcatFusionHead(Head):
    streams = ("audio", "visual")
    Config = FusionConfig

    def __init__(self, dims, cfg: FusionConfig) -> None:
        super().__init__(dims, cfg)
        da, dv = dims["audio"][1], dims["visual"][1]
        self.norm_a, self.norm_v = nn.LayerNorm(da), nn.LayerNorm(dv)
        self.mlp = nn.Sequential(nn.Linear(da + dv, cfg.d_model), nn.GELU(), nn.Dropout(cfg.dropout),
                                 nn.Linear(cfg.d_model, cfg.d_model))
        self.out_dim = cfg.d_model

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        a = self.norm_a(batch["audio"].mean(dim=1))
        v = self.norm_v(batch["visual"].mean(dim=1))
        return self.mlp(torch.cat([a, v], dim=-1))


@register_head("sum")
class SumFusionHead(Head):
    streams = ("audio", "visual")
    Config = FusionConfig

    def __init__(self, dims, cfg: FusionConfig) -> None:
        super().__init__(dims, cfg)
        self.audio_in = TokenProjection(dims["audio"][1], cfg.d_model)
        self.visual_in = TokenProjection(dims["visual"][1], cfg.d_model)
        self.out = nn.Sequential(nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(cfg.d_model, cfg.d_model))
        self.out_dim = cfg.d_model

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.out(self.audio_in(batch["audio"].mean(dim=1)) + self.visual_in(batch["visual"].mean(dim=1)))
