"""``mas``: Memory Aware Synapses (Aljundi et al., ECCV 2018), for classification and segmentation.

Importance = mean sensitivity of the L2 norm of the model's outputs (class
logits; mask logits for segmentation) to each parameter over the task's training
samples (:func:`train.methods.param_reg.output_sensitivity`), accumulated over
tasks; penalty ``(lamb / 2) * sum_i Omega_i (theta_i - theta*_i)^2`` with
``strength`` = lamb = 1 (the paper's value).
"""
from __future__ import annotations

from dataclasses import dataclass

from train.methods.base import register_method
from train.methods.param_reg import ParamRegularizer, RegHparams, output_sensitivity


@dataclass(frozen=True)
class MASHparams(RegHparams):
    strength: float = 1.0


@register_method("mas")
class MAS(ParamRegularizer):
    Hparams = MASHparams
    estimate = staticmethod(output_sensitivity)
