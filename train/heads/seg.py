"""Pieces shared by the segmentation heads: frame geometry, LoRA layers, the mask decoder.

A segmentation head (:class:`SegHead`) is built from the per-stream shapes
``dims``, its options and a :class:`SegGeometry` (frames per clip, the visual
token grid, the mask size and the number of mask outputs). ``forward(batch)``
takes ``{'audio': (B, Ta, Da), 'visual': (B, F * P, Dv)}`` (visual tokens
frame-major, each frame a row-major ``gh x gw = P`` grid, as
:class:`~train.features.FeatureSet` flattens a dense ``(F, P, Dv)`` stream) and
returns ``{'feature': (B, d) pooled fused tokens (the class head's input),
'mask_logits': (B, F, K, H, W)}``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from train.heads.base import Head, HeadError


@dataclass(frozen=True)
class SegGeometry:
    """Frames per clip ``frames``, token grid ``grid`` (gh, gw), ``mask_size`` (H, W), ``mask_channels`` K."""

    frames: int
    grid: tuple[int, int]
    mask_size: tuple[int, int]
    mask_channels: int = 1

    @property
    def tokens(self) -> int:
        return self.grid[0] * self.grid[1]


class SegHead(Head):
    """Base class of segmentation heads (see the module docstring)."""

    streams = ("audio", "visual")
    segmentation = True

    def __init__(self, dims, cfg, geometry: SegGeometry | None = None) -> None:
        super().__init__(dims, cfg)
        if geometry is None:
            raise HeadError(f"head {self.name!r} is a segmentation head: it trains on segmentation protocols "
                            "(a store with dense visual tokens and ground-truth masks)")
        tv = dims["visual"][0]
        if tv != geometry.frames * geometry.tokens:
            raise HeadError(f"head {self.name!r}: the visual stream has {tv} tokens per clip, expected "
                            f"{geometry.frames} frames x {geometry.tokens} grid tokens")
        self.geometry = geometry


# -- LoRA ----------------------------------------------------------------------------
class LoRA(nn.Module):
    """A linear map with a low-rank adapter: ``y = base(x) + (alpha / r) * B(A(x))`` (Hu et al., 2022).

    ``base`` is an ``nn.Linear`` or ``nn.Conv2d`` (then ``A`` is a conv of the same
    kernel, stride and padding into ``r`` channels and ``B`` a 1x1 conv); ``A`` is
    initialised like ``nn.Linear`` (Kaiming-uniform), ``B`` at zero, so a fresh
    adapter leaves the map unchanged. ``r = 0`` disables the adapter.
    Parameters are named ``base.*``, ``lora_A``, ``lora_B``.
    """

    def __init__(self, base: nn.Linear | nn.Conv2d, r: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        self.r, self.scale = int(r), (float(alpha) / r if r else 0.0)
        if not self.r:
            self.lora_A = self.lora_B = None
            return
        if isinstance(base, nn.Linear):
            self.lora_A = nn.Parameter(torch.empty(r, base.in_features))
            self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))
        else:
            k = base.kernel_size
            self.lora_A = nn.Parameter(torch.empty(r, base.in_channels, *k))
            self.lora_B = nn.Parameter(torch.zeros(base.out_channels, r, 1, 1))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.r:
            return y
        b = self.base
        if isinstance(b, nn.Linear):
            return y + self.scale * F.linear(F.linear(x, self.lora_A), self.lora_B)
        h = F.conv2d(x, self.lora_A, None, b.stride, b.padding, b.dilation)
        return y + self.scale * F.conv2d(h, self.lora_B)


def lora_modules(module: nn.Module) -> list[LoRA]:
    return [m for m in module.modules() if isinstance(m, LoRA)]


# -- mask decoder ----------------------------------------------------------------------
class MaskDecoder(nn.Module):
    """Token grid -> mask logits.

    ``x`` (N, P, d) tokens of N frames -> (N, K, H, W): the tokens are laid out on
    their ``gh x gw`` grid, then each stage ``c_i`` doubles the resolution
    (bilinear) and applies a 3x3 conv to ``c_i`` channels, GroupNorm and GELU,
    while the grid is smaller than ``1 / logit_stride`` of the mask side (the last
    channel count repeats when more stages are needed); a 1x1 conv gives K logit
    maps, upsampled bilinearly to the mask size (H, W). Logits at a quarter of the
    mask resolution (``logit_stride`` 4, the usual output stride of segmentation
    decoders) keep the CPU cost of 224-pixel masks low; the OPEN decoder design of
    the CL-AVS paper is filled in this way. ``lora_r > 0`` puts a LoRA adapter on
    every conv (the decoder's linear maps).
    """

    def __init__(self, d: int, geometry: SegGeometry, channels: tuple[int, ...], lora_r: int = 0,
                 lora_alpha: float = 16.0, logit_stride: int = 4) -> None:
        super().__init__()
        self.grid, self.size = geometry.grid, geometry.mask_size
        target = max(1, min(self.size) // max(1, int(logit_stride)))
        layers: list[nn.Module] = []
        c_in, side, i = d, min(self.grid), 0
        while side < target and channels:
            c_out = channels[min(i, len(channels) - 1)]
            conv = nn.Conv2d(c_in, c_out, 3, padding=1)
            layers.append(_UpStage(LoRA(conv, lora_r, lora_alpha) if lora_r else conv, c_out))
            c_in, side, i = c_out, side * 2, i + 1
        self.stages = nn.Sequential(*layers)
        out = nn.Conv2d(c_in, geometry.mask_channels, 1)
        self.out = LoRA(out, lora_r, lora_alpha) if lora_r else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, p, d = x.shape
        gh, gw = self.grid
        y = x.transpose(1, 2).reshape(n, d, gh, gw)
        y = self.out(self.stages(y))
        if tuple(y.shape[-2:]) != tuple(self.size):
            y = F.interpolate(y, size=self.size, mode="bilinear", align_corners=False)
        return y


class _UpStage(nn.Module):
    def __init__(self, conv: nn.Module, c_out: int) -> None:
        super().__init__()
        self.conv = conv
        self.norm = nn.GroupNorm(min(8, c_out), c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        return F.gelu(self.norm(self.conv(x)))
