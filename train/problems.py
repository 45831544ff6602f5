"""What the shared :class:`~train.trainer.Trainer` trains: classification or segmentation.

The trainer owns the task loop, memory, teacher, optimiser, checkpoints, resume,
model selection and logs; a :class:`Problem` owns what differs between the two
problems, through a small interface:

* ``prepare()``: labels, the task of every sample, the per-task split indices;
* ``build_model(n_classes)``: the model, ``forward(x) -> {'feature', 'logits', ...}``;
* ``targets(idx)``: what a training batch carries besides ``x`` and ``y``;
* ``loss(batch, out)``: the default training loss terms (methods add theirs);
* ``evaluate()``: one row ``A[t, :]`` per metric and the step value of each;
* ``val_score(idx)``: the model-selection score on validation samples.

:class:`ClassificationProblem` is the trainer's original behaviour, unchanged.
:class:`SegmentationProblem` is described in its docstring.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from avcl_core import seg_metrics as S
from avcl_core.cache import CLASS_MAP_FORMAT, open_store

if TYPE_CHECKING:  # pragma: no cover
    from train.trainer import Trainer

log = logging.getLogger("avcl.train")

SEG_METRICS = ("map", "maxf1", "fscore", "miou", "dice")
#: Weight of the class-head cross-entropy in CIL segmentation (CL-AVS: lambda_cls = 0.5).
LAMBDA_CLS = 0.5
OVERLAY_FRAMES = 4


class Problem:
    kind = "classification"
    primary_metric = "accuracy"
    metrics: tuple[str, ...] = ("accuracy",)
    #: the teacher's outputs are computed once per task on every training sample (False: per batch)
    precompute_teacher = True

    def __init__(self, trainer: "Trainer") -> None:
        self.trainer = trainer

    def prepare(self) -> None:
        self.trainer._prepare_labels()

    def build_model(self, n_classes: int) -> nn.Module:
        return self.trainer._build_classifier_model(n_classes)

    def targets(self, idx: torch.Tensor) -> dict:
        return {}

    def loss(self, batch: dict, out: dict) -> dict[str, torch.Tensor]:
        return {"ce": F.cross_entropy(out["logits"], batch["y"])}

    def evaluate(self) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        row, acc = self.trainer.evaluate()
        return {"accuracy": row}, {"accuracy": acc}

    def val_score(self, idx: np.ndarray) -> float:
        tr = self.trainer
        return float((tr.predict(idx) == tr.y_np[idx]).mean())

    def finish(self, run_dir) -> None:
        """Write problem-specific files at the end of a run."""

    def state_dict(self) -> dict:
        """What the problem accumulates over the steps and a resumed run needs back (checkpointed)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (a resumed run)."""


class ClassificationProblem(Problem):
    """Class-incremental (CIL) and task-incremental (TIL) classification: the trainer's own code."""

    def __init__(self, trainer: "Trainer") -> None:
        super().__init__(trainer)
        p = trainer.protocol
        from train.trainer import TrainError

        if p.setting not in ("CIL", "TIL"):
            raise TrainError(f"protocol {p.name!r} has setting {p.setting!r}; "
                             "the classification trainer supports CIL and TIL")
        if getattr(trainer.method, "segmentation_only", False):
            raise TrainError(f"method {trainer.method.name!r} trains segmentation protocols; "
                             f"{p.name!r} is a classification protocol")


class SegmentationProblem(Problem):
    """Binary audio-visual segmentation (AVSBench S4 / MS3, synth) in four settings.

    Data: the visual stream holds dense tokens (F frames x P grid tokens), the
    store that provides it also holds ``masks`` (N, F, H, W) and ``mask_valid``
    (N, F) (:mod:`extract.masks`); both are loaded here, kept uint8 on the device.

    Tasks (the CL-AVS paper leaves TIL and DIL open; these are this project's definitions):

    * ``CIL``: task ``t`` brings the clips of its classes; the model also has the
      class head (growing classifier over the seen classes on the pooled fused
      feature) trained with ``lambda_cls`` x cross-entropy; the task is not known at test.
    * ``TIL``: the same task cut; the mask decoder has one output channel per task
      and the task id selects it, in training (a clip trains its own task's
      channel) and at test. No class head.
    * ``DIL``: the same class groups arrive as domains of one binary task (one mask
      channel, no class labels used): only the input distribution shifts.
    * ``task-free``: the training stream of the protocol (sorted ids, permuted by its
      seed, cut into T chunks; :meth:`avcl_core.protocols.Protocol.stream_chunks`);
      val/test clips are cut the same way into T chunks so that ``A[t, k]`` exists
      (per-chunk test sets are OPEN in the paper); the step value after chunk ``t``
      is the metric over the test chunks ``0..t``; with evaluation after every
      chunk this is anytime inference. One mask channel, no class head.

    Loss: ``L = mean over the valid frames of [BCE(m̂, m) + Dice(m̂, m)]`` (CL-AVS
    Eq. 7, weights 1:1; soft Dice ``1 - (2 sum p g + 1) / (sum p + sum g + 1)`` per
    frame, the +1 smoothing keeps empty masks defined) ``+ lambda_cls CE`` in CIL.

    Metrics after every task, per task ``k`` over its test clips and only frames
    with ground truth (a row per metric, ``matrices/<metric>.csv``):

    * ``map``: pixel mAP (per-frame AP, frames with an empty mask skipped, averaged
      over frames; :class:`avcl_core.seg_metrics.PixelAPAccumulator`), the primary metric;
    * ``maxf1``: Max-F with beta = 1 (CL-AVS Eq. 12), pooled as AVSBench pools its
      F-measure (the paper leaves the pooling open): per video the maximum over 255
      thresholds of the F1 curve averaged over its frames, averaged over videos; a
      video without foreground counts 0;
    * ``fscore``: AVSBench F-measure (beta^2 = 0.3) per video (a clip = a test batch
      of the reference), averaged over videos; a video without foreground counts 0;
    * ``miou``: AVSBench mask IoU per video (frame mean), averaged over videos;
    * ``dice``: per-frame Dice at ``sigmoid > 0.5``, averaged over frames.

    The step value of each metric after task ``t`` pools the test clips of tasks
    ``0..t`` the same way (frames or videos).
    """

    kind = "segmentation"
    primary_metric = "map"
    metrics = SEG_METRICS
    precompute_teacher = False  # dense mask logits of every training clip would not fit: computed per batch

    def __init__(self, trainer: "Trainer") -> None:
        super().__init__(trainer)
        self.setting = trainer.protocol.setting
        self.use_class_head = self.setting == "CIL"
        self.mask_channels = trainer.T if self.setting == "TIL" else 1
        self._load_masks()

    # -- data ---------------------------------------------------------------------------
    def _load_masks(self) -> None:
        from train.trainer import TrainError

        tr, fs = self.trainer, self.trainer.fs
        src = next((s for s in fs.sources if "visual" in s.streams), None)
        if src is None:
            raise TrainError("segmentation needs a visual stream of dense tokens (e.g. --stream visual=visual_dense)")
        store = open_store(src.path, key=src.key)
        shape = store.streams[src.streams["visual"]]
        if len(shape) != 3:
            raise TrainError(
                f"{store.path}: stream {src.streams['visual']!r} has per-clip shape {shape}; segmentation needs "
                "dense tokens (frames, grid tokens, channels), e.g. --stream visual=visual_dense")
        frames, tokens, _ = shape
        side = int(round(tokens ** 0.5))
        if side * side != tokens:
            raise TrainError(f"{store.path}: {tokens} tokens per frame are not a square grid")
        if "masks" not in store.extras:
            raise TrainError(f"{store.path}: no ground-truth masks in this store; extract a segmentation dataset "
                             "(avsbench-s4, avsbench-ms3, synth) with a frame encoder to store them")
        rows = store.rows_for(fs.sample_ids)
        masks = store.read("masks")[rows]
        valid = store.read("mask_valid")[rows]
        if masks.shape[1] != frames:
            raise TrainError(f"{store.path}: masks have {masks.shape[1]} frames, the visual stream {frames}")
        if self.kind == "segmentation" and (store.key_material.get("masks") or {}).get("format") == CLASS_MAP_FORMAT:
            masks = (masks != 0).astype(np.uint8)  # a multi-source synth render: every sounding object
        self.masks_np = np.ascontiguousarray(masks)  # host copy for the metrics (shares memory on CPU)
        self.masks = torch.from_numpy(self.masks_np).to(tr.device)
        self.valid = torch.from_numpy(np.ascontiguousarray(valid) != 0).to(tr.device)
        self.valid_np = np.asarray(valid) != 0
        self.frames, self.grid = frames, (side, side)
        self.mask_size = tuple(int(x) for x in masks.shape[-2:])

    def prepare(self) -> None:
        from train.trainer import SPLITS, TrainError

        tr, fs, p = self.trainer, self.trainer.fs, self.trainer.protocol
        lm = p.label_map(fs.manifest)
        cid = fs.class_ids
        proto = np.full(cid.shape, -1, dtype=np.int64)
        ok = (cid >= 0) & (cid < lm.size)
        proto[ok] = lm[cid[ok]]
        if self.setting in ("CIL", "TIL", "DIL"):
            task_of_class = np.full(p.num_classes, -1, dtype=np.int64)
            for t, members in enumerate(tr.tasks):
                for c in members:
                    if task_of_class[c] < 0:
                        task_of_class[c] = t
            task_of = np.where(proto >= 0, task_of_class[np.maximum(proto, 0)], -1)
        else:
            task_of = np.full(len(fs), -1, dtype=np.int64)
        if self.use_class_head:
            out_index = np.full(p.num_classes, -1, dtype=np.int64)
            out_index[tr.class_order] = np.arange(len(tr.class_order))
            y = np.where(proto >= 0, out_index[np.maximum(proto, 0)], -1)
        else:
            # no class head: no output units (offsets stay 0), labels unused
            tr.offsets = [0] * (tr.T + 1)
            y = np.where(proto >= 0, 0, -1)
        tr.split_idx = {}
        for split in SPLITS:
            idx = fs.indices_of_rows(p.select(fs.manifest, split))
            idx = idx[proto[idx] >= 0]
            if self.setting == "task-free":
                if split == "train":
                    chunk = p.stream_chunks(fs.manifest)[fs.rows[idx]]
                    parts = [np.sort(idx[chunk == t]) for t in range(tr.T)]
                else:
                    parts = self._chunk(idx, p.seed)
                for t, part in enumerate(parts):
                    task_of[part] = t
            else:
                parts = [np.sort(idx[task_of[idx] == t]) for t in range(tr.T)]
            tr.split_idx[split] = parts
        self._set_labels(y, task_of)

    def _set_labels(self, y: np.ndarray, task_of: np.ndarray) -> None:
        """Put the clip labels and tasks on the trainer (``split_idx`` already cut), then check that
        every task has usable train/test (and val) clips and test clips with ground truth."""
        from train.trainer import TrainError

        tr, p = self.trainer, self.trainer.protocol
        tr.y_np = y
        tr.y = torch.from_numpy(y).to(tr.device)
        tr.task_of_np = task_of
        tr.task_of = torch.from_numpy(task_of).to(tr.device)
        stores = ", ".join(s.path for s in tr.fs.sources)
        for split in ("train", "test") + (("val",) if tr.select == "val-seen" else ()):
            empty = [t for t in range(tr.T) if tr.split_idx[split][t].size == 0]
            if empty:
                raise TrainError(f"protocol {p.name!r}: task(s) {empty} have no usable {split} samples in {stores}; "
                                 f"check that the store was extracted from the protocol's dataset")
        no_gt = [t for t in range(tr.T) if not self.valid_np[tr.split_idx["test"][t]].any()]
        if no_gt:
            raise TrainError(f"protocol {p.name!r}: the test clips of task(s) {no_gt} have no ground-truth mask")

    def _chunk(self, idx: np.ndarray, seed) -> list[np.ndarray]:
        """Val/test clips of a task-free protocol cut into T chunks (sorted ids, permuted by the seed)."""
        tr = self.trainer
        ids = np.asarray(tr.fs.sample_ids, dtype=object)
        order = idx[np.argsort(ids[idx].astype(str), kind="stable")]
        order = order[np.random.default_rng(seed).permutation(order.size)]
        return [np.sort(part) for part in np.array_split(order, tr.T)]

    # -- model ----------------------------------------------------------------------------
    def build_model(self, n_classes: int) -> nn.Module:
        from train.heads.base import head_class, head_config
        from train.heads.seg import SegGeometry
        from train.trainer import TrainError

        tr = self.trainer
        cls = head_class(tr.head_name)
        if not getattr(cls, "segmentation", False):
            raise TrainError(f"head {tr.head_name!r} is a classification head; segmentation protocols need a "
                             "segmentation head (atlas, avs-static)")
        cfg = tr.head_config if isinstance(tr.head_config, cls.Config) else head_config(tr.head_name, tr.head_config)
        geom = SegGeometry(self.frames, self.grid, self.mask_size, self.mask_channels)
        head = cls(tr.fs.dims, cfg, geom)
        tr._head_streams = tuple(head.streams)
        return SegModel(head, n_classes).to(tr.device)

    # -- training -------------------------------------------------------------------------
    def targets(self, idx: torch.Tensor) -> dict:
        return {"masks": self.masks.index_select(0, idx), "valid": self.valid.index_select(0, idx),
                "task": self.trainer.task_of.index_select(0, idx)}

    def select_channel(self, mask_logits: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        """(B, F, K, H, W) -> (B, F, H, W): the task's channel in TIL, else the only one."""
        if mask_logits.shape[2] == 1:
            return mask_logits[:, :, 0]
        ch = task.clamp(min=0).view(-1, 1, 1, 1, 1).expand(-1, mask_logits.shape[1], 1, *mask_logits.shape[3:])
        return mask_logits.gather(2, ch).squeeze(2)

    def frame_logits(self, batch: dict, out: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, masks) of the frames with ground truth: (n, H, W) each."""
        logits = self.select_channel(out["mask_logits"], batch["task"])
        v = batch["valid"]
        return logits[v], batch["masks"][v]

    def seg_loss(self, logits: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
        """BCE + soft Dice, each averaged over frames (see the class docstring)."""
        if logits.shape[0] == 0:
            z = logits.sum() * 0.0
            return {"bce": z, "dice": z}
        g = masks.to(logits.dtype)
        bce = F.binary_cross_entropy_with_logits(logits, g)
        p = torch.sigmoid(logits).flatten(1)
        g = g.flatten(1)
        dice = 1 - (2 * (p * g).sum(1) + 1) / (p.sum(1) + g.sum(1) + 1)
        return {"bce": bce, "dice": dice.mean()}

    def loss(self, batch: dict, out: dict) -> dict[str, torch.Tensor]:
        terms = self.seg_loss(*self.frame_logits(batch, out))
        if self.use_class_head and out["logits"].shape[1] > 0:
            lam = float(getattr(self.trainer.hp, "lambda_cls", LAMBDA_CLS))
            if lam:
                terms["cls"] = lam * F.cross_entropy(out["logits"], batch["y"])
        return terms

    def distill(self, batch: dict, out: dict, old: dict) -> torch.Tensor:
        """Mask distillation (LwF for masks): BCE of the new mask logits against the old
        model's probabilities on every frame, plus, with a class head, KD on the old classes."""
        new = self.select_channel(out["mask_logits"], batch["task"])
        ref = self.select_channel(old["mask_logits"], batch["task"])
        kd = F.binary_cross_entropy_with_logits(new, torch.sigmoid(ref))
        if self.use_class_head and old["logits"].shape[1] > 0:
            from train.methods import losses

            kd = kd + losses.kd_kl(out["logits"][:, : old["logits"].shape[1]], old["logits"], 2.0)
        return kd

    # -- evaluation ------------------------------------------------------------------------
    @torch.no_grad()
    def probabilities(self, idx: np.ndarray, batch_size: int = 16):
        """Yield (FeatureSet indices (b,), probabilities float32 (b, F, H, W) numpy) of the current model."""
        tr = self.trainer
        for i, _, out in tr.eval_batches(idx, batch_size=batch_size):
            prob = torch.sigmoid(self.select_channel(out["mask_logits"], tr.task_of.index_select(0, i)))
            yield i.cpu().numpy(), prob.float().cpu().numpy()

    def _task_sums(self, idx: np.ndarray) -> dict:
        """Pooled sums of every metric over the clips ``idx``."""
        ap, dice = S.PixelAPAccumulator(), S.DiceAccumulator()
        video_f, video_f1, video_iou = [], [], []
        masks = self.masks_np
        for ii, prob in self.probabilities(idx):
            for j, i in enumerate(ii):
                v = self.valid_np[i]
                if not v.any():
                    continue
                p, g = prob[j][v], masks[i][v]
                ap.update(p, g, from_logits=False)
                dice.update(p, g, from_logits=False)
                video_f.append(_video_fscore(p, g, 0.3))
                video_f1.append(_video_fscore(p, g, 1.0))
                video_iou.append(S.avsbench_miou(p, g, from_logits=False))
        # (sum, count) pairs, so that tasks pool: the accumulators' means times their frame counts
        return {
            "map": (ap.compute() * ap.frames if ap.frames else 0.0, ap.frames),
            "maxf1": (float(np.sum(video_f1)), len(video_f1)),
            "fscore": (float(np.sum(video_f)), len(video_f)), "miou": (float(np.sum(video_iou)), len(video_iou)),
            "dice": (dice.compute()["mean"] * dice.frames if dice.frames else 0.0, dice.frames),
        }

    @staticmethod
    def _value(metric: str, total, count) -> float:
        return float(total / count) if count else float("nan")

    def evaluate(self) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        tr = self.trainer
        sums = [self._task_sums(idx) for idx in tr.split_idx["test"]]
        rows = {m: np.array([self._value(m, *s[m]) for s in sums]) for m in self.metrics}
        seen = sums[: tr.task + 1]
        step = {}
        for m in self.metrics:
            step[m] = self._value(m, sum(s[m][0] for s in seen), sum(s[m][1] for s in seen))
        return rows, step

    def val_score(self, idx: np.ndarray) -> float:
        """Pixel mAP over the validation clips ``idx`` (0 without any foreground frame)."""
        total, count = self._task_sums(idx)["map"]
        return float(total / count) if count else 0.0

    # -- overlays ---------------------------------------------------------------------------
    def overlay_frames(self) -> tuple[np.ndarray, np.ndarray]:
        """(FeatureSet indices, frame numbers) of :data:`OVERLAY_FRAMES` test frames: the test
        clips in sorted sample-id order, the first frame with ground truth of each."""
        tr = self.trainer
        test = np.unique(np.concatenate(tr.split_idx["test"]))
        test = test[np.argsort(np.asarray(tr.fs.sample_ids, dtype=object)[test].astype(str), kind="stable")]
        idx, frames = [], []
        for i in test:
            v = np.flatnonzero(self.valid_np[i])
            if v.size:
                idx.append(int(i))
                frames.append(int(v[0]))
            if len(idx) == OVERLAY_FRAMES:
                break
        return np.asarray(idx, dtype=np.int64), np.asarray(frames, dtype=np.int64)

    def finish(self, run_dir) -> None:
        """``overlays.npz``: sample_id (K,), frame (K,), prob (K, H, W) float16 of the final model, gt (K, H, W) uint8."""
        idx, frames = self.overlay_frames()
        probs = np.concatenate([p for _, p in self.probabilities(idx)]) if idx.size else \
            np.zeros((0, self.frames, *self.mask_size), np.float32)
        masks = self.masks_np
        k = np.arange(idx.size)
        tmp = run_dir / "overlays.tmp.npz"
        np.savez_compressed(
            tmp, sample_id=np.asarray([self.trainer.fs.sample_ids[i] for i in idx], dtype=str),
            frame=frames, prob=probs[k, frames].astype(np.float16), gt=masks[idx, frames].astype(np.uint8))
        tmp.replace(run_dir / "overlays.npz")


def _video_fscore(prob: np.ndarray, gt: np.ndarray, beta2: float) -> float:
    """AVSBench F-measure (``beta2``) of one video, its frames given as one test batch of the
    reference; 0 without foreground."""
    f = S.avsbench_fscore(prob, gt, from_logits=False, beta2=beta2)
    return 0.0 if not np.isfinite(f) else f


class SegModel(nn.Module):
    """Segmentation head + growing class head: ``forward(x) -> {'feature' (B, D), 'logits' (B, n_seen),
    'mask_logits' (B, F, K, H, W)}``."""

    def __init__(self, head: nn.Module, n_classes: int = 0) -> None:
        super().__init__()
        from train.trainer import GrowingClassifier

        self.head = head
        self.classifier = GrowingClassifier(head.out_dim, n_classes)

    def forward(self, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = self.head(x)
        return {"feature": out["feature"], "logits": self.classifier(out["feature"]), "mask_logits": out["mask_logits"]}


def make_problem(trainer: "Trainer") -> Problem:
    """The problem of the trainer's protocol (its ``kind``)."""
    if trainer.protocol.kind == "segmentation":
        return SegmentationProblem(trainer)
    if trainer.protocol.kind == "semantic":
        from train.problems_semantic import SemanticProblem

        return SemanticProblem(trainer)
    return ClassificationProblem(trainer)
