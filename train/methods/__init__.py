"""Continual-learning methods, registered by name (one file each).

``finetune``, ``joint``, ``lwf``, ``icarl`` (``icarl-nme``, ``icarl-fc``),
``ssil``, ``lll``, ``ewc``, ``si``, ``mas`` (parameter regularisers for both problems,
:mod:`train.methods.param_reg`) and ``atlas`` (segmentation). See :mod:`train.methods.base` for the hook contract and
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

__all__ = ["METHODS", "Hparams", "Method", "MethodError", "build_method", "method_class", "method_hparams",
           "method_names", "method_origin", "register_method", "resolve_method"]
