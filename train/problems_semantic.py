"""Continual *semantic* audio-visual segmentation (AVSS, synth-sem): the ``semantic`` problem.

Protocols of ``kind = "semantic"`` (``avss-60-10``, ``synth-sem-8-2``, ...) list a
class named ``background`` first in their first task; output channel ``k`` of the
model is the ``k``-th class in order of arrival, so channel 0 is background and
task ``t`` owns channels ``[offsets[t], offsets[t+1])``.

Masks. The store's ``masks`` (N, F, H, W) uint8 become *channel maps* here
(:meth:`SemanticProblem.channel_masks`): each pixel holds the channel of its class,
or :data:`IGNORE` (255). Two store formats are read:

* palette masks (``extract.masks`` format ``palette-nearest/1``, AVSS): pixel value
  ``v`` is the dataset's palette index = the manifest class id (0 background,
  1..70 the AVSS classes, 255 ignore);
* binary masks (``binary-nearest/1``, synth): the semantic mask of a single-source
  clip is ``binary x (class id + 1)``: 0 background, ``class id + 1`` on the sounding
  object. This is the synth semantic equivalent; it needs no second render or
  store, and a multi-label clip with a binary mask is refused (its class is ambiguous);
* class maps (``synth-class-map-nearest/1``, a multi-source synth render,
  ``avcl_core.synth.render(multi > 0)``): pixel value ``class id + 1`` on each
  sounding object, 0 background, as the binary case's derivation but stored, so a
  clip of two sounding objects labels each with its own class.

A palette value whose class is not in the protocol is ignored (255).

Background shift (overlapped protocols, as in MiB/PLOP/CMR): a clip belongs to
every task one of its labels belongs to. While task ``t`` trains, a clip of its
training split carries only the current classes (channels ``[n_old, n_seen)``);
pixels of past and future classes become background (0). A clip trained on that
is not in the current split (exemplar memory) keeps every class seen so far
(channels ``< n_seen``), future ones as background; so does every clip of
``joint`` (replay ``all``), the upper bound without the shift. OPEN in CMR (labels
of memory samples under background shift): this is the choice made here.

Model: the segmentation head (``atlas``, ``avs-static``) with
:data:`PIXEL_DIM` mask outputs gives a pixel embedding, and a growing per-pixel
linear classifier (:class:`train.heads.semantic.SemanticModel`) maps it to one
logit per seen channel. Loss: pixel cross-entropy over the frames with ground truth,
:data:`IGNORE` pixels left out.

Evaluation after task ``t``: the test clips of tasks ``0..t`` with labels of every
seen class (future classes are background), prediction = argmax over the
``n_seen`` channels, frames with ground truth only:

* ``miou``: dataset-level confusion-matrix IoU per class (:mod:`avcl_core.seg_metrics`)
  averaged over the seen classes including background (classes absent from ground
  truth and prediction skipped); the primary metric;
* ``miou_base`` / ``miou_new``: the same over the first task's classes (with
  background, the continual semantic segmentation convention "0-60") / over the
  classes of tasks ``1..t`` (undefined, null, after the first task);
* ``avss_miou``: AVSBench-semantic's official per-class IoU accumulated over frames
  (:func:`avss_iou_sums`), averaged over the seen classes with undefined ones as 0.

Matrix rows: ``A[t, k]`` is the metric restricted to task ``k``'s classes (0 for a
task not seen yet); ``miou_base`` keeps only column 0 and ``miou_new`` columns 1.. (the
others are NaN). The step values are the definitions above; ``semantic_steps.csv``
and ``semantic_table.md`` hold them per step (seed 003's table form: base / new / all).
"""
from __future__ import annotations

import csv
import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from avcl_core import seg_metrics as S
from avcl_core.cache import CLASS_MAP_FORMAT, PALETTE_FORMAT, open_store
from train.problems import Problem, SegmentationProblem

log = logging.getLogger("avcl.train")

SEM_METRICS = ("miou", "miou_base", "miou_new", "avss_miou")
IGNORE = 255
BACKGROUND = "background"
#: Channels of the pixel embedding the segmentation head's decoder emits for the classifier.
PIXEL_DIM = 32


def avss_iou_sums(pred, gt, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """AVSBench-semantic per-frame class IoU, summed over frames: ``(S_c, count_c)`` of
    :class:`avcl_core.seg_metrics.AVSSAccumulator` (the one definition of the AVSS metric).

    ``pred`` and ``gt`` are (N, H, W) integer label maps (N frames). For every frame
    and class ``c``: ``IoU_c = |pred = c and gt = c| / |pred = c or gt = c|`` when the
    union is not empty. Returns ``(sum over frames of IoU_c, number of frames with a
    non-empty union)``, each (num_classes,). As the reference
    (``avss/utils/compute_color_metrics.py``), ground-truth pixels outside
    ``0..num_classes-1`` (255) are not counted as any class, while the prediction
    there still counts. The official mIoU is ``mean_c(sum_c / count_c)`` with 0 for
    count 0 (:func:`avss_miou_from_sums`).
    """
    p, g = np.asarray(pred), np.asarray(gt)
    if p.shape != g.shape or p.ndim != 3:
        raise ValueError(f"avss_iou_sums: prediction {p.shape} and ground truth {g.shape} must both be (N, H, W)")
    acc = S.AVSSAccumulator(num_classes)
    acc.update(p, g)
    return acc.iou_sum, acc.count


def avss_miou_from_sums(sums: np.ndarray, counts: np.ndarray, classes=None) -> float:
    """``mean over classes of sums_c / counts_c`` with 0 where ``counts_c == 0`` (the reference's NaN -> 0)."""
    idx = np.arange(len(sums)) if classes is None else np.asarray(list(classes), dtype=np.int64)
    if idx.size == 0:
        return float("nan")
    s, c = np.asarray(sums, float)[idx], np.asarray(counts)[idx]
    return float(np.where(c > 0, s / np.maximum(c, 1), 0.0).mean())


def semantic_scores(cm: np.ndarray, sums: np.ndarray, counts: np.ndarray, offsets: list[int], t: int
                    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Rows ``A[t, :]`` and step values of :data:`SEM_METRICS` from one confusion matrix and
    AVSS sums accumulated after task ``t`` (see the module docstring for the definitions)."""
    T = len(offsets) - 1
    seen = list(range(offsets[t + 1]))
    groups = [list(range(offsets[k], offsets[k + 1])) for k in range(T)]
    miou_row = np.nan_to_num(np.array([S.mean_iou(cm, g) if k <= t else 0.0 for k, g in enumerate(groups)]))
    avss_row = np.array([avss_miou_from_sums(sums, counts, g) if k <= t else 0.0 for k, g in enumerate(groups)])
    base_row = np.full(T, np.nan)
    base_row[0] = miou_row[0]
    new_row = miou_row.copy()
    new_row[0] = np.nan
    new = list(range(offsets[1], offsets[t + 1]))
    steps = {
        "miou": S.mean_iou(cm, seen),
        "miou_base": S.mean_iou(cm, groups[0]),
        "miou_new": S.mean_iou(cm, new) if new else float("nan"),
        "avss_miou": avss_miou_from_sums(sums, counts, seen),
    }
    return {"miou": miou_row, "miou_base": base_row, "miou_new": new_row, "avss_miou": avss_row}, steps


def shift_labels(channels: torch.Tensor, current: torch.Tensor, n_old: int, n_seen: int) -> torch.Tensor:
    """Training labels under background shift.

    ``channels`` (B, ...) uint8 channel maps, ``current`` (B,) bool: clips of the
    current task keep channels ``[n_old, n_seen)``, the others ``[0, n_seen)``;
    every other channel becomes 0 (background); :data:`IGNORE` stays. Returns int64.
    """
    m = channels.long()
    lo = torch.where(current, n_old, 0).view(-1, *([1] * (m.dim() - 1)))
    keep = ((m >= lo) & (m < n_seen)) | (m == IGNORE)
    return torch.where(keep, m, torch.zeros_like(m))


class SemanticProblem(SegmentationProblem):
    """Class-incremental semantic segmentation with background shift (see the module docstring)."""

    kind = "semantic"
    primary_metric = "miou"
    metrics = SEM_METRICS
    precompute_teacher = False

    def __init__(self, trainer) -> None:
        from train.trainer import TrainError

        Problem.__init__(self, trainer)
        p = trainer.protocol
        if p.setting != "CIL":
            raise TrainError(f"protocol {p.name!r}: semantic segmentation protocols are class-incremental (CIL), "
                             f"not {p.setting!r}")
        try:
            bg = p.class_index(BACKGROUND)
        except Exception:  # noqa: BLE001 - ProtocolError: no such class
            bg = None
        if bg is None or trainer.class_order[0] != bg:
            raise TrainError(f"protocol {p.name!r}: a semantic protocol lists the class {BACKGROUND!r} first in "
                             "its first task (it is output channel 0)")
        self.setting = "CIL"
        self.use_class_head = False
        self.mask_channels = PIXEL_DIM
        self._load_masks()
        self._current_for = None
        self._current: torch.Tensor | None = None
        self.class_iou: list[list[float]] = []  # per step: IoU of every output channel (NaN: unseen / absent)

    # -- data --------------------------------------------------------------------------
    def _load_masks(self) -> None:
        super()._load_masks()
        from train.trainer import TrainError

        tr, fs = self.trainer, self.trainer.fs
        src = next(s for s in fs.sources if "visual" in s.streams)
        store = open_store(src.path, key=src.key)
        fmt = str((store.key_material.get("masks") or {}).get("format", ""))
        raw = self.masks.cpu().numpy()
        p = tr.protocol
        lm = p.label_map(fs.manifest)
        out_index = np.full(p.num_classes, IGNORE, dtype=np.int64)
        out_index[tr.class_order] = np.arange(len(tr.class_order))
        lut = np.full(256, IGNORE, dtype=np.uint8)
        if fmt == PALETTE_FORMAT:
            # palette index = manifest class id (the AVSS builder numbers classes by palette index)
            for v in range(min(255, lm.size)):
                if lm[v] >= 0:
                    lut[v] = out_index[lm[v]]
            palette = raw
        else:
            for c in range(min(254, lm.size)):
                if lm[c] >= 0:
                    lut[c + 1] = out_index[lm[c]]
        if fmt == CLASS_MAP_FORMAT:
            palette = raw  # already class id + 1 per pixel (multi-source synth render)
        elif fmt != PALETTE_FORMAT:
            labels = []
            for i, r in enumerate(fs.rows):
                lab = fs.manifest.rows[r]["label"]
                if isinstance(lab, list):
                    if len(lab) != 1:
                        raise TrainError(f"{store.path}: sample {fs.sample_ids[i]!r} has labels {lab} but a binary "
                                         "mask; its semantic mask is ambiguous (extract palette masks for it)")
                    lab = lab[0]
                labels.append(int(lab))
            labels = np.asarray(labels, dtype=np.int64)
            palette = (raw != 0) * (labels + 1).clip(0, 255).astype(np.uint8)[:, None, None, None]
        lut[0] = out_index[p.class_index(BACKGROUND)]
        lut[IGNORE] = IGNORE
        self.mask_format = fmt or "binary"
        self.masks = torch.from_numpy(lut[palette.astype(np.uint8)]).to(tr.device)

    def channel_masks(self, idx) -> np.ndarray:
        """Full ground-truth channel maps (n, F, H, W) uint8 of FeatureSet indices ``idx``."""
        return self.masks[torch.as_tensor(idx, dtype=torch.long, device=self.masks.device)].cpu().numpy()

    def prepare(self) -> None:
        from train.trainer import SPLITS, TrainError

        tr, fs, p = self.trainer, self.trainer.fs, self.trainer.protocol
        lm = p.label_map(fs.manifest)
        out_index = np.full(p.num_classes, -1, dtype=np.int64)
        out_index[tr.class_order] = np.arange(len(tr.class_order))
        bounds = np.asarray(tr.offsets[1:])
        # every output channel a clip's labels name (a clip of several sounding objects has several)
        self.clip_channels: list[np.ndarray] = []
        for r in fs.rows:
            lab = fs.manifest.rows[r]["label"]
            labs = lab if isinstance(lab, list) else [lab]
            ch = [int(out_index[lm[int(x)]]) for x in labs if 0 <= int(x) < lm.size and lm[int(x)] >= 0]
            self.clip_channels.append(np.asarray(sorted(set(ch)), dtype=np.int64))
        first = np.array([c[0] if c.size else -1 for c in self.clip_channels], dtype=np.int64)
        task_of = np.where(first >= 0, np.searchsorted(bounds, first, side="right"), -1)
        tr.split_idx = {}
        for split in SPLITS:
            tr.split_idx[split] = [np.sort(fs.indices_of_rows(p.select(fs.manifest, split, t)))
                                   for t in range(tr.T)]
        self._set_labels(first, task_of)

    def train_indices_of_class(self, c: int) -> np.ndarray:
        """Training clips of the task that introduces channel ``c`` whose labels include ``c``
        (none for background: background is not a class to remember)."""
        tr = self.trainer
        if c == 0:
            return np.zeros(0, dtype=np.int64)
        t = int(np.searchsorted(np.asarray(tr.offsets[1:]), c, side="right"))
        idx = tr.split_idx["train"][t]
        return np.asarray([i for i in idx if c in self.clip_channels[i]], dtype=np.int64)

    def current_clips(self) -> torch.Tensor:
        """(N,) bool: the clips that carry the current task's labels only (see the module docstring)."""
        tr = self.trainer
        key = (tr.task, tr.method.replay)
        if self._current_for != key:
            cur = np.zeros(len(tr.fs), dtype=bool)
            if tr.method.replay != "all" and tr.task >= 0:
                cur[tr.split_idx["train"][tr.task]] = True
            self._current = torch.from_numpy(cur).to(tr.device)
            self._current_for = key
        return self._current

    # -- model -------------------------------------------------------------------------
    def build_model(self, n_classes: int) -> nn.Module:
        from train.heads.semantic import SemanticModel

        seg = super().build_model(0)  # the segmentation head with PIXEL_DIM mask outputs
        return SemanticModel(seg.head, n_classes).to(self.trainer.device)

    # -- training ----------------------------------------------------------------------
    def targets(self, idx: torch.Tensor) -> dict:
        tr = self.trainer
        cur = self.current_clips().index_select(0, idx)
        full = self.masks.index_select(0, idx)
        return {"masks": shift_labels(full, cur, tr.n_old, tr.n_seen), "valid": self.valid.index_select(0, idx),
                "task": tr.task_of.index_select(0, idx), "current": cur}

    def frame_logits(self, batch: dict, out: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(pixel logits (n, C, H, W), labels (n, H, W) int64) of the frames with ground truth."""
        v = batch["valid"]
        return out["mask_logits"][v], batch["masks"][v]

    def loss(self, batch: dict, out: dict) -> dict[str, torch.Tensor]:
        logits, labels = self.frame_logits(batch, out)
        if logits.shape[0] == 0 or not (labels != IGNORE).any():
            return {"ce": out["mask_logits"].sum() * 0.0}
        return {"ce": F.cross_entropy(logits, labels, ignore_index=IGNORE)}

    def distill(self, batch: dict, out: dict, old: dict, T: float = 2.0) -> torch.Tensor:
        """LwF for pixels: ``T^2 KL(softmax(z_old / T) || softmax(z[:n_old] / T))`` per pixel of the
        frames with ground truth, averaged over pixels."""
        n_old = old["mask_logits"].shape[2]
        v = batch["valid"]
        new = out["mask_logits"][v][:, :n_old]
        ref = old["mask_logits"][v]
        if new.shape[0] == 0:
            return new.sum() * 0.0
        kl = F.kl_div(F.log_softmax(new / T, 1), F.log_softmax(ref / T, 1), log_target=True, reduction="none")
        return kl.sum(1).mean() * T * T

    # -- evaluation --------------------------------------------------------------------
    @torch.no_grad()
    def predictions(self, idx: np.ndarray, batch_size: int = 8, model: nn.Module | None = None):
        """Yield (FeatureSet indices (b,), predicted channel maps (b, F, H, W) int64 numpy)."""
        for i, _, out in self.trainer.eval_batches(idx, model, batch_size):
            yield i.cpu().numpy(), out["mask_logits"].argmax(2).cpu().numpy()

    def accumulate(self, idx: np.ndarray, n_seen: int, n_total: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(confusion matrix (C, C), AVSS IoU sums (C,), counts (C,)) over the frames with ground truth
        of clips ``idx``; labels of channels ``>= n_seen`` count as background; ``C = n_total``."""
        cm = np.zeros((n_total, n_total), dtype=np.int64)
        sums, counts = np.zeros(n_total), np.zeros(n_total, dtype=np.int64)
        for ii, pred in self.predictions(idx):
            gt = self.channel_masks(ii).astype(np.int64)
            gt = np.where((gt >= n_seen) & (gt != IGNORE), 0, gt)
            v = self.valid_np[ii]
            if not v.any():
                continue
            p, g = pred[v], gt[v]
            cm += S.confusion_matrix(p, g, n_total, ignore_index=IGNORE)
            s, c = avss_iou_sums(p, g, n_total)
            sums += s
            counts += c
        return cm, sums, counts

    def evaluate(self) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        tr = self.trainer
        idx = np.unique(np.concatenate(tr.split_idx["test"][: tr.task + 1]))
        cm, sums, counts = self.accumulate(idx, tr.n_seen, tr.offsets[-1])
        self.last_confusion = cm
        del self.class_iou[tr.task:]
        self.class_iou.append([float(x) for x in S.iou_per_class(cm)])
        return semantic_scores(cm, sums, counts, tr.offsets, tr.task)

    def val_score(self, idx: np.ndarray) -> float:
        tr = self.trainer
        cm, _, _ = self.accumulate(idx, tr.n_seen, tr.offsets[-1])
        v = S.mean_iou(cm, range(tr.n_seen))
        return v if np.isfinite(v) else 0.0

    def channel_names(self) -> list[str]:
        """The protocol's class name of each output channel (channel 0: background)."""
        tr = self.trainer
        return [tr.protocol.classes[c] for c in tr.class_order]

    def state_dict(self) -> dict:
        return {"class_iou": [list(r) for r in self.class_iou]}

    def load_state_dict(self, state: dict) -> None:
        self.class_iou = [[float(x) for x in r] for r in state.get("class_iou", [])]

    def finish(self, run_dir) -> None:
        """``semantic_steps.csv`` and ``semantic_table.md``: per step the seen classes and mIoU base / new / all;
        ``semantic_class_iou.csv``: the IoU of each class after each step (empty before it is seen), the
        table that shows which old class a step made the model forget."""
        tr = self.trainer
        steps = tr._steps
        names = self.channel_names()
        base = f"{0}-{tr.offsets[1] - 1}"
        rows = []
        for t in range(len(steps["miou"])):
            new = f"{tr.offsets[1]}-{tr.offsets[t + 1] - 1}" if t else "-"
            rows.append([t, tr.offsets[t + 1], base, new] + [steps[m][t] for m in ("miou_base", "miou_new", "miou",
                                                                                   "avss_miou")])
        with open(run_dir / "semantic_steps.csv", "w", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(["step", "n_seen", "base_channels", "new_channels", "miou_base", "miou_new", "miou_all",
                        "avss_miou"])
            for r in rows:
                w.writerow(r[:4] + [repr(float(x)) for x in r[4:]])

        def pct(x):
            return "-" if not np.isfinite(x) else f"{100 * x:.1f}"

        lines = [f"mIoU (%) per step; base = channels {base} ({names[0]} .. {names[tr.offsets[1] - 1]}), "
                 "background included in base and all", "",
                 "| step | classes | base | new | all | AVSS official |", "|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r[0]} | {r[1]} | {pct(r[4])} | {pct(r[5])} | {pct(r[6])} | {pct(r[7])} |")
        (run_dir / "semantic_table.md").write_text("\n".join(lines) + "\n")
        self._write_class_iou(run_dir / "semantic_class_iou.csv", names)

    def _write_class_iou(self, path, names: list[str]) -> None:
        """``channel,class,step_0,...``: IoU of each channel after each step; empty where the class is not
        seen yet or neither predicted nor present in the test frames."""
        tr = self.trainer
        with open(path, "w", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(["channel", "class"] + [f"step_{t}" for t in range(len(self.class_iou))])
            for c, name in enumerate(names):
                vals = ["" if c >= tr.offsets[t + 1] or not np.isfinite(r[c]) else repr(r[c])
                        for t, r in enumerate(self.class_iou)]
                w.writerow([c, name] + vals)
