"""The shared continual training loop, for classification and segmentation.

:class:`Trainer` owns everything that is not a method's idea: the task loop,
the seen classes and the growing classifier, the exemplar memory, the
optimiser and its schedule, the previous task's model (teacher), evaluation of
every task after every task (the accuracy matrix), model selection, per-task
checkpoints, and logs. Methods plug in through a few hooks
(:mod:`train.methods.base`); one may fit a task in closed form (``fit_task``:
no SGD epoch then) or bring its own classifier (``make_classifier``).

Label space: classes are numbered in order of arrival, so task ``t`` owns the
output units ``[offsets[t], offsets[t+1])``; the classifier has ``n_seen =
offsets[t+1]`` outputs while task ``t`` trains and grows by copying its old rows.

Evaluation after task ``t``: for every task ``i`` (all ``T`` of them),
``A[t, i]`` = fraction of task ``i``'s test samples whose predicted class (the
argmax of the method's scores over the ``n_seen`` seen classes; within the
sample's own task for a ``TIL`` protocol) is the true class; tasks not yet seen
score 0 in class-incremental evaluation. The step accuracy ``acc_t`` is the
sample-weighted accuracy over the test samples of tasks ``0..t``.

Model selection: ``'last'`` (default) keeps the model of the last epoch;
``'val-seen'`` keeps the epoch with the best accuracy on the val split of all
seen classes, as AV-CIL did. That uses old-class val data beyond the exemplar
memory, so it is recorded in the run config as ``leaks_old_class_val: true``.

Determinism: at the start of task ``t`` the global torch RNG (initialisation,
dropout) and a local ``torch.Generator`` (shuffling) are seeded from ``(seed, t)``,
so a run resumed from the checkpoint of task ``t-1`` continues exactly as an
uninterrupted run would.

Watching long runs: ``progress_bar=True`` shows a tqdm bar over all epochs of
all tasks (loss, ETA). A loss that is NaN or infinite over an epoch (checked
once per epoch, with the logged mean, so no step waits for the device) stops
the run with :class:`NonFiniteLoss` naming the task and epoch; the checkpoint of
the last finished task is kept and nothing of the failed task is written.

Training accuracy: each epoch's log line has ``train_acc``, the fraction of the
epoch's training samples (current and replayed) whose logits' argmax was the
label while the model trained; a task whose last epoch stays below 1.5 x chance
(1 / n_seen) is reported with a warning.

Run directory files written here: ``log.jsonl`` (one line per SGD epoch),
``ckpt_task<t>.pt`` (model, classifier size, memory, method state, accuracy rows;
no optimiser), ``acc_matrix.csv`` and, last, ``metrics.json``.

Problems: what is trained and measured is a :class:`~train.problems.Problem`
chosen by the protocol's ``kind`` (:func:`~train.problems.make_problem`). The
loop above is the same for both; classification is described above. For
segmentation (:class:`~train.problems.SegmentationProblem`: its settings, loss
and metrics are defined there) every metric has its own matrix, written to
``matrices/<metric>.csv``; ``acc_matrix.csv`` holds the primary metric's
(``map``), ``metrics.json`` the summaries of the primary matrix plus
``per_metric`` and ``primary_metric``, and ``overlays.npz`` a few test frames of
the final model.
Semantic segmentation protocols (``kind = "semantic"``) are
:class:`~train.problems_semantic.SemanticProblem` (metrics ``miou``, ``miou_base``,
``miou_new``, ``avss_miou``; primary ``miou``).
"""
from __future__ import annotations

import copy
import csv
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from avcl_core import metrics as M
from train.features import FeatureSet
from train.heads import build_head
from train.memory import ExemplarMemory
from train.methods.base import Method

log = logging.getLogger("avcl.train")

SELECT_MODES = ("last", "val-seen")
SPLITS = ("train", "val", "test")


class TrainError(ValueError):
    """A protocol/feature-set combination the trainer cannot run; the message says why."""


class NonFiniteLoss(TrainError):
    """The loss became NaN or infinite; the message names the task and epoch and the checkpoint kept."""


AMP_MODES = ("none", "bf16")


# -- model ---------------------------------------------------------------------------
class GrowingClassifier(nn.Module):
    """Linear classifier z = W f + b over the seen classes; :meth:`grow` adds rows, keeping the old ones."""

    def __init__(self, in_dim: int, n_classes: int = 0) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.weight = nn.Parameter(torch.empty(0, in_dim))
        self.bias = nn.Parameter(torch.empty(0))
        if n_classes:
            self.grow(n_classes)

    @property
    def n_classes(self) -> int:
        return int(self.weight.shape[0])

    def grow(self, n_new: int) -> None:
        """Append ``n_new`` output units initialised like ``nn.Linear``; old rows are copied unchanged."""
        fresh = nn.Linear(self.in_dim, n_new).to(self.weight.device)
        with torch.no_grad():
            self.weight = nn.Parameter(torch.cat([self.weight.detach(), fresh.weight.detach()]))
            self.bias = nn.Parameter(torch.cat([self.bias.detach(), fresh.bias.detach()]))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(f, self.weight, self.bias)


class CILModel(nn.Module):
    """Head + growing classifier: ``forward(x) -> {'feature': (B, D), 'logits': (B, n_seen)}``."""

    def __init__(self, head: nn.Module, n_classes: int = 0, classifier: nn.Module | None = None) -> None:
        super().__init__()
        self.head = head
        # a method may bring its own classifier (same interface: n_classes, grow(n_new), forward(f) -> logits)
        self.classifier = classifier if classifier is not None else GrowingClassifier(head.out_dim, n_classes)

    def forward(self, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        f = self.head(x)
        return {"feature": f, "logits": self.classifier(f)}


@dataclass
class RunResult:
    """Outcome of one run: ``acc_matrix`` (T, T), ``step_acc`` (T,), ``metrics`` (summarize + step_acc)."""

    acc_matrix: np.ndarray
    step_acc: list[float]
    metrics: dict[str, Any]
    run_dir: str | None = None
    resumed_from: int | None = None
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


def task_seed(seed: int, task: int) -> int:
    """Seed of task ``task`` of a run with ``seed`` (independent streams per task)."""
    return int(np.random.SeedSequence([int(seed), int(task)]).generate_state(1, dtype=np.uint32)[0])


def _device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# -- trainer ---------------------------------------------------------------------------
class Trainer:
    """Runs one method with one head over every task of a protocol (see the module docstring).

    ``features``: the :class:`~train.features.FeatureSet`; ``protocol``: an
    :class:`avcl_core.protocols.Protocol` (CIL or TIL, classification);
    ``method``: a built :class:`~train.methods.base.Method`; ``head``/``head_config``:
    the head name and its options dataclass (or dict); ``select``: ``'last'`` |
    ``'val-seen'``; ``run_dir``: where to write logs, checkpoints and results
    (None: nothing is written); ``config_hash``: identity of the run, stored in
    checkpoints so that ``resume`` only continues the same run.
    """

    def __init__(
        self,
        features: FeatureSet,
        protocol,
        method: Method,
        head: str | None = None,
        head_config: Any = None,
        seed: int = 0,
        select: str = "last",
        device: str | torch.device | None = None,
        run_dir: str | os.PathLike | None = None,
        config_hash: str = "",
        eval_batch_size: int = 512,
        progress: Callable[[str], None] | None = None,
        progress_bar: bool = False,
        amp: str = "none",
    ) -> None:
        if select not in SELECT_MODES:
            raise TrainError(f"select must be one of {SELECT_MODES}, got {select!r}")
        if amp not in AMP_MODES:
            raise TrainError(f"amp must be one of {AMP_MODES}, got {amp!r}")
        # bfloat16 autocast of the training forward and loss (the backward follows it); evaluation stays float32
        self.amp = amp
        self.progress_bar = progress_bar
        self._bar = None
        self.device = _device(device)
        self.fs = features.to(self.device)
        self.protocol = protocol.bind(self.fs.manifest)
        self.method = method
        self.hp = method.hp
        self.head_name = head or method.default_head
        self.head_config = head_config
        self.seed = int(seed)
        self.select = select
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.config_hash = config_hash
        self.eval_batch_size = int(eval_batch_size)
        self.progress = progress or (lambda msg: log.info(msg))
        self.progress_label = "train"

        self.tasks = [tuple(t) for t in self.protocol.tasks]
        self.T = len(self.tasks)
        sizes = [len(t) for t in self.tasks]
        self.offsets = [0, *np.cumsum(sizes).tolist()]
        self.class_order = [c for t in self.tasks for c in t]
        from train.problems import make_problem

        self.problem = make_problem(self)
        self.problem.prepare()

        self.memory = self._new_memory()
        if method.replay in ("mixed", "paired") and not (self.protocol.memory or self.protocol.memory_per_class):
            log.warning("protocol %r has no exemplar memory: method %r trains without replay",
                        self.protocol.name, method.name)
        self.model: CILModel | None = None
        self.old_model: CILModel | None = None
        self.task = -1
        self._teacher: dict[str, torch.Tensor] | None = None
        self._teacher_pos: torch.Tensor | None = None
        self._head_streams: tuple[str, ...] = ()
        method.attach(self)

    # -- labels and splits --------------------------------------------------------------
    def _prepare_labels(self) -> None:
        fs, p = self.fs, self.protocol
        lm = p.label_map(fs.manifest)
        cid = fs.class_ids
        proto = np.full(cid.shape, -1, dtype=np.int64)
        ok = (cid >= 0) & (cid < lm.size)
        proto[ok] = lm[cid[ok]]
        out_index = np.full(p.num_classes, -1, dtype=np.int64)
        out_index[self.class_order] = np.arange(len(self.class_order))
        y = np.where(proto >= 0, out_index[np.maximum(proto, 0)], -1)
        self.y_np = y
        self.y = torch.from_numpy(y).to(self.device)
        task_of = np.searchsorted(np.asarray(self.offsets[1:]), y, side="right")
        task_of[y < 0] = -1
        self.task_of_np = task_of
        self.task_of = torch.from_numpy(task_of).to(self.device)
        self.split_idx: dict[str, list[np.ndarray]] = {}
        for split in SPLITS:
            idx = fs.indices_of_rows(p.select(fs.manifest, split))
            idx = idx[y[idx] >= 0]
            self.split_idx[split] = [np.sort(idx[task_of[idx] == t]) for t in range(self.T)]
        stores = ", ".join(s.path for s in fs.sources)
        for split in ("train", "test") + (("val",) if self.select == "val-seen" else ()):
            empty = [t for t in range(self.T) if self.split_idx[split][t].size == 0]
            if empty:
                names = [p.classes[c] for c in self.tasks[empty[0]]][:4]
                raise TrainError(
                    f"protocol {p.name!r}: task(s) {empty} have no usable {split} samples in {stores} "
                    f"(classes of task {empty[0]}: {names}...); check that the store was extracted from "
                    f"the protocol's dataset and that its manifest has a {split!r} split"
                )

    def _new_memory(self) -> ExemplarMemory:
        return ExemplarMemory(self.protocol.memory, self.hp.selection, seed=self.seed)

    # -- state the methods read -----------------------------------------------------------
    @property
    def n_old(self) -> int:
        return self.offsets[self.task]

    @property
    def n_seen(self) -> int:
        return self.offsets[self.task + 1]

    @property
    def offsets_old(self) -> list[int]:
        """Task boundaries of the old classes: ``[0, b_1, ..., n_old]``."""
        return self.offsets[: self.task + 1]

    def train_indices_of_class(self, c: int) -> np.ndarray:
        """FeatureSet indices of the training samples of output class ``c``."""
        if hasattr(self.problem, "train_indices_of_class"):  # e.g. clips with several classes
            return self.problem.train_indices_of_class(c)
        t = int(np.searchsorted(np.asarray(self.offsets[1:]), c, side="right"))
        idx = self.split_idx["train"][t]
        return idx[self.y_np[idx] == c]

    def teacher_outputs(self, idx: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """Previous model's ``feature`` (B, D) and ``logits`` (B, n_old) on FeatureSet indices ``idx``
        (and ``mask_logits`` for segmentation, computed on the fly)."""
        if self._teacher is None:
            if self.old_model is not None and not self.problem.precompute_teacher and self.method.uses_teacher:
                with torch.no_grad():
                    out = self.old_model(self.fs.batch(idx, self._head_streams))
                out["logits"] = out["logits"][:, : self.n_old]
                return out
            return None
        pos = self._teacher_pos[idx]
        return {k: v[pos] for k, v in self._teacher.items()}

    def eval_batches(self, idx: np.ndarray | torch.Tensor, model: nn.Module | None = None,
                     batch_size: int | None = None):
        """Yield (FeatureSet indices (b,) on the device, head inputs, outputs of ``model``) over ``idx`` in batches of
        ``batch_size`` (default ``eval_batch_size``), with ``model`` (default the current one) in eval mode
        and no gradients; the model's train/eval mode is restored afterwards."""
        model = self.model if model is None else model
        bs = self.eval_batch_size if batch_size is None else int(batch_size)
        was = model.training
        model.eval()
        idx_t = torch.as_tensor(idx, dtype=torch.long, device=self.device)
        try:
            for s in range(0, idx_t.numel(), bs):
                i = idx_t[s: s + bs]
                x = self.fs.batch(i, self._head_streams)
                with torch.no_grad():
                    out = model(x)
                yield i, x, out
        finally:
            model.train(was)

    @torch.no_grad()
    def _outputs(self, model: CILModel, idx: np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]:
        parts: dict[str, list[torch.Tensor]] = {"feature": [], "logits": []}
        for _, _, out in self.eval_batches(idx, model):
            for k in parts:
                parts[k].append(out[k])
        dim = model.head.out_dim
        return {k: torch.cat(v) if v else torch.zeros(0, dim if k == "feature" else model.classifier.n_classes,
                                                      device=self.device) for k, v in parts.items()}

    def features_of(self, idx: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Current model's head features (n, D) of FeatureSet indices ``idx`` (eval mode, no grad)."""
        return self._outputs(self.model, idx)["feature"]

    # -- one task ---------------------------------------------------------------------------
    def _build_model(self, n_classes: int) -> nn.Module:
        return self.problem.build_model(n_classes)

    def _build_classifier_model(self, n_classes: int) -> CILModel:
        head = build_head(self.head_name, self.fs.dims, self.head_config)
        self._head_streams = tuple(head.streams)
        return CILModel(head, n_classes, self.method.make_classifier(head, n_classes)).to(self.device)

    def _optimizer(self, params) -> tuple[torch.optim.Optimizer, Any]:
        hp = self.hp
        if hp.optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        elif hp.optimizer == "adamw":
            opt = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
        else:
            opt = torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.scheduler == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=hp.epochs)
        elif hp.scheduler == "step":
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(hp.milestones), gamma=hp.gamma)
        else:
            sched = None
        return opt, sched

    def _pools(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """(indices drawn in batches of ``batch_size``, exemplars joined to each batch)."""
        cur = self.split_idx["train"][t]
        mem = self.method.rehearsal(t, self.memory.indices())
        replay = self.method.replay
        if replay == "all":
            return np.concatenate(self.split_idx["train"][: t + 1]), mem[:0]
        if replay == "mixed":
            return np.concatenate([cur, mem]), mem[:0]
        if replay == "paired":
            return cur, mem
        return cur, mem[:0]

    def _precompute_teacher(self, idx: np.ndarray) -> None:
        """Outputs of the frozen previous model on every sample this task trains on (computed once)."""
        out = self._outputs(self.old_model, idx)
        pos = torch.full((len(self.fs),), -1, dtype=torch.long, device=self.device)
        pos[torch.as_tensor(idx, dtype=torch.long, device=self.device)] = torch.arange(len(idx), device=self.device)
        self._teacher_pos = pos
        self._teacher = {"feature": out["feature"], "logits": out["logits"][:, : self.n_old]}

    def _train_task(self, t: int, log_file) -> dict:
        self.task = t
        seed = task_seed(self.seed, t)
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        method, hp = self.method, self.hp

        if t == 0 or method.reinit_each_task or self.model is None:
            self.old_model = None
            self.model = self._build_model(self.n_seen)
        else:
            self.old_model = copy.deepcopy(self.model).eval()
            for p in self.old_model.parameters():
                p.requires_grad_(False)
            if self.n_seen > self.n_old:
                self.model.classifier.grow(self.n_seen - self.n_old)
        model = self.model
        pool, exemplars = self._pools(t)
        self._teacher = self._teacher_pos = None
        if method.uses_teacher and self.old_model is not None and self.problem.precompute_teacher:
            self._precompute_teacher(np.unique(np.concatenate([pool, exemplars])))
        method.before_task(t)
        # a method that fits the task in closed form (prototypes, analytic classifiers) skips the SGD epochs
        sgd_epochs = 0 if method.fit_task(t) else hp.epochs

        opt, sched = self._optimizer(model.parameters())
        pool_t = torch.as_tensor(pool, dtype=torch.long, device=self.device)
        ex_t = torch.as_tensor(exemplars, dtype=torch.long, device=self.device)
        n, n_ex = pool_t.numel(), ex_t.numel()
        self.fs.pin(ex_t)  # a streamed set keeps the exemplars resident: every step draws from all of them
        bs, ebs = hp.batch_size, min(hp.exemplar_batch_size, max(n_ex, 1))
        ex_order, ex_pos = None, 0
        val_idx = np.concatenate(self.split_idx["val"][: t + 1]) if self.select == "val-seen" else None
        best = (-1.0, -1, None)
        t0 = time.perf_counter()
        last_loss = math.nan
        train_acc = math.nan
        classify = self.problem.kind == "classification"  # training accuracy of clip labels
        for epoch in range(sgd_epochs):
            e0 = time.perf_counter()
            model.train()
            lr = opt.param_groups[0]["lr"]
            order = self.fs.epoch_order(pool_t, gen)
            sums: dict[str, torch.Tensor] = {}
            counts: dict[str, int] = {}
            hits = order.new_zeros(())  # correct argmax predictions of the logits on this epoch's batches
            seen = 0
            # drop_last: skip the final partial batch (as AV-CIL's loaders do), unless it is the only one
            stop = n - n % bs if hp.drop_last and n > bs else n
            for s in range(0, stop, bs):
                idx = order[s: s + bs]
                if n_ex:
                    if ex_order is None or ex_pos + ebs > n_ex:
                        ex_order, ex_pos = ex_t[torch.randperm(n_ex, generator=gen).to(self.device)], 0
                    idx = torch.cat([idx, ex_order[ex_pos: ex_pos + ebs]])
                    ex_pos += ebs
                batch = {"idx": idx, "x": self.fs.batch(idx, self._head_streams), "y": self.y[idx]}
                batch.update(self.problem.targets(idx))
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp == "bf16"):
                    out = model(batch["x"])
                    terms = method.loss(batch, out)
                    loss = sum(terms.values())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                method.after_backward()
                if hp.grad_clip > 0:
                    nn.utils.clip_grad_norm_(model.parameters(), hp.grad_clip)
                opt.step()
                for k, v in (*terms.items(), ("loss", loss)):
                    sums[k] = sums.get(k, 0.0) + v.detach()
                    counts[k] = counts.get(k, 0) + 1
                if classify:
                    hits = hits + (out["logits"].detach().argmax(1) == batch["y"]).sum()
                    seen += int(idx.numel())
            if sched is not None:
                sched.step()
            # each term's mean over the steps that had it (one host sync per term and epoch)
            entry = {"task": t, "epoch": epoch}
            entry.update({k: float(v) / counts[k] for k, v in sums.items()})
            last_loss = entry["loss"]
            if classify:
                train_acc = entry["train_acc"] = float(hits) / max(seen, 1)
            if val_idx is not None:
                method.before_eval()
                acc = self.problem.val_score(val_idx)
                entry["val_acc"] = acc
                if acc > best[0]:
                    best = (acc, epoch, {k: v.detach().clone() for k, v in model.state_dict().items()})
            entry["lr"] = lr
            entry["time"] = round(time.perf_counter() - e0, 6)
            if log_file is not None:
                log_file.write(json.dumps(entry) + "\n")
            if self._bar is not None:
                self._bar.set_postfix_str(f"task {t + 1}/{self.T} epoch {epoch + 1}/{hp.epochs} loss {last_loss:.4f}",
                                          refresh=False)
                self._bar.update(1)
            if not math.isfinite(last_loss):
                bad = ", ".join(f"{k}={entry[k]}" for k in sums if not math.isfinite(entry[k]))
                kept = (f"the last good checkpoint, {self._ckpt_path(t - 1)}, is kept" if t > 0 and self.run_dir
                        else "no task had finished, so there is no checkpoint")
                raise NonFiniteLoss(
                    f"task {t} epoch {epoch}: the training loss is not finite ({bad}); training stopped and "
                    f"{kept}. Lower the learning rate (--set lr=...) or set grad_clip, then run again "
                    "(--resume continues from the checkpoint)")
        if best[2] is not None:
            model.load_state_dict(best[2])
        self._warn_near_chance(t, train_acc)
        self._teacher = self._teacher_pos = None  # only needed while training

        # exemplars of the new classes, chosen with the final model of this task
        if (method.replay in ("mixed", "paired") and (self.protocol.memory or self.protocol.memory_per_class)
                and self.n_seen > self.n_old):
            if self.protocol.memory_per_class:
                self.memory.memory_size = self.protocol.memory_per_class * self.n_seen
            new = {c: self.train_indices_of_class(c) for c in range(self.n_old, self.n_seen)}
            fn = (lambda i: self.features_of(i).cpu().numpy()) if self.memory.selection == "herding" else None
            self.memory.update(new, features_fn=fn)
        method.after_task(t)
        return {"seconds": time.perf_counter() - t0, "loss": last_loss, "best_epoch": best[1], "train_acc": train_acc}

    NEAR_CHANCE = 1.5  # a task's last-epoch training accuracy below this multiple of chance is reported

    def _warn_near_chance(self, t: int, train_acc: float) -> None:
        """Warn when task ``t``'s last epoch classified its training batches barely above chance (1 / n_seen).

        Settings that hardly move a head (e.g. a tiny SGD learning rate with large
        batches on a small dataset) otherwise show up only as a poor accuracy matrix.
        """
        chance = 1.0 / max(self.n_seen, 1)
        if math.isfinite(train_acc) and self.n_seen > 1 and train_acc < self.NEAR_CHANCE * chance:
            log.warning(
                "task %d: training accuracy of the last epoch is %.3f, near chance (%.3f for %d classes); the head "
                "barely learnt this task: check lr, epochs and batch_size (%s, lr %g, %d epochs, batches of %d)",
                t, train_acc, chance, self.n_seen, self.hp.optimizer, self.hp.lr, self.hp.epochs, self.hp.batch_size)

    # -- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, idx: np.ndarray) -> np.ndarray:
        """Predicted output class of FeatureSet indices ``idx`` with the current model (int64 array)."""
        preds = []
        for i, x, out in self.eval_batches(idx):
            batch = {"idx": i, "x": x, "y": self.y[i]}
            scores = self.method.predict(batch, out)
            if self.protocol.setting == "TIL":
                off = torch.as_tensor(self.offsets, device=self.device)
                task = self.task_of[i]
                units = torch.arange(scores.shape[1], device=self.device)
                inside = (units[None] >= off[task][:, None]) & (units[None] < off[task + 1][:, None])
                scores = scores.masked_fill(~inside, float("-inf"))
            preds.append(scores.argmax(dim=1))
        return torch.cat(preds).cpu().numpy() if preds else np.zeros(0, dtype=np.int64)

    def evaluate(self) -> tuple[np.ndarray, float]:
        """(A[t, :] over all T tasks, step accuracy acc_t) for the current task t."""
        test = self.split_idx["test"]
        idx = np.concatenate(test)
        hit = self.predict(idx) == self.y_np[idx]
        counts = np.array([x.size for x in test])
        bounds = np.concatenate([[0], np.cumsum(counts)])
        correct = np.array([hit[bounds[i]: bounds[i + 1]].sum() for i in range(self.T)])
        row = correct / counts
        return row, M.step_accuracy(correct, counts, self.task)

    # -- checkpoints ------------------------------------------------------------------------
    def _ckpt_path(self, t: int) -> Path:
        return self.run_dir / f"ckpt_task{t}.pt"

    def _save_checkpoint(self, t: int, A: np.ndarray, step_acc: list[float]) -> None:
        state = {
            "task": t,
            "config_hash": self.config_hash,
            "head": self.head_name,
            "n_classes": self.model.classifier.n_classes,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "memory": self.memory.state_dict(),
            "method": self.method.state_dict(),
            "problem": self.problem.state_dict(),
            "acc_matrix": A[: t + 1].tolist(),
            "step_acc": list(step_acc),
            **({"matrices": {m: v[: t + 1].tolist() for m, v in self._mats.items()},
                "step_values": {m: list(v) for m, v in self._steps.items()}}
               if self.problem.kind != "classification" else {}),
            "class_order": [self.protocol.classes[c] for c in self.class_order],
        }
        path = self._ckpt_path(t)
        tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
        torch.save(state, tmp)
        tmp.replace(path)

    def _load_last_checkpoint(self) -> dict | None:
        for t in range(self.T - 1, -1, -1):
            path = self._ckpt_path(t)
            if not path.is_file():
                continue
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - a torn file is just not a usable checkpoint
                log.warning("%s: unreadable checkpoint (%s); looking for an earlier one", path, e)
                continue
            if state.get("config_hash") != self.config_hash:
                # left over from a run of another configuration in this directory (it is overwritten when
                # this run reaches that task): look further back for one of this configuration
                log.warning("%s: belongs to a different configuration; skipping it", path)
                continue
            return state
        return None

    def _restore(self, state: dict) -> None:
        self.task = int(state["task"])
        self.model = self._build_model(int(state["n_classes"]))
        self.model.load_state_dict(state["model"])
        self.memory.load_state_dict(state["memory"])
        self.method.load_state_dict(state["method"])
        self.problem.load_state_dict(state.get("problem") or {})

    # -- the run ------------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> RunResult:
        """Train every task (or the remaining ones when ``resume`` finds a checkpoint); write results."""
        T = self.T
        primary = self.problem.primary_metric
        self._mats = {m: np.full((T, T), np.nan) for m in self.problem.metrics}
        self._steps: dict[str, list[float]] = {m: [] for m in self.problem.metrics}
        A = self._mats[primary]
        step_acc: list[float] = self._steps[primary]
        start, resumed_from = 0, None
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.run_dir / "log.jsonl" if self.run_dir is not None else None
        if resume and self.run_dir is not None:
            state = self._load_last_checkpoint()
            if state is not None:
                self._restore(state)
                rows = np.asarray(state["acc_matrix"], dtype=float)
                A[: rows.shape[0]] = rows
                step_acc[:] = [float(x) for x in state["step_acc"]]
                for m, r in (state.get("matrices") or {}).items():
                    r = np.asarray(r, dtype=float)
                    self._mats[m][: r.shape[0]] = r
                for m, v in (state.get("step_values") or {}).items():
                    self._steps[m][:] = [float(x) for x in v]
                start = resumed_from = self.task + 1
                _truncate_log(log_path, self.task)
                self.progress(f"resuming after task {self.task} from {self._ckpt_path(self.task)}")
        if start == 0 and log_path is not None:
            log_path.write_text("")
        t_run = time.perf_counter()
        log_file = open(log_path, "a", buffering=1) if log_path is not None else None
        if self.progress_bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=T * self.hp.epochs, initial=start * self.hp.epochs, unit="epoch",
                             desc=self.progress_label, dynamic_ncols=True, leave=True)
        try:
            for t in range(start, T):
                info = self._train_task(t, log_file)
                rows, steps = self.problem.evaluate()
                for m in self.problem.metrics:
                    self._mats[m][t] = rows[m]
                    self._steps[m].append(steps[m])
                acc = steps[primary]
                if self.run_dir is not None:
                    self._save_checkpoint(t, A, step_acc)
                self.progress(
                    f"task {t + 1}/{T}: {self.n_seen} classes, step {'acc' if primary == 'accuracy' else primary} {acc:.3f}, "
                    f"loss {info['loss']:.4f}, {info['seconds']:.1f} s"
                )
        finally:
            if log_file is not None:
                log_file.close()
            if self._bar is not None:
                self._bar.close()
                self._bar = None
        metrics = {"step_acc": step_acc, **M.summarize(A, step_acc)}
        seconds = time.perf_counter() - t_run
        if self.run_dir is not None:
            write_acc_matrix(self.run_dir / "acc_matrix.csv", A)
            # undefined metrics (e.g. forgetting of a single task) are null: strict JSON has no NaN
            out = {k: None if isinstance(v, float) and not np.isfinite(v) else v for k, v in metrics.items()}
            out["n_test"] = [int(x.size) for x in self.split_idx["test"]]
            out["train_seconds"] = round(seconds, 3)
            if self.problem.kind != "classification":
                self._write_metric_matrices(out)
            tmp = self.run_dir / "metrics.json.tmp"
            tmp.write_text(json.dumps(out, indent=2, allow_nan=False))
            tmp.replace(self.run_dir / "metrics.json")
        extra = {"matrices": dict(self._mats)} if self.problem.kind != "classification" else {}
        return RunResult(A, step_acc, metrics, str(self.run_dir) if self.run_dir else None, resumed_from, seconds,
                         extra)

    def _write_metric_matrices(self, out: dict) -> None:
        """``matrices/<metric>.csv`` of every metric, ``per_metric`` summaries and the overlays."""
        d = self.run_dir / "matrices"
        d.mkdir(exist_ok=True)
        per = {}
        for m, mat in self._mats.items():
            write_acc_matrix(d / f"{m}.csv", mat)
            try:
                summ = M.summarize(mat, self._steps[m])
            except ValueError:  # a metric undefined at some step (e.g. new-class mIoU at the first) has none
                summ = {}
            per[m] = {k: None if isinstance(v, float) and not np.isfinite(v) else v for k, v in summ.items()}
            per[m]["step"] = [None if not np.isfinite(v) else v for v in self._steps[m]]
        out["per_metric"] = per
        out["primary_metric"] = self.problem.primary_metric
        self.problem.finish(self.run_dir)


def write_acc_matrix(path: Path, A: np.ndarray) -> None:
    """``after_task,task_0,...,task_{T-1}``; row t = A[t, :] (fractions)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["after_task"] + [f"task_{i}" for i in range(A.shape[1])])
        for t in range(A.shape[0]):
            w.writerow([t] + [repr(float(x)) for x in A[t]])


def read_acc_matrix(path: str | os.PathLike) -> np.ndarray:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return np.array([[float(x) for x in r[1:]] for r in rows[1:]])


def _truncate_log(path: Path | None, last_task: int) -> None:
    """Keep only the log lines of tasks ``<= last_task`` (an interrupted task is retrained)."""
    if path is None or not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["task"] <= last_task:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    path.write_text("".join(x + "\n" for x in keep))
