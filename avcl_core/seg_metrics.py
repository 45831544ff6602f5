"""Segmentation metrics of record: AVSBench mIoU and F-score, CL-AVS pixel mAP, Max-F,
Dice and AUPR, confusion-matrix mIoU.

* AVSBench (S4 / MS3, binary masks): a pixel is predicted foreground when
  ``sigmoid(logit) > 0.5``; :func:`avsbench_miou` averages a per-frame IoU in
  which a frame with an empty ground truth scores the fraction of its pixels
  predicted background. :func:`avsbench_fscore` is the max over 255 thresholds
  of the F-measure curve (beta^2 = 0.3) averaged over frames with a non-empty
  ground truth. The published reference averages the curve per test batch, so
  its number depends on the batch size; here the curve is averaged over the
  whole set (:class:`FScoreAccumulator` accumulates batches to the same result).
* CL-AVS (binary masks): :func:`max_f` is the F-score above under the name its
  tables use; :func:`pixel_map` ranks each frame's pixels by probability and
  averages the per-frame average precision over the frames of the set;
  :func:`aupr` is the area under the precision-recall curve of all pixels of
  the set pooled; :func:`dice` gives the mean per-frame Dice and the
  dataset-level (pooled) Dice at ``sigmoid(logit) > 0.5``. Every metric has an
  accumulator (``update(logits, masks)`` per batch, ``compute()`` at the end)
  whose state does not grow with the set: the ranking metrics count pixels in
  fixed score bins (see :data:`DEFAULT_BINS`).
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
    "AUPRAccumulator",
    "DEFAULT_BINS",
    "DiceAccumulator",
    "FScoreAccumulator",
    "PixelAPAccumulator",
    "aupr",
    "avsbench_fscore",
    "avsbench_frame_iou",
    "avsbench_miou",
    "confusion_matrix",
    "dice",
    "frame_dice",
    "iou_per_class",
    "max_f",
    "mean_iou",
    "miou_all_base_new",
    "pixel_map",
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


def max_f(logits, masks, from_logits: bool = True, num_thresholds: int = 255, beta2: float = 0.3) -> float:
    """Max-F of CL-AVS: ``max_th mean_frames F_b2(th)`` over the whole set of frames given.

    The same quantity as :func:`avsbench_fscore` (this is that function under the
    name CL-AVS tables use; :class:`FScoreAccumulator` computes it over batches):
    255 thresholds in [0, 1), per frame ``P = tp / pp``, ``R = tp / gp``,
    ``F = (1 + b2) P R / (b2 P + R)`` with b2 = 0.3, frames with an empty mask
    skipped, the curve averaged over all frames of the set, then its maximum.
    The CL-AVS paper's Max-F formula is written with the balanced F1;
    ``beta2=1.0`` gives that variant.
    """
    return avsbench_fscore(logits, masks, from_logits, num_thresholds, beta2)


# -- Dice ---------------------------------------------------------------------------
def frame_dice(logits, masks, from_logits: bool = True) -> np.ndarray:
    """Per-frame Dice, shape ``(N,)``: ``2 |P ∩ G| / (|P| + |G|)``.

    ``P``: pixels with ``sigmoid(logit) > 0.5`` (``prob > 0.5`` with
    ``from_logits=False``), the decision of :func:`avsbench_frame_iou`; ``G``:
    nonzero mask pixels. Empty ground truth: 1 when nothing is predicted either,
    0 when any pixel is predicted (the formula's value; only 0/0 is defined as 1).
    """
    inter, total = _dice_counts(logits, masks, from_logits, "frame_dice")
    return np.divide(2.0 * inter, total, out=np.ones_like(total), where=total > 0)


def _dice_counts(logits, masks, from_logits: bool, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Per frame ``|P ∩ G|`` and ``|P| + |G|`` (float64, shape ``(N,)``)."""
    x, y = _frames(logits, masks, what)
    pred = _probabilities(x, from_logits) > 0.5
    gt = y != 0
    inter = np.sum(pred & gt, axis=(1, 2)).astype(np.float64)
    total = (np.sum(pred, axis=(1, 2)) + np.sum(gt, axis=(1, 2))).astype(np.float64)
    return inter, total


class DiceAccumulator:
    """Accumulates Dice over batches of frames (decision and conventions of :func:`frame_dice`).

    :meth:`compute` returns ``{'mean': mean over frames of frame_dice,
    'pooled': 2 sum|P ∩ G| / (sum|P| + sum|G|)}``, the sums running over all
    frames (dataset-level Dice, dominated by frames with large objects; 1 when
    the set has no foreground and none is predicted). NaN for both before any
    frame. Batching does not change the result.
    """

    def __init__(self) -> None:
        self._dice_sum = 0.0
        self._inter = 0
        self._total = 0
        self.frames = 0

    def update(self, logits, masks, from_logits: bool = True) -> None:
        """Add a batch: ``logits`` (N, H, W) (probabilities with ``from_logits=False``),
        ``masks`` (N, H, W), nonzero = foreground."""
        inter, total = _dice_counts(logits, masks, from_logits, "DiceAccumulator.update")
        frame = np.divide(2.0 * inter, total, out=np.ones_like(total), where=total > 0)
        self._dice_sum += float(frame.sum())
        self._inter += int(inter.sum())
        self._total += int(total.sum())
        self.frames += inter.size

    def compute(self) -> dict[str, float]:
        """``{'mean': per-frame Dice averaged, 'pooled': dataset-level Dice}``."""
        if self.frames == 0:
            return {"mean": float("nan"), "pooled": float("nan")}
        pooled = 2.0 * self._inter / self._total if self._total else 1.0
        return {"mean": self._dice_sum / self.frames, "pooled": pooled}


def dice(logits, masks, from_logits: bool = True) -> dict[str, float]:
    """Dice over the frames given: ``{'mean', 'pooled'}`` (see :class:`DiceAccumulator`)."""
    acc = DiceAccumulator()
    acc.update(logits, masks, from_logits)
    return acc.compute()


# -- pixel AP and AUPR from score histograms -----------------------------------------
# Ranking metrics need the scores of all pixels in order. Instead of holding them,
# the accumulators count pixels per (class, score bin): probabilities in [0, 1] fall
# into B equal bins, bin b = [b/B, (b+1)/B) (1.0 joins the last bin). Thresholds are
# the bin edges, and the pixels of one bin are tied. The binned value is therefore
# *exactly* the AP / AUPR of the scores rounded down to their bin edge; against the
# unrounded scores it differs only where pixels of both classes share a bin, in the
# order of 1/B for scores spread over [0, 1] (about 1e-3 at the default 1000 bins;
# with informative scores AP reads slightly low: all recall of a tie is credited
# with the precision at its end).
# Bins are uniform in probability: a confident model whose probabilities crowd
# within 1/B of 0 or 1 loses its ranking among those pixels; raise num_bins then.
DEFAULT_BINS = 1000


def _score_histograms(logits, masks, from_logits: bool, num_bins: int, what: str) -> np.ndarray:
    """Per-frame pixel counts per class and score bin, shape ``(N, 2, B)`` int64:
    ``[:, 0]`` background pixels, ``[:, 1]`` foreground pixels."""
    x, y = _frames(logits, masks, what)
    prob = _probabilities(x, from_logits).astype(np.float64)
    if not from_logits:
        bad = (prob < 0.0) | (prob > 1.0)
        if bad.any():
            frame = int(np.argwhere(bad)[0, 0])
            raise ValueError(
                f"{what}: probabilities of frame {frame} lie outside [0, 1]; "
                "pass from_logits=True for logits"
            )
    n = x.shape[0]
    b = np.minimum((prob * num_bins).astype(np.int64), num_bins - 1)
    cls = (y != 0).astype(np.int64)
    idx = (np.arange(n, dtype=np.int64)[:, None, None] * 2 + cls) * num_bins + b
    return np.bincount(idx.ravel(), minlength=n * 2 * num_bins).reshape(n, 2, num_bins)


def _precision_recall(hist: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """From histograms ``(..., 2, B)``: precision, recall and predicted-positive count at
    thresholds descending from the top bin's lower edge to 0, each ``(..., B)``.
    Precision is 1 where nothing is predicted positive; recall is 0 without foreground."""
    desc = hist[..., ::-1].astype(np.float64)
    tp = np.cumsum(desc[..., 1, :], axis=-1)
    pp = tp + np.cumsum(desc[..., 0, :], axis=-1)
    gp = tp[..., -1:]
    prec = np.divide(tp, pp, out=np.ones_like(tp), where=pp > 0)
    rec = np.divide(tp, gp, out=np.zeros_like(tp), where=gp > 0)
    return prec, rec, pp


def _average_precision(hist: np.ndarray) -> np.ndarray:
    """``AP = sum_k P_k (R_k - R_{k-1})`` over descending thresholds (R_{-1} = 0), shape ``(...)``."""
    prec, rec, _ = _precision_recall(hist)
    return np.sum(prec * np.diff(rec, axis=-1, prepend=0.0), axis=-1)


def _check_bins(num_bins: int) -> int:
    if int(num_bins) != num_bins or num_bins < 1:
        raise ValueError(f"num_bins must be a positive integer, got {num_bins!r}")
    return int(num_bins)


class PixelAPAccumulator:
    """Pixel mAP of CL-AVS (Raghavan et al., "Can You Hear, Localize, and Segment
    Continually?", eq. 11), accumulated over batches of frames.

    For each frame i with a non-empty mask, pixels are ranked by their
    foreground probability and
    ``AP_i = sum_k P(th_k) (R(th_k) - R(th_{k-1}))`` over thresholds ``th_k``
    descending (non-interpolated step sum, ``R(th_{-1}) = 0``), with
    ``P = tp / pp`` and ``R = tp / gp`` at ``prob >= th_k``; tied scores enter
    together. ``mAP = (1 / |D|) sum_{i in D} AP_i``: a plain mean over frames
    of the whole set (not per batch, per clip or per class).

    Frames with an empty mask have no defined AP: ``empty='skip'`` (default)
    leaves them out of ``D`` (counted in :attr:`skipped`); ``empty='zero'``
    counts them with AP 0, the value a per-frame call of the common
    average-precision routines returns for a frame without positives.
    :meth:`compute` is NaN when ``D`` is empty.

    Thresholds are the edges of ``num_bins`` equal probability bins (see the
    note above :data:`DEFAULT_BINS`): memory is ``O(N * num_bins)`` per batch
    and ``O(1)`` across batches, and the result does not depend on batching.
    """

    def __init__(self, num_bins: int = DEFAULT_BINS, empty: str = "skip") -> None:
        if empty not in ("skip", "zero"):
            raise ValueError(f"empty must be 'skip' or 'zero', got {empty!r}")
        self.num_bins = _check_bins(num_bins)
        self.empty = empty
        self._sum = 0.0
        self.frames = 0  # frames in D
        self.skipped = 0  # frames left out for an empty mask

    def update(self, logits, masks, from_logits: bool = True) -> None:
        """Add a batch: ``logits`` (N, H, W) (probabilities in [0, 1] with
        ``from_logits=False``), ``masks`` (N, H, W), nonzero = foreground."""
        hist = _score_histograms(logits, masks, from_logits, self.num_bins, "PixelAPAccumulator.update")
        has_fg = hist[:, 1].sum(axis=1) > 0
        ap = _average_precision(hist)  # 0 for frames without foreground
        self._sum += float(ap[has_fg].sum())
        if self.empty == "zero":
            self.frames += hist.shape[0]
        else:
            self.frames += int(has_fg.sum())
            self.skipped += int((~has_fg).sum())

    def compute(self) -> float:
        """mAP over the frames in ``D`` (NaN when there are none)."""
        return self._sum / self.frames if self.frames else float("nan")


def pixel_map(
    logits, masks, from_logits: bool = True, num_bins: int = DEFAULT_BINS, empty: str = "skip"
) -> float:
    """Pixel mAP of the frames given (see :class:`PixelAPAccumulator`)."""
    acc = PixelAPAccumulator(num_bins, empty)
    acc.update(logits, masks, from_logits)
    return acc.compute()


class AUPRAccumulator:
    """Area under the precision-recall curve over all pixels of the set, accumulated over batches.

    All pixels of all frames are pooled into one ranking (frames with an empty
    mask contribute their background pixels). The curve's points are
    ``(R(th_k), P(th_k))`` for thresholds descending over the bin edges, where
    anything is predicted, preceded by ``(0, 1)``; the area is the trapezoidal
    rule over recall, ``sum_k (R_k - R_{k-1}) (P_k + P_{k-1}) / 2``. (Linear
    interpolation between PR points is slightly optimistic; the step sum of
    :class:`PixelAPAccumulator`, applied to the pooled set, is :meth:`pooled_ap`.)
    NaN when the set has no foreground pixel.

    State: per-class pixel counts in ``num_bins`` equal probability bins, shape
    ``(2, num_bins)`` (see the note above :data:`DEFAULT_BINS`); batching does
    not change the result.
    """

    def __init__(self, num_bins: int = DEFAULT_BINS) -> None:
        self.num_bins = _check_bins(num_bins)
        self.histogram = np.zeros((2, self.num_bins), dtype=np.int64)  # [background, foreground]

    def update(self, logits, masks, from_logits: bool = True) -> None:
        """Add a batch: ``logits`` (N, H, W) (probabilities in [0, 1] with
        ``from_logits=False``), ``masks`` (N, H, W), nonzero = foreground."""
        hist = _score_histograms(logits, masks, from_logits, self.num_bins, "AUPRAccumulator.update")
        self.histogram = self.histogram + hist.sum(axis=0)

    def curve(self) -> tuple[np.ndarray, np.ndarray]:
        """``(recall, precision)`` of the pooled curve, starting at ``(0, 1)``, thresholds
        descending: one point per occupied bin (the threshold at which its pixels enter)."""
        prec, rec, pp = _precision_recall(self.histogram)
        keep = np.diff(pp, prepend=0.0) > 0
        return np.concatenate([[0.0], rec[keep]]), np.concatenate([[1.0], prec[keep]])

    def compute(self) -> float:
        """AUPR (NaN without foreground pixels)."""
        if self.histogram[1].sum() == 0:
            return float("nan")
        rec, prec = self.curve()
        return float(np.sum(np.diff(rec) * (prec[1:] + prec[:-1]) / 2.0))

    def pooled_ap(self) -> float:
        """Step-sum AP of the pooled pixels (definition of :class:`PixelAPAccumulator`
        applied to the whole set as one ranking); NaN without foreground pixels."""
        if self.histogram[1].sum() == 0:
            return float("nan")
        return float(_average_precision(self.histogram))


def aupr(logits, masks, from_logits: bool = True, num_bins: int = DEFAULT_BINS) -> float:
    """AUPR over all pixels of the frames given (see :class:`AUPRAccumulator`)."""
    acc = AUPRAccumulator(num_bins)
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
