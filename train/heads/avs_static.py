"""``avs-static``: an AVSBench-style audio-visual segmentation head (Zhou et al., ECCV 2022),
the static AVS model that CL-AVS trains continually as a baseline.

AVSBench's temporal pixel-wise audio-visual interaction (TPAVI, "dot" mode) on
cached tokens: visual tokens ``V`` (F frames x P grid tokens) and the audio token
of each frame's time ``a_f`` (the clip's audio tokens linearly resampled to F,
tiled over that frame's P positions), both projected to ``d = d_model``. Over all
``N = F * P`` positions of the clip,

    Y = (theta(V) phi(A)^T / N) g(V),      Z = V + W_z(Y)

(theta, phi, g, W_z linear; ``A`` the tiled audio), i.e. the sounding object is
found through the audio's affinity with every pixel of every frame. The fused
tokens go to the shared :class:`~train.heads.seg.MaskDecoder` (no LoRA) per frame;
``feature`` is their mean. Departures from AVSBench: cached frozen features
replace its PVT/ResNet backbone and multi-scale FPN decoder (one token grid, one
interaction stage).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from train.heads.base import HeadError, TokenProjection, register_head
from train.heads.seg import MaskDecoder, SegHead


@register_head("avs-static")
class AVSStaticHead(SegHead):
    @dataclass(frozen=True)
    class Config:
        d_model: int = 256
        decoder_channels: tuple[int, ...] = (128, 64, 32)
        logit_stride: int = 4  # decoder logits at 1/logit_stride of the mask side, then bilinear

        def check(self, what: str) -> None:
            if self.d_model <= 0:
                raise HeadError(f"{what}: d_model must be > 0")

    def __init__(self, dims, cfg: Config, geometry=None) -> None:
        super().__init__(dims, cfg, geometry)
        d = cfg.d_model
        self.visual_in = TokenProjection(dims["visual"][1], d)
        self.audio_in = TokenProjection(dims["audio"][1], d)
        self.theta, self.phi, self.g, self.w_z = (nn.Linear(d, d) for _ in range(4))
        nn.init.zeros_(self.w_z.weight)  # AVSBench initialises W_z at zero: the block starts as identity
        nn.init.zeros_(self.w_z.bias)
        self.decoder = MaskDecoder(d, self.geometry, tuple(cfg.decoder_channels), logit_stride=cfg.logit_stride)
        self.out_dim = d

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        g = self.geometry
        v = self.visual_in(batch["visual"])  # (B, F*P, d)
        a = self.audio_in(batch["audio"])  # (B, Ta, d)
        B, N, d = v.shape
        if a.shape[1] != g.frames:
            a = F.interpolate(a.transpose(1, 2), size=g.frames, mode="linear", align_corners=False).transpose(1, 2)
        a = a.repeat_interleave(g.tokens, dim=1)  # (B, F*P, d)
        aff = self.theta(v) @ self.phi(a).transpose(1, 2) / N
        z = v + self.w_z(aff @ self.g(v))
        fused = z.view(B, g.frames, g.tokens, d)
        masks = self.decoder(fused.reshape(B * g.frames, g.tokens, d))
        return {"feature": fused.mean(dim=(1, 2)), "mask_logits": masks.view(B, g.frames, *masks.shape[1:])}
