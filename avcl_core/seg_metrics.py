"""Segmentation metrics of record: AVSBench mIoU and F-score, CL-AVS pixel mAP, Max-F,
Dice and AUPR, AVSS per-class mIoU, confusion-matrix mIoU.

* AVSBench (S4 / MS3, binary masks), metrics of record: a pixel is predicted
  foreground when ``sigmoid(logit) > 0.5``. :func:`avsbench_miou` averages a
  per-frame IoU (a frame with an empty ground truth scores the fraction of its
  pixels predicted background) over each video's frames, then over videos.
  :func:`avsbench_fscore` takes, per video, the max over 255 thresholds of the
  F-measure curve (beta^2 = 0.3) averaged over the video's frames with
  foreground, then averages over videos; a video without foreground counts 0.
  Both follow the official test loop, whose batch is one video (pass
  ``videos=`` with one video id per frame). :func:`whole_set_fscore` averages
  the curve over all frames of the set before the max instead.
* CL-AVS (binary masks): :func:`max_f` is the paper's Max-F with the balanced
  F1 (metric name ``maxf1``; ``beta2=0.3`` gives AVSBench's ``fscore``);
  :func:`pixel_map` ranks each frame's pixels by probability and
  averages the per-frame average precision over the frames of the set;
  :func:`aupr` is the area under the precision-recall curve of all pixels of
  the set pooled; :func:`dice` gives the mean per-frame Dice and the
  dataset-level (pooled) Dice at ``sigmoid(logit) > 0.5``. Every metric has an
  accumulator (``update(logits, masks)`` per batch, ``compute()`` at the end);
  the ranking metrics count pixels in fixed score bins (see
  :data:`DEFAULT_BINS`), the per-video ones keep a few numbers per video.
* AVSS (semantic labels): :func:`avss_miou` / :class:`AVSSAccumulator`, the
  per-class IoU summed over frames of AVSBench's semantic benchmark.
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
    "AVSSAccumulator",
    "DEFAULT_BINS",
    "DiceAccumulator",
    "FScoreAccumulator",
    "PixelAPAccumulator",
    "VideoFScoreAccumulator",
    "VideoIoUAccumulator",
    "aupr",
    "avss_miou",
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
    "whole_set_fscore",
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


# -- per-video grouping ---------------------------------------------------------------
def _video_ids(videos, n: int, what: str) -> list:
    """One hashable video id per frame (all frames one video when ``videos`` is None)."""
    if videos is None:
        return [0] * n
    v = np.asarray(videos)
    if v.ndim != 1 or v.shape[0] != n:
        raise ValueError(f"{what}: videos must give one id per frame ({n} frames), got shape {v.shape}")
    return v.tolist()


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


class VideoIoUAccumulator:
    """AVSBench mIoU with its per-video aggregation, accumulated over batches.

    ``mIoU = (1/V) sum_v (1/N_v) sum_{n in v} IoU_n``: the frame IoU of
    :func:`avsbench_frame_iou` averaged over the frames of each video, then the
    unweighted mean over videos. This is what AVSBench's test loop computes with
    one video per test batch (``mask_iou`` per batch, averaged over batches); a
    video's frames may arrive in several batches. NaN before any frame.
    """

    def __init__(self, eps: float = 1e-7) -> None:
        self.eps = float(eps)
        self._sum: dict = {}  # video id -> sum of frame IoU
        self._frames: dict = {}  # video id -> frames counted

    def update(self, logits, masks, videos=None, from_logits: bool = True) -> None:
        """Add frames: ``logits``/``masks`` (N, H, W); ``videos`` (N,) video id per
        frame (None: the batch is one video of its own)."""
        iou = avsbench_frame_iou(logits, masks, from_logits, self.eps)
        ids = _video_ids(videos, iou.size, "VideoIoUAccumulator.update")
        if videos is None and iou.size:
            ids = [("batch", len(self._sum))] * iou.size
        for vid, v in zip(ids, iou):
            self._sum[vid] = self._sum.get(vid, 0.0) + float(v)
            self._frames[vid] = self._frames.get(vid, 0) + 1

    def per_video(self) -> dict:
        """``{video id: mean frame IoU}``."""
        return {vid: s / self._frames[vid] for vid, s in self._sum.items()}

    def compute(self) -> float:
        """mIoU: mean over videos of the per-video frame mean (NaN without frames)."""
        vals = list(self.per_video().values())
        return float(np.mean(vals)) if vals else float("nan")


def avsbench_miou(logits, masks, videos=None, *, from_logits: bool = True, eps: float = 1e-7) -> float:
    """AVSBench mIoU (``mask_iou`` with its test-loop aggregation).

    ``logits`` (N, H, W), ``masks`` (N, H, W), ``videos`` (N,) the video id of
    each frame (any hashable values; frames of a video need not be adjacent).
    ``mIoU = mean over videos of (mean over the video's frames of IoU_n)``, with
    ``IoU_n`` of :func:`avsbench_frame_iou` (an empty mask scores the fraction of
    pixels predicted background). ``videos=None`` treats the frames given as one
    video, i.e. the plain frame mean. With equally long videos (S4 and MS3 test:
    5 frames each) both equal the frame mean; with videos of different lengths
    every video weighs the same.
    """
    acc = VideoIoUAccumulator(eps)
    acc.update(logits, masks, videos, from_logits)
    return acc.compute()


# -- AVSBench F-score ---------------------------------------------------------------
def _thresholds(num_thresholds: int) -> np.ndarray:
    if int(num_thresholds) != num_thresholds or num_thresholds < 2:
        raise ValueError(f"need at least 2 thresholds, got {num_thresholds!r}")
    return np.linspace(0.0, 1.0 - 1e-10, int(num_thresholds))


# pixels per chunk of frames counted at once (bounds the index arrays to ~100 MB)
_CHUNK_PIXELS = 1 << 22


def _thresholds_passed(p: np.ndarray, th: np.ndarray) -> np.ndarray:
    """Per value of ``p``, the number of thresholds ``th_k <= p`` (``th`` ascending, evenly
    spaced from 0, in ``p``'s dtype); equal to ``np.searchsorted(th, p, 'right')``.

    The even spacing gives the index up to rounding; the few values next to a
    threshold are then moved by one until ``th[j-1] <= p < th[j]`` holds exactly."""
    K = th.size
    step = float(th[-1]) / (K - 1)
    j = np.clip(np.floor(p.astype(np.float64) / step), -1, K - 1).astype(np.int64) + 1
    ext = np.concatenate([[-np.inf], th, [np.inf]]).astype(th.dtype)  # ext[j] = th[j-1]
    while True:
        up = ext[j + 1] <= p
        if not up.any():
            break
        j += up
    while True:
        down = ext[j] > p
        if not down.any():
            break
        j -= down
    return j


def _frame_f_curves(prob: np.ndarray, gt: np.ndarray, thresholds: np.ndarray, beta2: float):
    """F-measure curves of frames with foreground.

    ``prob`` (N, P) probabilities, ``gt`` (N, P) bool. Returns ``(curves, has_fg)``:
    ``curves`` (M, K) float64 for the M frames with ``has_fg`` (N,) true. Per
    threshold: ``P = tp / (pp + 1e-20)``, ``R = tp / (gp + 1e-20)`` over pixels
    with ``prob >= th``, ``F = (1 + b2) P R / (b2 P + R)``, NaN -> 0.

    Instead of comparing every pixel with every threshold, each pixel is counted
    once at ``j`` = the number of thresholds ``<= prob`` (it passes thresholds
    ``0 .. j-1``); ``pp`` and ``tp`` at threshold ``k`` are then the counts of
    pixels with ``j > k``. The comparison runs in the prediction's dtype, as
    the reference compares in float32, so the counts are the reference's exactly.
    """
    has_fg = gt.any(axis=1)
    p, g = prob[has_fg], gt[has_fg]
    m_all, n_pix = p.shape
    K = thresholds.size
    th = thresholds.astype(p.dtype)
    curves = np.empty((m_all, K))
    step = max(1, _CHUNK_PIXELS // max(n_pix, 1))
    for lo in range(0, m_all, step):
        pc, gc = p[lo: lo + step], g[lo: lo + step]
        m = pc.shape[0]
        j = _thresholds_passed(pc, th)  # (m, P)
        idx = (j + (np.arange(m) * (K + 1))[:, None]).ravel()
        count = np.bincount(idx, minlength=m * (K + 1)).reshape(m, K + 1)
        fg = np.bincount(idx[gc.ravel()], minlength=m * (K + 1)).reshape(m, K + 1)
        # pixels passing threshold k: those with j >= k + 1
        pp = np.cumsum(count[:, ::-1], axis=1)[:, ::-1][:, 1:].astype(np.float64)
        tp = np.cumsum(fg[:, ::-1], axis=1)[:, ::-1][:, 1:].astype(np.float64)
        gp = gc.sum(axis=1, dtype=np.float64)[:, None]
        prec = tp / (pp + 1e-20)
        rec = tp / (gp + 1e-20)
        with np.errstate(invalid="ignore", divide="ignore"):
            f = (1 + beta2) * prec * rec / (beta2 * prec + rec)
        curves[lo: lo + m] = np.nan_to_num(f, nan=0.0)
    return curves, has_fg


def _prepare_f(logits, masks, from_logits: bool, what: str):
    x, y = _frames(logits, masks, what)
    prob = _probabilities(x, from_logits).reshape(x.shape[0], -1)
    return prob, (y != 0).reshape(y.shape[0], -1)


class FScoreAccumulator:
    """The whole-set F-measure: one curve averaged over every frame of the set.

    Thresholds ``th_k = k * (1 - 1e-10) / (K - 1)``, ``k = 0 .. K-1`` (K = 255),
    all in ``[0, 1)`` (compared in the prediction's dtype, as the reference
    does in float32). For each frame with a non-empty mask and each threshold:
    ``P = tp / (pp + 1e-20)``, ``R = tp / (gp + 1e-20)`` with ``pp`` the pixels
    where ``prob >= th``, ``gp`` the foreground pixels and ``tp`` their
    overlap; ``F = (1 + b2) P R / (b2 P + R)`` (0 where undefined), b2 = 0.3.
    :meth:`compute` returns ``max_k mean_frames F(th_k)`` over all frames with
    foreground, whatever video they come from; NaN when no frame had foreground.
    The result does not depend on how frames are batched. This is *not*
    AVSBench's number of record, which takes the maximum per video
    (:class:`VideoFScoreAccumulator`); it equals it when the set is one video.
    """

    def __init__(self, num_thresholds: int = 255, beta2: float = 0.3) -> None:
        self.thresholds = _thresholds(num_thresholds)
        self.beta2 = float(beta2)
        self._sum = np.zeros(self.thresholds.size)
        self.frames = 0  # frames counted (non-empty masks)
        self.skipped = 0  # frames skipped for an empty mask

    def update(self, logits, masks, from_logits: bool = True) -> None:
        """Add a batch: ``logits`` (N, H, W) (probabilities with ``from_logits=False``),
        ``masks`` (N, H, W), nonzero = foreground."""
        prob, gt = _prepare_f(logits, masks, from_logits, "FScoreAccumulator.update")
        curves, has_fg = _frame_f_curves(prob, gt, self.thresholds, self.beta2)
        self._sum += curves.sum(axis=0)
        self.frames += curves.shape[0]
        self.skipped += int((~has_fg).sum())

    def curve(self) -> np.ndarray:
        """Mean F-measure per threshold over the counted frames, shape ``(K,)``."""
        if self.frames == 0:
            return np.full_like(self._sum, np.nan)
        return self._sum / self.frames

    def compute(self) -> float:
        """Max-F: the maximum of :meth:`curve` over thresholds (NaN without foreground frames)."""
        return float(np.max(self.curve())) if self.frames else float("nan")


class VideoFScoreAccumulator:
    """AVSBench F-score (``Eval_Fmeasure``) with its per-video aggregation, over batches.

    Per video ``v``: ``F_v = max_k (1/M_v) sum_{n in v, G_n non-empty} F_n(th_k)``,
    the maximum over the 255 thresholds of the F curve averaged over the
    video's frames with foreground (curve and thresholds as in
    :class:`FScoreAccumulator`); ``F_v = 0`` when none of its frames has
    foreground (the reference returns the max of an all-zero score then).
    :meth:`compute` is the unweighted mean of ``F_v`` over videos, what
    AVSBench's test loop reports with one video per test batch. ``beta2`` =
    0.3 is AVSBench's F-measure; 1.0 gives the balanced F1 of CL-AVS's Max-F.
    A video's frames may arrive in several batches. NaN before any frame.
    """

    def __init__(self, num_thresholds: int = 255, beta2: float = 0.3) -> None:
        self.thresholds = _thresholds(num_thresholds)
        self.beta2 = float(beta2)
        self._sum: dict = {}  # video id -> (K,) summed curves of its foreground frames
        self._fg: dict = {}  # video id -> foreground frames
        self._frames: dict = {}  # video id -> all frames

    def update(self, logits, masks, videos=None, from_logits: bool = True) -> None:
        """Add frames: ``logits``/``masks`` (N, H, W); ``videos`` (N,) video id per
        frame (None: the batch is one video of its own)."""
        prob, gt = _prepare_f(logits, masks, from_logits, "VideoFScoreAccumulator.update")
        ids = _video_ids(videos, prob.shape[0], "VideoFScoreAccumulator.update")
        if videos is None and ids:
            ids = [("batch", len(self._frames))] * len(ids)
        curves, has_fg = _frame_f_curves(prob, gt, self.thresholds, self.beta2)
        rows = iter(curves)
        for vid, fg in zip(ids, has_fg):
            if vid not in self._frames:
                self._sum[vid] = np.zeros(self.thresholds.size)
                self._fg[vid] = 0
                self._frames[vid] = 0
            self._frames[vid] += 1
            if fg:
                self._sum[vid] += next(rows)
                self._fg[vid] += 1

    def per_video(self) -> dict:
        """``{video id: F_v}`` (0 for a video without a foreground frame)."""
        return {vid: float(np.max(s / self._fg[vid])) if self._fg[vid] else 0.0 for vid, s in self._sum.items()}

    def compute(self) -> float:
        """Mean of ``F_v`` over videos (NaN without frames)."""
        vals = list(self.per_video().values())
        return float(np.mean(vals)) if vals else float("nan")


def avsbench_fscore(
    logits, masks, videos=None, *, from_logits: bool = True, num_thresholds: int = 255, beta2: float = 0.3
) -> float:
    """AVSBench F-score (``Eval_Fmeasure`` with its test-loop aggregation).

    ``logits`` (N, H, W), ``masks`` (N, H, W), ``videos`` (N,) video id per frame.
    ``F = mean over videos of max_k mean_{frames of the video with foreground} F(th_k)``,
    β² = 0.3, 255 thresholds, a video without foreground counting 0 (see
    :class:`VideoFScoreAccumulator`). ``videos=None`` treats the frames given as
    one video (the reference called on them as one batch). The curve averaged
    over the whole set instead is :func:`whole_set_fscore`.
    """
    acc = VideoFScoreAccumulator(num_thresholds, beta2)
    acc.update(logits, masks, videos, from_logits)
    return acc.compute()


def whole_set_fscore(
    logits, masks, *, from_logits: bool = True, num_thresholds: int = 255, beta2: float = 0.3
) -> float:
    """F-score of the whole set: ``max_k`` of the F curve averaged over all frames with
    foreground (see :class:`FScoreAccumulator`); NaN when no frame has foreground."""
    acc = FScoreAccumulator(num_thresholds, beta2)
    acc.update(logits, masks, from_logits)
    return acc.compute()


def max_f(
    logits, masks, videos=None, *, from_logits: bool = True, num_thresholds: int = 255, beta2: float = 1.0
) -> float:
    """Max-F of CL-AVS (Raghavan et al., eq. 12): ``max_th F1(th)``, ``F1 = 2PR / (P + R)``.

    The paper writes the balanced F1 (``beta2=1.0``, the default here; reported
    under the metric name ``maxf1``), unlike AVSBench's β² = 0.3 F-measure
    (``beta2=0.3``; metric name ``fscore``). The paper leaves open whether the
    curve is pooled per frame, per video or over the set; this function uses
    AVSBench's evaluation, whose Max-F the CL-AVS benchmark inherits:
    :func:`avsbench_fscore` with the given ``beta2`` (per-video maximum of the
    frame-averaged curve, 255 thresholds, mean over ``videos``, a video without
    foreground counting 0).
    """
    return avsbench_fscore(logits, masks, videos, from_logits=from_logits,
                           num_thresholds=num_thresholds, beta2=beta2)


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


# -- AVSS: per-class IoU accumulated over frames -----------------------------------------
class AVSSAccumulator:
    """Per-class IoU and F-score of AVSBench-semantic (AVSS), summed over frames.

    ``pred``: label maps ``(N, H, W)`` (integers in ``0 .. C-1``) or class scores
    ``(N, C, H, W)`` (argmax over axis 1). ``target``: labels ``(N, H, W)``.
    For frame ``n`` and class ``c``, with ``P_c`` the pixels predicted ``c`` and
    ``G_c`` the pixels labelled ``c``:

    * ``IoU_{n,c} = |P_c ∩ G_c| / (|P_c ∪ G_c| + 2.22e-16)`` (0 when both are empty);
    * ``F_{n,c} = (1 + b2) p r / (b2 p + r)``, ``p = |P_c ∩ G_c| / |P_c|``,
      ``r = |P_c ∩ G_c| / |G_c|``, undefined values 0, b2 = 0.3.

    Pixels with a negative label are ignored. A label ``>= C`` (e.g. 255) is
    no class's ground truth, but a prediction there still counts in ``|P_c|``,
    as in the reference. Over frames: ``S_c = sum_n IoU_{n,c}`` and
    ``count_c`` = frames where ``|P_c ∪ G_c| > 0``; per-class IoU
    ``S_c / count_c`` (NaN for a class never predicted nor present). The mIoU
    is ``(1/C) sum_c`` of the per-class IoU with NaN counted as 0 — every class
    of the label set is in the denominator, present or not, as in AVSBench's
    AVSS test. The same holds for the F-score.
    """

    def __init__(self, num_classes: int, beta2: float = 0.3) -> None:
        if int(num_classes) != num_classes or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        self.num_classes = int(num_classes)
        self.beta2 = float(beta2)
        self.iou_sum = np.zeros(self.num_classes)
        self.f_sum = np.zeros(self.num_classes)
        self.count = np.zeros(self.num_classes, dtype=np.int64)
        self.frames = 0

    def update(self, pred, target) -> None:
        """Add frames: ``pred`` (N, H, W) labels or (N, C, H, W) scores, ``target`` (N, H, W)."""
        C = self.num_classes
        p = np.asarray(pred)
        t = np.asarray(target)
        if p.ndim == 4:
            if p.shape[1] != C:
                raise ValueError(f"AVSSAccumulator.update: scores have {p.shape[1]} classes, expected {C}")
            p = np.argmax(p, axis=1)
        if p.ndim != 3 or p.shape != t.shape:
            raise ValueError(
                "AVSSAccumulator.update: pred must be (N, H, W) labels or (N, C, H, W) scores and target "
                f"(N, H, W); got {np.shape(pred)} and {t.shape}"
            )
        p = p.astype(np.int64).reshape(p.shape[0], -1)
        t = t.astype(np.int64).reshape(t.shape[0], -1)
        bad = (p < 0) | (p >= C)
        if bad.any():
            frame = int(np.argwhere(bad)[0, 0])
            raise ValueError(f"AVSSAccumulator.update: frame {frame} predicts a label outside 0..{C - 1}")
        n = p.shape[0]
        rows = np.arange(n, dtype=np.int64)[:, None] * C

        def counts(labels, keep):
            idx = np.broadcast_to(rows, labels.shape)[keep] + labels[keep]
            return np.bincount(idx, minlength=n * C).reshape(n, C).astype(np.float64)

        counted = t >= 0
        labelled = counted & (t < C)
        area_pred = counts(p, counted)
        area_gt = counts(t, labelled)
        area_inter = counts(t, labelled & (p == t))
        union = area_pred + area_gt - area_inter
        iou = area_inter / (union + 2.220446049250313e-16)
        with np.errstate(invalid="ignore", divide="ignore"):
            prec = area_inter / area_pred
            rec = area_inter / area_gt
            f = (1 + self.beta2) * prec * rec / (self.beta2 * prec + rec)
        self.iou_sum += iou.sum(axis=0)
        self.f_sum += np.nan_to_num(f, nan=0.0).sum(axis=0)
        self.count += (union > 0).sum(axis=0)
        self.frames += n

    def per_class_iou(self) -> np.ndarray:
        """``S_c / count_c`` per class, shape ``(C,)``; NaN for classes never predicted nor present."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.count > 0, self.iou_sum / np.maximum(self.count, 1), np.nan)

    def per_class_fscore(self) -> np.ndarray:
        """Summed per-frame F-score over ``count_c``, shape ``(C,)``; NaN like :meth:`per_class_iou`."""
        return np.where(self.count > 0, self.f_sum / np.maximum(self.count, 1), np.nan)

    def compute(self) -> dict[str, float]:
        """``{'miou', 'fscore'}`` over all C classes (NaN counted 0) and ``{'miou_no_last',
        'fscore_no_last'}`` over classes ``0 .. C-2``: the reference's "noBg" numbers,
        which drop the *last* class index. NaN before any frame."""
        if self.frames == 0:
            return dict.fromkeys(("miou", "miou_no_last", "fscore", "fscore_no_last"), float("nan"))
        iou = np.nan_to_num(self.per_class_iou(), nan=0.0)
        f = np.nan_to_num(self.per_class_fscore(), nan=0.0)
        return {
            "miou": float(iou.mean()),
            "miou_no_last": float(iou[:-1].mean()) if iou.size > 1 else float("nan"),
            "fscore": float(f.mean()),
            "fscore_no_last": float(f[:-1].mean()) if f.size > 1 else float("nan"),
        }


def avss_miou(pred, target, num_classes: int) -> float:
    """AVSS mIoU of the frames given: per-class IoU summed over frames, divided by the
    frames where the class is predicted or present, averaged over all ``num_classes``
    classes with absent classes counted 0 (see :class:`AVSSAccumulator`)."""
    acc = AVSSAccumulator(num_classes)
    acc.update(pred, target)
    return acc.compute()["miou"]
