"""``audio``: audio-only head (the single-modality baseline of seed 001's ablation).

Audio tokens (B, Ta, Da) -> LayerNorm + Linear to ``d_model`` -> ``layers``
post-norm self-attention blocks (MHSA + FFN, as in ``guided``) -> mean over
tokens -> feature (B, d_model). Same capacity as the audio-visual ``guided``
head with ``layers=2``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from train.heads.base import AttentionBlock, Head, HeadError, TokenProjection, check_attention_width, register_head


@dataclass(frozen=True)
class SingleStreamConfig:
    d_model: int = 256
    n_heads: int = 4
    ffn_mult: int = 2
    dropout: float = 0.1
    layers: int = 2

    def check(self, what: str) -> None:
        check_attention_width(what, self.d_model, self.n_heads)
        if self.layers < 0:
            raise HeadError(f"{what}: layers must be >= 0, got {self.layers}")


class SingleStreamHead(Head):
    """Self-attention encoder over one stream's tokens, mean-pooled."""

    Config = SingleStreamConfig

    def __init__(self, dims, cfg: SingleStreamConfig) -> None:
        super().__init__(dims, cfg)
        (stream,) = self.streams
        self.stream = stream
        self.inp = TokenProjection(dims[stream][1], cfg.d_model)
        self.blocks = nn.ModuleList(
            AttentionBlock(cfg.d_model, cfg.n_heads, cfg.ffn_mult, cfg.dropout) for _ in range(cfg.layers)
        )
        self.out_dim = cfg.d_model

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x = self.inp(batch[self.stream])
        for blk in self.blocks:
            x = blk(x)
        return x.mean(dim=1)


@register_head("audio")
class AudioOnlyHead(SingleStreamHead):
    streams = ("audio",)
