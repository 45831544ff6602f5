"""Fusion heads: map a batch of cached features to one feature vector per clip.

A head is an ``nn.Module`` built from the per-stream sample shapes
``dims = {'audio': (Ta, Da), 'visual': (Tv, Dv)}`` and a frozen dataclass of
options (:attr:`Head.Config`). ``forward(batch)`` takes
``{'audio': (B, Ta, Da), 'visual': (B, Tv, Dv)}`` (only the streams in
:attr:`Head.streams` are read) and returns the clip feature (B, ``out_dim``) that
the trainer's classifier maps to logits and that methods distil.

Heads register themselves by name (:func:`register_head`); one file each. Heads
from other packages (entry-point group ``avcl.heads``) and from files
(``path/to/file.py:Class``) are found by :func:`resolve_head` (:mod:`avcl_core.plugins`).
"""
from __future__ import annotations

from train.heads.base import (
    HEADS, Head, HeadError, build_head, head_config, head_names, head_origin, register_head, resolve_head,
)

# importing the modules registers the heads
from train.heads import audio_only, guided_attention, naive_fusion, visual_only  # noqa: E402,F401
from train.heads import atlas, avs_static  # noqa: E402,F401  (segmentation heads)
from train.heads import avcil, cign, film, prompted  # noqa: E402,F401

__all__ = ["HEADS", "Head", "HeadError", "build_head", "head_config", "head_names", "head_origin", "register_head",
           "resolve_head"]
