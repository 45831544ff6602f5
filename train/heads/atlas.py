"""``atlas``: the ATLAS segmentation head (Raghavan et al., "Can You Hear, Localize, and
Segment Continually?", seed 002), on cached frozen features.

With visual tokens ``X_v`` (F frames x P grid tokens, Dv) and audio tokens
``X_a`` (Ta, Da), both projected to ``d = d_model`` by LayerNorm + Linear:

1. *Audio-guided pre-fusion conditioning* (FiLM): ``a = mean_t X_a[t]`` (the global
   audio context), ``[gamma, beta] = W_c a``, ``X̄_v = (1 + gamma) ⊙ X_v + beta``
   per channel, on every token of every frame. OPEN in the paper (its equations are
   in the unavailable supplement): the ``1 + gamma`` form (identity at
   initialisation), a single linear layer, mean pooling.
2. *Cross-attention* (Eq. 3-4): ``Q = W_Q X̄_v`` (per frame), ``K = W_K X_a``,
   ``V = W_V X_a``, ``F = LayerNorm(X̄_v + W_O softmax(Q K^T / sqrt(d_h)) V)`` with
   ``n_heads`` heads of ``d_h = d / n_heads`` (heads and the output map ``W_O``
   are OPEN choices). The audio tokens are all of the clip's (several per clip:
   with one audio token softmax is identically 1 and the block degenerates).
3. *Mask decoder* (Eq. 5, design OPEN): :class:`~train.heads.seg.MaskDecoder`
   from each frame's fused token grid to mask logits at the mask resolution.
4. *Class head input* (Eq. 6): ``feature = mean over frames and tokens of F``;
   the trainer's growing linear classifier maps it to logits over the seen classes.

LoRA (Eq. 1, r = ``lora_r`` 8, alpha = ``lora_alpha`` 16, scale 2) sits on every
linear map of fusion (the projections, ``W_c``, ``W_Q/K/V/O``) and decoder (its
convs). Departure from the paper: ATLAS adapts the ViT visual encoder with LoRA;
here the encoder is frozen and cached, so the adapters sit on the head's own maps
(the ``atlas`` method freezes their base weights after the first task, see
:mod:`train.methods.atlas`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from train.heads.base import HeadError, check_attention_width, register_head
from train.heads.seg import LoRA, MaskDecoder, SegHead


class _Proj(nn.Module):
    """LayerNorm over input channels, then a LoRA-adapted Linear."""

    def __init__(self, d_in: int, d_out: int, r: int, alpha: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_in)
        self.proj = LoRA(nn.Linear(d_in, d_out), r, alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(x))


@register_head("atlas")
class AtlasHead(SegHead):
    @dataclass(frozen=True)
    class Config:
        d_model: int = 256
        n_heads: int = 4
        lora_r: int = 8
        lora_alpha: float = 16.0
        decoder_channels: tuple[int, ...] = (128, 64, 32)
        logit_stride: int = 4  # decoder logits at 1/logit_stride of the mask side, then bilinear
        dropout: float = 0.0

        def check(self, what: str) -> None:
            check_attention_width(what, self.d_model, self.n_heads)
            if self.lora_r < 0:
                raise HeadError(f"{what}: lora_r must be >= 0")

    def __init__(self, dims, cfg: Config, geometry=None) -> None:
        super().__init__(dims, cfg, geometry)
        d, r, al = cfg.d_model, cfg.lora_r, cfg.lora_alpha
        self.visual_in = _Proj(dims["visual"][1], d, r, al)
        self.audio_in = _Proj(dims["audio"][1], d, r, al)
        self.film = LoRA(nn.Linear(d, 2 * d), r, al)
        nn.init.zeros_(self.film.base.weight)  # identity conditioning at initialisation
        nn.init.zeros_(self.film.base.bias)
        self.q = LoRA(nn.Linear(d, d), r, al)
        self.k = LoRA(nn.Linear(d, d), r, al)
        self.v = LoRA(nn.Linear(d, d), r, al)
        self.o = LoRA(nn.Linear(d, d), r, al)
        self.norm = nn.LayerNorm(d)
        self.drop = nn.Dropout(cfg.dropout)
        self.decoder = MaskDecoder(d, self.geometry, tuple(cfg.decoder_channels), r, al, cfg.logit_stride)
        self.out_dim = d

    def fuse(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Fused tokens (B, F, P, d)."""
        g = self.geometry
        a = self.audio_in(batch["audio"])  # (B, Ta, d)
        x = self.visual_in(batch["visual"])  # (B, F*P, d)
        B, d, h = x.shape[0], x.shape[-1], self.cfg.n_heads
        gamma, beta = self.film(a.mean(dim=1)).chunk(2, dim=-1)
        x = (1 + gamma[:, None]) * x + beta[:, None]
        # every frame's tokens attend the clip's audio tokens: frames are folded into the query axis
        Q = self.q(x).view(B, -1, h, d // h).transpose(1, 2)
        K = self.k(a).view(B, -1, h, d // h).transpose(1, 2)
        V = self.v(a).view(B, -1, h, d // h).transpose(1, 2)
        att = F.scaled_dot_product_attention(Q, K, V).transpose(1, 2).reshape(B, -1, d)
        fused = self.norm(x + self.drop(self.o(att)))
        return fused.view(B, g.frames, g.tokens, d)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        fused = self.fuse(batch)
        B, Fr, P, d = fused.shape
        masks = self.decoder(fused.reshape(B * Fr, P, d))
        return {"feature": fused.mean(dim=(1, 2)), "mask_logits": masks.view(B, Fr, *masks.shape[1:])}
