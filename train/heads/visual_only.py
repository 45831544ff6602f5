"""``visual``: visual-only head, the mirror of ``audio`` (see :mod:`train.heads.audio_only`).

Visual tokens (B, Tv, Dv) -> LayerNorm + Linear -> ``layers`` self-attention
blocks -> mean over tokens -> feature (B, d_model).
"""
from __future__ import annotations

from train.heads.audio_only import SingleStreamHead
from train.heads.base import register_head


@register_head("visual")
class VisualOnlyHead(SingleStreamHead):
    streams = ("visual",)
