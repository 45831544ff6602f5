"""``si``: Synaptic Intelligence (Zenke et al., ICML 2017), for classification and segmentation.

The path integral ``omega_i = sum_steps -g_i * Delta theta_i`` of the task loss is
accumulated along training, turned into ``Omega_i = max(0, omega_i / ((Delta_task theta_i)^2 + xi))``
at the end of the task and added over tasks; later tasks minimise
``task loss + (c / 2) * sum_i Omega_i (theta_i - theta*_i)^2``
(:class:`train.methods.param_reg.PathIntegral`, where the OPEN details are stated).
``strength`` = c = 0.3, the value CL-AVS uses for its SI-style anchoring, so that
``si`` and ``atlas`` differ in what they anchor (and LoRA), not in how strongly;
``xi`` = 1e-3.
"""
from __future__ import annotations

from dataclasses import dataclass

from train.methods.base import register_method
from train.methods.param_reg import OnlinePathIntegral, RegHparams


@dataclass(frozen=True)
class SIHparams(RegHparams):
    strength: float = 0.3
    xi: float = 1e-3


@register_method("si")
class SI(OnlinePathIntegral):
    Hparams = SIHparams
