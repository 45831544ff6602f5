"""The encoder half of SAM-Audio's DACVAE audio codec, with weight norm folded.

Architecture (a DAC-style convolutional encoder):

- ``encoder.block.0``: Conv1d(1 → C, k=7, pad 3), with C = ``encoder_dim``;
- ``encoder.block.1..4``: one block per stride s in ``rates`` (channels double, D = 2·C_in):
  three residual units on C_in channels (dilations 1, 3, 9; each is
  ``x + Conv1x1(Snake(Conv_k7,dil(Snake(x))))``), then Snake and a strided
  Conv1d(C_in → D, k=2s, stride s, pad ⌈s/2⌉);
- ``encoder.block.5``: Snake; ``encoder.block.6``: Conv1d(16·C → ``latent_dim``, k=3, pad 1);
- ``quantizer.in_proj``: Conv1d(``latent_dim`` → 2·``codebook_dim``, k=1); its first
  ``codebook_dim`` output channels are the VAE posterior mean, the feature we keep.

Snake(x) = x + sin²(α·x) / (α + 1e-9), with one learnt α per channel.

Input: (B, L) waveform at 48 kHz, reflect-padded on the right to a multiple of the hop
``prod(rates)`` (1920 → 25 latent frames per second). Output: (B, ⌈L / hop⌉, codebook_dim).

Upstream checkpoints store every convolution with weight normalisation
(``weight_g``/``weight_v``, or ``parametrizations.weight.original0/1``);
:func:`fold_weight_norm` turns them into plain ``weight`` tensors,
w = g · v / ‖v‖ with the norm over all axes but the output channel.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class DacVaeConfig:
    encoder_dim: int = 64
    rates: tuple[int, ...] = field(default=(2, 8, 10, 12))
    latent_dim: int = 1024
    codebook_dim: int = 128
    sample_rate: int = 48_000

    @property
    def hop(self) -> int:
        return math.prod(self.rates)


#: ``base`` is SAM-Audio's codec; ``tiny`` keeps strides (hence hop and frame rate) and narrows channels.
DACVAE_VARIANTS = {
    "base": DacVaeConfig(),
    "tiny": DacVaeConfig(encoder_dim=4, latent_dim=64, codebook_dim=16),
}


class Snake(nn.Module):
    """Snake activation, x + sin²(α x) / (α + 1e-9); α has shape (1, C, 1)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.sin(self.alpha * x).pow(2) * (self.alpha + 1e-9).reciprocal()


class ResidualUnit(nn.Module):
    def __init__(self, dim: int, dilation: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            Snake(dim),
            nn.Conv1d(dim, dim, kernel_size=7, dilation=dilation, padding=3 * dilation),
            Snake(dim),
            nn.Conv1d(dim, dim, kernel_size=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # lengths are preserved ("same" padding), so the skip needs no cropping
        return x + self.block(x)


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, stride: int) -> None:
        super().__init__()
        half = dim // 2
        self.block = nn.Sequential(
            ResidualUnit(half, 1),
            ResidualUnit(half, 3),
            ResidualUnit(half, 9),
            Snake(half),
            nn.Conv1d(half, dim, kernel_size=2 * stride, stride=stride, padding=math.ceil(stride / 2)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class _Encoder(nn.Module):
    def __init__(self, cfg: DacVaeConfig) -> None:
        super().__init__()
        dim = cfg.encoder_dim
        layers: list[nn.Module] = [nn.Conv1d(1, dim, kernel_size=7, padding=3)]
        for stride in cfg.rates:
            dim *= 2
            layers.append(EncoderBlock(dim, stride))
        layers += [Snake(dim), nn.Conv1d(dim, cfg.latent_dim, kernel_size=3, padding=1)]
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class _Quantizer(nn.Module):
    def __init__(self, cfg: DacVaeConfig) -> None:
        super().__init__()
        self.in_proj = nn.Conv1d(cfg.latent_dim, 2 * cfg.codebook_dim, kernel_size=1)


class DacVaeEncoder(nn.Module):
    """Waveform → DACVAE posterior mean. ``forward``: (B, L) → (B, ⌈L/hop⌉, codebook_dim)."""

    def __init__(self, cfg: DacVaeConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = _Encoder(cfg)
        self.quantizer = _Quantizer(cfg)

    def num_frames(self, num_samples: int) -> int:
        return -(-num_samples // self.cfg.hop)

    def pad(self, wav: torch.Tensor) -> torch.Tensor:
        rest = wav.shape[-1] % self.cfg.hop
        if not rest:
            return wav
        pad = self.cfg.hop - rest
        if pad >= wav.shape[-1]:
            raise ValueError(
                f"audio of {wav.shape[-1]} samples is too short to reflect-pad to the hop of "
                f"{self.cfg.hop} samples; give at least {self.cfg.hop // 2 + 1} samples")
        return F.pad(wav, (0, pad), mode="reflect")

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        x = self.pad(wav.unsqueeze(1))
        z = self.encoder(x)
        mean = self.quantizer.in_proj(z)[:, : self.cfg.codebook_dim]
        return mean.transpose(1, 2)


_WN_FORMS = (
    (".weight_g", ".weight_v"),
    (".parametrizations.weight.original0", ".parametrizations.weight.original1"),
)


def fold_weight_norm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace weight-normalised pairs (g, v) by ``weight = g · v / ‖v‖``.

    ``‖v‖`` is taken per output channel (over every axis but 0), as
    ``torch.nn.utils.weight_norm(dim=0)`` defines it. Other keys, and a g or v without its
    partner, pass through unchanged (a strict load then names them).
    """
    out = dict(state)
    for g_suffix, v_suffix in _WN_FORMS:
        for g_key in [k for k in state if k.endswith(g_suffix)]:
            stem = g_key[: -len(g_suffix)]
            v_key = stem + v_suffix
            if v_key not in state:
                continue
            g, v = state[g_key], state[v_key]
            norm = torch.linalg.vector_norm(v.float(), dim=tuple(range(1, v.ndim)), keepdim=True)
            out[stem + ".weight"] = (v.float() * (g.float() / norm)).to(v.dtype)
            del out[g_key], out[v_key]
    return out
