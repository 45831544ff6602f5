"""``ewc``: Elastic Weight Consolidation (Kirkpatrick et al., PNAS 2017), for classification and segmentation.

After each task the empirical Fisher diagonal of the task loss over the task's
training samples (:func:`train.methods.param_reg.fisher_diagonal`) is added to
the importance, the parameters become the anchor, and later tasks minimise
``task loss + (lamb / 2) * sum_i F_i (theta_i - theta*_i)^2`` (``strength`` = lamb,
default 5000 as in FACIL's EWC; Fisher accumulated as a sum over tasks).
"""
from __future__ import annotations

from dataclasses import dataclass

from train.methods.base import register_method
from train.methods.param_reg import ParamRegularizer, RegHparams, fisher_diagonal


@dataclass(frozen=True)
class EWCHparams(RegHparams):
    strength: float = 5000.0


@register_method("ewc")
class EWC(ParamRegularizer):
    Hparams = EWCHparams
    estimate = staticmethod(fisher_diagonal)
