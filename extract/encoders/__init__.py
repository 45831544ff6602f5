"""Frozen feature encoders, by CLI name.

Each name maps to a module of this package with a ``build(**options)`` function returning a
frozen :class:`~extract.encoders.base.FeatureEncoder`; modules are imported only when used
(timm and the model code are heavy). Example::

    enc = build_encoder("vit-b16", variant="tiny", frames_per_clip=4)
    enc.encode(frames, None)["visual"].shape   # (B, 4, 192)
"""
from __future__ import annotations

import importlib

from .base import CheckpointError, FeatureEncoder, Preprocess

#: CLI name → module (in this package) holding its ``build``.
ENCODERS = {
    "sam-audio": "sam_audio",
    "pann-cnn14": "pann",
    "vit-b16": "vit",
    "signal": "signal",
}


def encoder_module(name: str):
    """The module implementing encoder ``name`` (imported on first use)."""
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; choose one of {', '.join(sorted(ENCODERS))}")
    return importlib.import_module(f"{__name__}.{ENCODERS[name]}")


def build_encoder(name: str, **options) -> FeatureEncoder:
    """Build encoder ``name`` with its ``build(**options)``; an unknown option is a ``TypeError``."""
    return encoder_module(name).build(**options)


__all__ = ["ENCODERS", "build_encoder", "encoder_module", "FeatureEncoder", "Preprocess", "CheckpointError"]
