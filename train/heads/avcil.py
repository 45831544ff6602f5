"""``avcil``: AV-CIL's audio-guided per-channel spatial and temporal attention (Pian et al., ICCV 2023).

Inputs: audio (B, Ta, Da) — averaged over tokens to one vector a (AV-CIL: the
AudioMAE clip vector, Ta = 1) — and dense visual tokens (B, F*P, Dv), time-major
(``frames`` F time steps of P positions; AV-CIL: VideoMAE 8 x 196 x 768). With
V (B, F, P, Dv) the tokens:

    a~ = tanh(W_qa a)            (B, Dv)        V~ = tanh(W_qv V)        (B, F, P, Dv)
    alpha[f, p, d] = softmax_p( V~[f, p, d] * a~[d] )     spatial: over positions, per frame and channel
    u[f, d]        = sum_p alpha[f, p, d] V~[f, p, d]
    beta[f, d]     = softmax_f( u[f, d] * a~[d] )         temporal: over frames, per channel
    v_bar[d]       = sum_f beta[f, d] sum_p alpha[f, p, d] V[f, p, d]     (the attention pools the raw tokens)
    a' = ReLU(W_a a) (B, d),  v' = ReLU(W_v v_bar) (B, d),  feature = a' + v'

The score is an element-wise product (no sum over channels), so every channel
has its own attention map — as in the released code. ``d_model`` = d (AV-CIL: 768).

Besides the feature, every forward leaves ``self.last`` = {``audio``: a',
``visual``: v', ``pooled``: v_bar, ``spatial``: alpha (B, F, P, Dv), ``temporal``:
beta (B, F, Dv)} for the ``avcil`` method's contrastive terms and attention
distillation and ``afc``'s feature distillation.

``frames``: 0 (default) takes AV-CIL's 8 frames when the stream has 8 x 196
tokens, else one frame whose positions are all the tokens; our own dense stores
(``visual_dense`` (T, P, C), e.g. the signal encoder's T x 64 grid) need
``--set head.frames=T``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from train.heads.base import Head, HeadError, register_head

log = logging.getLogger("avcl.train")

AVCIL_FRAMES, AVCIL_POSITIONS = 8, 196


def avcil_attention(a_q: torch.Tensor, v_q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel attention of AV-CIL: ``a_q`` (B, D), ``v_q`` (B, F, P, D) ->
    (alpha (B, F, P, D), softmax over P; beta (B, F, D), softmax over F)."""
    alpha = torch.softmax(v_q * a_q[:, None, None, :], dim=2)
    u = (alpha * v_q).sum(dim=2)
    beta = torch.softmax(u * a_q[:, None, :], dim=1)
    return alpha, beta


@register_head("avcil")
class AVCILHead(Head):
    streams = ("audio", "visual")

    @dataclass(frozen=True)
    class Config:
        d_model: int = 768
        frames: int = 0

        def check(self, what: str) -> None:
            if self.d_model <= 0 or self.frames < 0:
                raise HeadError(f"{what}: d_model must be > 0 and frames >= 0")

    def __init__(self, dims, cfg: Config) -> None:
        super().__init__(dims, cfg)
        (tv, dv), da = dims["visual"], dims["audio"][1]
        frames = cfg.frames or (AVCIL_FRAMES if tv == AVCIL_FRAMES * AVCIL_POSITIONS else 1)
        if tv % frames:
            raise HeadError(f"head 'avcil': the visual stream has {tv} tokens per clip, not a multiple of "
                            f"frames={frames}; set head.frames to the number of time steps of the dense stream")
        self.frames, self.positions = frames, tv // frames
        if self.positions == 1:
            log.warning("head 'avcil': one visual token per frame (%d frames): the spatial attention is trivial; "
                        "train on dense tokens, e.g. --stream visual=visual_dense", frames)
        d = cfg.d_model
        self.attn_audio = nn.Linear(da, dv)
        self.attn_visual = nn.Linear(dv, dv)
        self.audio_proj = nn.Linear(da, d)
        self.visual_proj = nn.Linear(dv, d)
        self.out_dim = d
        self.last: dict[str, torch.Tensor] = {}

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        a = batch["audio"].mean(dim=1)
        v = batch["visual"]
        v = v.reshape(v.shape[0], self.frames, self.positions, v.shape[-1])
        alpha, beta = avcil_attention(torch.tanh(self.attn_audio(a)), torch.tanh(self.attn_visual(v)))
        v_bar = (beta * (alpha * v).sum(dim=2)).sum(dim=1)
        a1 = F.relu(self.audio_proj(a))
        v1 = F.relu(self.visual_proj(v_bar))
        self.last = {"audio": a1, "visual": v1, "pooled": v_bar, "spatial": alpha, "temporal": beta}
        return a1 + v1
