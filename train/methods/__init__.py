"""Continual-learning methods, registered by name (one file each).

``finetune``, ``joint``, ``lwf``, ``icarl`` (``icarl-nme``, ``icarl-fc``),
``ssil``, ``lll``, ``avcil``, ``afc`` (``afc-nme``, ``afc-lsc``), ``cign``, the prompt-based ``l2p``, ``dualprompt``;
the exemplar-free closed-form ``simplecil``, ``ranpac``, ``fecam``; ``ewc``, ``si``, ``mas`` (parameter
regularisers for both problems, :mod:`train.methods.param_reg`); ``atlas`` (segmentation); ``cmr``, ``mib``,
``plop`` (semantic segmentation). See :mod:`train.methods.base` for the hook contract and
:mod:`train.methods.presets` for presets (``--preset``) and ``--set k=v`` resolution.
Methods from other packages (entry-point group ``avcl.methods``) and from files
(``path/to/file.py:Class``) are found by :func:`resolve_method` (:mod:`avcl_core.plugins`).
"""
from __future__ import annotations

from train.methods.base import (
    METHODS, Hparams, Method, MethodError, build_method, method_class, method_hparams, method_names, method_origin,
    register_method, resolve_method,
)
from train.methods import finetune, icarl, joint, lll, lwf, ssil  # noqa: E402,F401  (registration)
from train.methods import atlas, ewc, mas, si  # noqa: E402,F401  (parameter regularisers, ATLAS)
from train.methods import cmr, mib, plop  # noqa: E402,F401  (semantic segmentation)
from train.methods import afc, avcil, cign, fecam, l2p, ranpac, simplecil  # noqa: E402,F401

__all__ = ["METHODS", "Hparams", "Method", "MethodError", "build_method", "method_class", "method_hparams",
           "method_names", "method_origin", "register_method", "resolve_method"]
