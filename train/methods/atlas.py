"""``atlas``: ATLAS with Low-Rank Anchoring (Raghavan et al., "Can You Hear, Localize, and
Segment Continually?", seed 002), on cached frozen features; head ``atlas``
(:mod:`train.heads.atlas`).

* Loss: ``L = L_seg + lambda_cls * L_cls + L_stab`` (Eq. 10): ``L_seg`` = BCE + Dice
  over the frames with ground truth (Eq. 7), ``L_cls`` the class head's
  cross-entropy over the seen classes (CIL only, ``lambda_cls`` = 0.5;
  :class:`train.problems.SegmentationProblem`).
* LoRA (r 8, alpha 16) sits on the head's fusion and decoder maps. The paper adapts a
  frozen pretrained ViT; here the encoder is cached, so the first task trains the
  head fully (its weights play the pretrained backbone's part) and from the second
  task on the base weights of every LoRA-wrapped map are frozen (``freeze_base``):
  the adapters, biases, norms and the class head keep training. One set of adapters
  is shared by all tasks and never merged (per-task LoRA init/merge is OPEN).
* Low-Rank Anchoring (Eq. 9): ``L_stab = (c / 2) * sum_i Omega_i (theta_i - theta*_i)^2``,
  ``c`` = ``strength`` = 0.3, over the LoRA matrices and the decoder's weights
  (parameters named ``*lora_*`` or ``head.decoder.*``); ``Omega`` is SI's path
  integral (:class:`train.methods.param_reg.PathIntegral`: normalisation
  ``omega / (Delta theta^2 + xi)``, xi = 1e-3, clamped at 0, accumulated over
  tasks, gradient of the task loss — all OPEN in the paper). ``strength=0`` gives
  ATLAS without LRA.
* Optimiser: AdamW, lr 1e-3, weight decay 5e-4, 30 epochs per task (paper).
  Batch size OPEN: 16 clips (dense masks on a CPU).
"""
from __future__ import annotations

from dataclasses import dataclass

from train.heads.seg import lora_modules
from train.methods.base import register_method
from train.methods.param_reg import OnlinePathIntegral, RegHparams


@dataclass(frozen=True)
class AtlasHparams(RegHparams):
    epochs: int = 30
    batch_size: int = 16
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 5e-4
    strength: float = 0.3  # c of Low-Rank Anchoring
    xi: float = 1e-3
    lambda_cls: float = 0.5
    freeze_base: bool = True  # freeze LoRA-wrapped base weights after the first task


@register_method("atlas")
class Atlas(OnlinePathIntegral):
    Hparams = AtlasHparams
    segmentation_only = True
    default_head = "atlas"
    default_seg_head = "atlas"

    def anchored(self):
        return {n: p for n, p in self.trainer.model.named_parameters()
                if p.requires_grad and ("lora_" in n or n.startswith("head.decoder."))}

    def before_task(self, task: int) -> None:
        if task > 0 and self.hp.freeze_base:
            for m in lora_modules(self.trainer.model):
                if m.r:
                    m.base.weight.requires_grad_(False)
        super().before_task(task)
