"""Segmentation metrics of record: AVSBench mIoU and F-score, confusion-matrix mIoU.

* AVSBench (S4 / MS3, binary masks): a pixel is predicted foreground when
  ``sigmoid(logit) > 0.5``; :func:`avsbench_miou` averages a per-frame IoU in
  which a frame with an empty ground truth scores the fraction of its pixels
  predicted background. :func:`avsbench_fscore` is the max over 255 thresholds
  of the F-measure curve (beta^2 = 0.3) averaged over frames with a non-empty
  ground truth. The published reference averages the curve per test batch, so
  its number depends on the batch size; here the curve is averaged over the
  whole set (:class:`FScoreAccumulator` accumulates batches to the same result).
* Continual semantic segmentation: a dataset-level confusion matrix
  (:func:`confusion_matrix`), per-class IoU = diag / (row + col - diag) and
  mIoU over all / base / new classes.

Arrays are numpy (CPU torch tensors convert through ``np.asarray``). No
function modifies its inputs.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
from scipy.special import expit

__all__ = [
    "FScoreAccumulator",
    "avsbench_fscore",
    "avsbench_frame_iou",
    "avsbench_miou",
    "confusion_matrix",
    "iou_per_class",
    "mean_iou",
    "miou_all_base_new",
]


def _frames(logits, masks, what: str) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(logits)
    y = np.asarray(masks)
    if x.ndim == 2:
        x, y = x[None], y[None]
    if x.ndim != 3 or x.shape != y.shape:
        raise ValueError(
            f"{what}: predictions and masks must both be (N, H, W) (or one (H, W) frame); "
            f"got {x.shape} and {y.shape}"
        )
    if not np.all(np.isfinite(x)):
        frame = int(np.argwhere(~np.isfinite(x))[0, 0])
        raise ValueError(f"{what}: prediction of frame {frame} contains non-finite values")
    return x, y


def _probabilities(x: np.ndarray, from_logits: bool) -> np.ndarray:
    # expit keeps float32 inputs in float32, as the reference's torch.sigmoid does,
    # so the strict "> 0.5" decision agrees with it at the boundary
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float64)
    return expit(x) if from_logits else x


# -- AVSBench mIoU ------------------------------------------------------------------
def avsbench_frame_iou(logits, masks, from_logits: bool = True, eps: float = 1e-7) -> np.ndarray:
    """Per-frame IoU of AVSBench, shape ``(N,)``.

    ``logits`` (N, H, W): foreground when ``sigmoid(logit) > 0.5`` (or
    ``prob > 0.5`` with ``from_logits=False``). ``masks`` (N, H, W): nonzero =
    foreground. For a frame with foreground in the mask,
    ``IoU = |P ∩ G| / (|P ∪ G| + eps)``; for an empty mask,
    ``IoU = |not P| / (H * W + eps)``, the fraction of pixels predicted background.
    """
    x, y = _frames(logits, masks, "avsbench_frame_iou")
    pred = _probabilities(x, from_logits) > 0.5
    gt = y != 0
    inter = np.sum(pred & gt, axis=(1, 2)).astype(np.float64)
    union = np.sum(pred | gt, axis=(1, 2)).astype(np.float64)
    empty = ~gt.any(axis=(1, 2))
    inter[empty] = np.sum(~pred[empty], axis=(1, 2))
    union[empty] = pred.shape[1] * pred.shape[2]
    return inter / (union + eps)


def avsbench_miou(logits, masks, from_logits: bool = True, eps: float = 1e-7) -> float:
    """AVSBench mIoU: mean of :func:`avsbench_frame_iou` over all frames."""
    return float(avsbench_frame_iou(logits, masks, from_logits, eps).mean())


# -- AVSBench F-score ---------------------------------------------------------------
class FScoreAccumulator:
    """Accumulates the AVSBench F-measure curve over batches of frames.

    Thresholds ``th_k = k * (1 - 1e-10) / (K - 1)``, ``k = 0 .. K-1`` (K = 255),
    all in ``[0, 1)`` (compared in the prediction's dtype, as the reference
    does in float32). For each frame with a non-empty mask and each threshold:
    ``P = tp / (pp + 1e-20)``, ``R = tp / (gp + 1e-20)`` with ``pp`` the pixels
    where ``prob >= th``, ``gp`` the foreground pixels and ``tp`` their
    overlap; ``F = (1 + b2) P R / (b2 P + R)`` (0 where undefined), b2 = 0.3.
    :meth:`compute` returns ``max_k mean_frames F(th_k)``; NaN when no frame
    had foreground. The result does not depend on how frames are batched.
    """

    def __init__(self, num_thresholds: int = 255, beta2: float = 0.3) -> None:
        if num_thresholds < 2:
            raise ValueError(f"need at least 2 thresholds, got {num_thresholds}")
        self.thresholds = np.linspace(0.0, 1.0 - 1e-10, num_thresholds)
        self.beta2 = float(beta2)
        self._sum = np.zeros(num_thresholds)
        self.frames = 0  # frames counted (non-empty masks)
        self.skipped = 0  # frames skipped for an empty mask

    def update(self, logits, masks, from_logits: bool = True) -> None:
        """Add a batch: ``logits`` (N, H, W) (probabilities with ``from_logits=False``),
        ``masks`` (N, H, W), nonzero = foreground."""
        x, y = _frames(logits, masks, "FScoreAccumulator.update")
        prob = _probabilities(x, from_logits).reshape(x.shape[0], -1)
        gt = (y != 0).reshape(y.shape[0], -1)
        b2 = self.beta2
        for p, g in zip(prob, gt):
            gp = g.sum()
            if gp == 0:
                self.skipped += 1
                continue
            order = np.argsort(p, kind="stable")
            p_sorted = p[order]
            # pixels with prob >= th are those from searchsorted(th, 'left') to the end
            start = np.searchsorted(p_sorted, self.thresholds.astype(p_sorted.dtype), side="left")
            pp = p.size - start
            gt_from_end = np.concatenate([np.cumsum(g[order][::-1])[::-1], [0]])
            tp = gt_from_end[start].astype(np.float64)
            prec = tp / (pp + 1e-20)
            rec = tp / (gp + 1e-20)
            with np.errstate(invalid="ignore", divide="ignore"):
                f = (1 + b2) * prec * rec / (b2 * prec + rec)
            self._sum += np.nan_to_num(f, nan=0.0)
            self.frames += 1

    def curve(self) -> np.ndarray:
        """Mean F-measure per threshold over the counted frames, shape ``(K,)``."""
        if self.frames == 0:
            return np.full_like(self._sum, np.nan)
        return self._sum / self.frames

    def compute(self) -> float:
        """Max-F: the maximum of :meth:`curve` over thresholds (NaN without foreground frames)."""
        return float(np.max(self.curve())) if self.frames else float("nan")


def avsbench_fscore(
    logits, masks, from_logits: bool = True, num_thresholds: int = 255, beta2: float = 0.3
) -> float:
    """AVSBench F-score over the whole set of frames given (see :class:`FScoreAccumulator`)."""
    acc = FScoreAccumulator(num_thresholds, beta2)
    acc.update(logits, masks, from_logits)
    return acc.compute()


# -- confusion-matrix mIoU ------------------------------------------------------------
def confusion_matrix(pred, target, num_classes: int, ignore_index: int | None = 255) -> np.ndarray:
    """Dataset-level confusion matrix ``cm[g, p]`` = pixels of true class ``g`` predicted ``p``.

    ``pred`` and ``target`` are integer label maps of equal shape; pixels whose
    target is ``ignore_index`` are not counted. Returns ``(C, C)`` int64; sum the
    matrices of batches to get the dataset's.
    """
    p = np.asarray(pred)
    t = np.asarray(target)
    if p.shape != t.shape:
        raise ValueError(f"confusion_matrix: prediction shape {p.shape} differs from target shape {t.shape}")
    p, t = p.ravel().astype(np.int64), t.ravel().astype(np.int64)
    if ignore_index is not None:
        keep = t != ignore_index
        p, t = p[keep], t[keep]
    for name, a in (("target", t), ("prediction", p)):
        bad = (a < 0) | (a >= num_classes)
        if bad.any():
            raise ValueError(
                f"confusion_matrix: {name} label {int(a[bad][0])} is outside 0..{num_classes - 1}"
                + (f" and is not ignore_index={ignore_index}" if name == "target" else "")
            )
    return np.bincount(t * num_classes + p, minlength=num_classes**2).reshape(num_classes, num_classes)


def iou_per_class(cm) -> np.ndarray:
    """Per-class IoU = cm[c, c] / (sum_j cm[c, j] + sum_i cm[i, c] - cm[c, c]);
    NaN for a class absent from both ground truth and predictions."""
    m = np.asarray(cm, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"confusion matrix must be square (C, C), got shape {m.shape}")
    diag = np.diag(m)
    denom = m.sum(axis=1) + m.sum(axis=0) - diag
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, diag / np.where(denom > 0, denom, 1.0), np.nan)


def mean_iou(cm, classes: Iterable[int] | None = None) -> float:
    """Mean of :func:`iou_per_class` over ``classes`` (default all), NaN classes skipped."""
    iou = iou_per_class(cm)
    idx = np.arange(iou.size) if classes is None else np.asarray(list(classes), dtype=np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= iou.size):
        raise ValueError(f"class ids {idx.tolist()} outside 0..{iou.size - 1}")
    vals = iou[idx]
    vals = vals[np.isfinite(vals)]
    return float(vals.mean()) if vals.size else float("nan")


def miou_all_base_new(cm, base_classes: Iterable[int], new_classes: Iterable[int]) -> dict[str, float]:
    """``{'all', 'base', 'new'}`` mIoU: over base ∪ new classes, base classes, new classes
    (background included where the caller lists it, e.g. index 0 among the base classes)."""
    base = list(base_classes)
    new = list(new_classes)
    return {"all": mean_iou(cm, base + new), "base": mean_iou(cm, base), "new": mean_iou(cm, new)}
