"""The method contract: a frozen dataclass of hyper-parameters and a few trainer hooks.

A method is a subclass of :class:`Method` registered by name. The shared
:class:`~train.trainer.Trainer` owns the task loop, the classifier, the exemplar
memory, optimiser, evaluation, checkpoints and logs; a method only says

* which training samples a task uses (:attr:`Method.replay`):
  ``'none'`` (the current task's), ``'mixed'`` (current task + exemplars,
  shuffled together), ``'paired'`` (each batch of current samples is joined by
  a batch of ``exemplar_batch_size`` exemplars, drawn cyclically), ``'all'``
  (every seen task's training data: the joint upper bound);
* whether the model is re-initialised at every task (:attr:`Method.reinit_each_task`);
* whether it distils from the model of the previous task (:attr:`Method.uses_teacher`):
  the trainer then snapshots that model and precomputes its outputs once per task
  on every sample the task trains on (features are fixed, so these never change);
* and the hooks ``before_task``, ``fit_task``, ``loss``, ``after_backward``, ``before_eval``,
  ``after_task``, ``predict`` (and ``rehearsal``: the exemplars a task trains with, e.g. a resampled buffer).

Label space: the trainer numbers classes in order of arrival, so task ``t``
owns the contiguous output units ``[offsets[t], offsets[t+1])`` and a sample is
a current-task sample exactly when its label ``y >= n_old`` (``n_old`` =
``offsets[t]``).

The hooks receive ``batch = {'idx': (B,) FeatureSet indices, 'x': {stream: (B, T, D)},
'y': (B,) labels in output space}`` and ``out = {'feature': (B, D), 'logits': (B, n_seen)}``;
for segmentation the batch also has ``masks`` (B, F, H, W) uint8, ``valid`` (B, F) bool and
``task`` (B,), and ``out`` has ``mask_logits`` (B, F, K, H, W) (:mod:`train.problems`).
``loss`` returns named loss terms whose sum is minimised; each is logged per epoch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from avcl_core.plugins import Registry
from train.heads.base import OptionError, coerce_options

if TYPE_CHECKING:  # pragma: no cover
    from train.trainer import Trainer

REPLAY_MODES = ("none", "mixed", "paired", "all")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("none", "cosine", "step")
SELECTIONS = ("random", "herding")


@dataclass(frozen=True)
class Hparams:
    """Training hyper-parameters shared by every method.

    Defaults are AV-CIL's (Pian et al., ICCV 2023, released training scripts):
    Adam, lr 1e-3, weight decay 1e-4, constant learning rate, 200 epochs per
    task, batches of 256 current samples (+ 128 exemplars for paired replay).

    * ``epochs``: epochs per task; ``batch_size``: current-task samples per step
      (for ``'mixed'``/``'all'`` replay: samples per step);
    * ``exemplar_batch_size``: exemplars joined to each batch in ``'paired'`` replay;
    * ``optimizer``: ``adam`` | ``adamw`` | ``sgd`` (``momentum`` used by sgd);
    * ``scheduler``: ``none`` | ``cosine`` (annealed to 0 over the task's epochs) |
      ``step`` (multiply by ``gamma`` at each epoch in ``milestones``);
    * ``selection``: exemplar selection, ``random`` | ``herding``;
    * ``grad_clip``: max gradient norm (0 = off);
    * ``drop_last``: skip each epoch's final partial batch of current samples (AV-CIL's
      loaders do; ``--preset av-cil`` turns it on); a task smaller than one batch still trains.
    """

    epochs: int = 200
    batch_size: int = 256
    exemplar_batch_size: int = 128
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 1e-4
    scheduler: str = "none"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    selection: str = "random"
    grad_clip: float = 0.0
    drop_last: bool = False
    #: text options of a subclass and the values each may take, checked by :meth:`check`
    choices: ClassVar[dict[str, tuple[str, ...]]] = {}

    def check(self, what: str) -> None:
        def bad(msg: str) -> None:
            raise OptionError(f"{what}: {msg}")

        if self.epochs < 1:
            bad(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1 or self.exemplar_batch_size < 1:
            bad("batch_size and exemplar_batch_size must be >= 1")
        if self.optimizer not in OPTIMIZERS:
            bad(f"optimizer {self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        if self.scheduler not in SCHEDULERS:
            bad(f"scheduler {self.scheduler!r} is not one of {', '.join(SCHEDULERS)}")
        if self.selection not in SELECTIONS:
            bad(f"selection {self.selection!r} is not one of {', '.join(SELECTIONS)}")
        if self.lr <= 0 or self.weight_decay < 0:
            bad("lr must be > 0 and weight_decay >= 0")
        for name, allowed in self.choices.items():
            if getattr(self, name) not in allowed:
                bad(f"{name} must be {' or '.join(map(repr, allowed))}, got {getattr(self, name)!r}")


class Method:
    """Base class of every continual-learning method (see the module docstring)."""

    name: ClassVar[str] = ""
    family: ClassVar[str] = ""  # preset entries for the family apply too (e.g. icarl for icarl-nme)
    Hparams: ClassVar[type] = Hparams
    replay: ClassVar[str] = "none"
    uses_teacher: ClassVar[bool] = False
    reinit_each_task: ClassVar[bool] = False
    default_head: ClassVar[str] = "guided"
    default_seg_head: ClassVar[str] = "atlas"  # the head on segmentation protocols when none is given

    def __init__(self, hp: Any) -> None:
        self.hp = hp
        self.trainer: "Trainer | None" = None

    def attach(self, trainer: "Trainer") -> None:
        self.trainer = trainer

    # -- hooks --------------------------------------------------------------------
    def make_classifier(self, head: "torch.nn.Module", n_classes: int) -> "torch.nn.Module | None":
        """The classifier over ``head``'s features (``n_classes``, ``grow(n_new)``, ``forward(f) -> logits``);
        None (default): the trainer's growing linear classifier."""
        return None

    def before_task(self, task: int) -> None:
        """Called after the classifier has grown for ``task`` and before its first epoch."""

    def fit_task(self, task: int) -> bool:
        """Called after ``before_task``; return True when the method has fitted ``task`` itself
        (closed-form or prototype classifiers), so the trainer runs no SGD epoch for it."""
        return False

    def before_eval(self) -> None:
        """Called before the trainer scores the val split for model selection (``--select val-seen``),
        so that a method predicting from state built after the task (e.g. class means) can build it
        from the current model."""

    def loss(self, batch: dict, out: dict) -> dict[str, torch.Tensor]:
        """Named loss terms for one batch (their sum is minimised); for segmentation the
        problem's loss (:meth:`train.problems.SegmentationProblem.loss`)."""
        tr = self.trainer
        if tr is not None and tr.problem.kind != "classification":
            return tr.problem.loss(batch, out)
        return {"ce": F.cross_entropy(out["logits"], batch["y"])}

    def rehearsal(self, task: int, exemplars: np.ndarray) -> np.ndarray:
        """Exemplar indices that task ``task`` trains with (repeats allowed), given the memory's;
        called once per task after the previous model is frozen. Default: the memory as it is."""
        return exemplars

    def after_backward(self) -> None:
        """Called after ``loss.backward()``, before the optimiser step (e.g. to edit gradients)."""

    def after_task(self, task: int) -> None:
        """Called after the task's model is final and the exemplar memory updated."""

    def predict(self, batch: dict, out: dict) -> torch.Tensor:
        """Scores (B, n_seen) whose argmax is the prediction; default: the logits."""
        return out["logits"]

    # -- extra state (checkpoints) --------------------------------------------------
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: Mapping) -> None:
        pass

    # -- helpers for subclasses -------------------------------------------------------
    @property
    def n_old(self) -> int:
        """Classes seen before the current task (output units ``[0, n_old)``)."""
        return self.trainer.n_old

    def teacher(self, batch: dict) -> dict[str, torch.Tensor] | None:
        """The previous task's model outputs on ``batch`` (``feature``, ``logits`` over old classes), or None at task 0."""
        return self.trainer.teacher_outputs(batch["idx"])


METHODS: dict[str, type[Method]] = {}


class MethodError(ValueError):
    """An unknown or unusable method name; the message lists the available ones or names the plugin's error."""


def _check_replay(name: str, cls: type[Method]) -> None:
    if cls.replay not in REPLAY_MODES:
        raise MethodError(f"method {name!r}: replay {cls.replay!r} is not one of {REPLAY_MODES}")


#: built-in methods, entry points of group ``avcl.methods`` (loaded on first lookup) and
#: ``file.py:Class`` / ``module:Class`` references (see :mod:`avcl_core.plugins`)
REGISTRY = Registry("method", Method, MethodError, METHODS, _check_replay)

#: ``@register_method(name)``: class decorator registering a :class:`Method` subclass under ``name``
#: (sets ``cls.name``; where it came from is recorded for ``avcl-train --list``)
register_method = REGISTRY.register
#: ``method_names(plugins=True)``: every registered method name, sorted (``plugins``: import the entry points first)
method_names = REGISTRY.names
#: ``resolve_method(name)``: the registered name of a method given by name, entry-point name or
#: ``file.py:Class`` / ``module:Class`` reference (loaded and registered now); MethodError when unusable
resolve_method = REGISTRY.resolve
#: ``method_origin(name)``: ``built-in``, ``plugin <distribution> <version> (<module:attr>)``,
#: ``file <path>`` or ``module <name>``
method_origin = REGISTRY.origin
#: ``method_class(name)``: the class of method ``name`` (anything :func:`resolve_method` accepts)
method_class = REGISTRY.get


def method_hparams(name: str, options: Mapping[str, Any] | None = None, base=None):
    """Hyper-parameters of method ``name`` (its dataclass defaults, then ``options``)."""
    cls = method_class(name)
    return coerce_options(cls.Hparams, options, f"method {name!r}", base=base)


def build_method(name: str, options: Mapping[str, Any] | Any = None) -> Method:
    cls = method_class(name)
    hp = options if isinstance(options, cls.Hparams) else method_hparams(name, options)
    return cls(hp)
