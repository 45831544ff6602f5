"""Continual-learning methods, registered by name (one file each).

``finetune``, ``joint``, ``lwf``, ``icarl`` (``icarl-nme``, ``icarl-fc``),
``ssil``, ``lll``, ``avcil``, ``afc`` (``afc-nme``, ``afc-lsc``), ``cign``, the prompt-based ``l2p``, ``dualprompt``; the exemplar-free closed-form ``simplecil``, ``ranpac``, ``fecam``. See :mod:`train.methods.base` for the hook contract and
:mod:`train.methods.presets` for presets (``--preset``) and ``--set k=v`` resolution.
"""
from __future__ import annotations

from train.methods.base import (
    METHODS, Hparams, Method, MethodError, build_method, method_class, method_hparams, method_names, register_method,
)
from train.methods import finetune, icarl, joint, lll, lwf, ssil  # noqa: E402,F401  (registration)
from train.methods import afc, avcil, cign, fecam, l2p, ranpac, simplecil  # noqa: E402,F401

__all__ = ["METHODS", "Hparams", "Method", "MethodError", "build_method", "method_class", "method_hparams",
           "method_names", "register_method"]
