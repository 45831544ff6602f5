"""Segmentation metrics on hand-computed tiny masks."""
from __future__ import annotations

import numpy as np
import pytest

from avcl_core import seg_metrics as S


def test_avsbench_iou_with_empty_ground_truth_rule():
    logits = np.array(
        [
            [[2.0, -1.0], [3.0, -2.0]],  # predicts pixels (0,0), (1,0)
            [[1.0, -1.0], [-1.0, -1.0]],  # predicts pixel (0,0)
            [[0.0, 0.0], [0.0, 0.0]],  # sigmoid(0) = 0.5 is not > 0.5: all background
        ],
        dtype=np.float32,
    )
    masks = np.array(
        [
            [[1, 1], [0, 0]],  # |P ∩ G| = 1, |P ∪ G| = 3
            [[0, 0], [0, 0]],  # empty: 3 of 4 pixels predicted background
            [[0, 255], [0, 0]],  # 0/255 masks count as binary: IoU 0
        ]
    )
    iou = S.avsbench_frame_iou(logits, masks)
    np.testing.assert_allclose(iou, [1 / 3, 0.75, 0.0], rtol=1e-6)
    assert S.avsbench_miou(logits, masks) == pytest.approx((1 / 3 + 0.75) / 3, rel=1e-6)
    # an all-background prediction on an empty mask is perfect
    assert S.avsbench_miou(-np.ones((1, 3, 3)), np.zeros((1, 3, 3))) == pytest.approx(1.0, rel=1e-6)


# Frame A: probabilities with 3 foreground pixels.
#   th <= 0.1: pp 4, tp 3 -> P 0.75, R 1 -> F = 1.3*0.75/(0.225+1) = 0.7959
#   (0.1, 0.2]: pp 3, tp 2 -> F = 2/3
#   (0.2, 0.6]: pp 2, tp 2 -> P 1, R 2/3 -> F = 1.3*(2/3)/(0.3+2/3) = 0.8966   <- frame max
#   (0.6, 0.9]: F = 1.3*(1/3)/(0.3+1/3) = 0.6842; above 0.9: 0
PA = np.array([[0.9, 0.2], [0.6, 0.1]])
GA = np.array([[1, 0], [1, 1]])
# Frame B: one foreground pixel.
#   th <= 0.05: P 0.25, R 1 -> F = 1.3*0.25/(0.075+1) = 0.3023; (0.05, 0.15]: F = 1; above: 0
PB = np.array([[0.15, 0.05], [0.05, 0.05]])
GB = np.array([[1, 0], [0, 0]])


def test_fscore_single_frame_hand_computed():
    assert S.avsbench_fscore(PA[None], GA[None], from_logits=False) == pytest.approx(1.3 * (2 / 3) / (0.3 + 2 / 3))


def test_fscore_averages_the_curve_before_taking_the_max():
    probs, masks = np.stack([PA, PB]), np.stack([GA, GB])
    # best threshold of the mean curve lies in (0.05, 0.1]: (0.7959 + 1) / 2 = 0.8980,
    # not the mean of per-frame maxima (0.8966 + 1) / 2 = 0.9483
    expected = (1.3 * 0.75 / (0.3 * 0.75 + 1) + 1.0) / 2
    assert S.avsbench_fscore(probs, masks, from_logits=False) == pytest.approx(expected)
    # frames with an empty mask are skipped
    with_empty = (np.stack([PA, PB, PA]), np.stack([GA, GB, np.zeros((2, 2), int)]))
    assert S.avsbench_fscore(*with_empty, from_logits=False) == pytest.approx(expected)
    # batching does not change the whole-set result
    acc = S.FScoreAccumulator()
    acc.update(PA[None], GA[None], from_logits=False)
    acc.update(np.stack([PB, PA]), np.stack([GB, np.zeros((2, 2), int)]), from_logits=False)
    assert acc.compute() == pytest.approx(expected) and acc.frames == 2 and acc.skipped == 1
    # no foreground at all: the whole-set curve is undefined; AVSBench scores such a video 0
    assert np.isnan(S.whole_set_fscore(PA[None], np.zeros((1, 2, 2)), from_logits=False))
    assert S.avsbench_fscore(PA[None], np.zeros((1, 2, 2)), from_logits=False) == 0.0


def test_fscore_from_logits_matches_probabilities():
    logits = np.log(PA / (1 - PA))
    assert S.avsbench_fscore(logits[None], GA[None]) == pytest.approx(
        S.avsbench_fscore(PA[None], GA[None], from_logits=False))


def test_fscore_matches_a_direct_threshold_loop_in_float32():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, size=(4, 8, 8)).astype(np.float32)
    masks = (rng.random((4, 8, 8)) < 0.3).astype(np.float32)
    masks[2] = 0
    # the definition, literally: per frame and threshold, in float32 as the reference computes it
    prob = torch.sigmoid(torch.from_numpy(logits))
    gt = torch.from_numpy(masks)
    ths = torch.linspace(0, 1 - 1e-10, 255)
    curves = []
    for n in range(4):
        if gt[n].sum() == 0:
            continue
        f = torch.zeros(255)
        for k in range(255):
            sel = (prob[n] >= ths[k]).float()
            tp = (sel * gt[n]).sum()
            p, r = tp / (sel.sum() + 1e-20), tp / (gt[n].sum() + 1e-20)
            f[k] = 1.3 * p * r / (0.3 * p + r)
        curves.append(torch.nan_to_num(f, nan=0.0))
    expected = torch.stack(curves).mean(0).max().item()
    assert S.whole_set_fscore(logits, masks) == pytest.approx(expected, rel=1e-5)
    # one video: the per-video number of record is the same curve's maximum
    assert S.avsbench_fscore(logits, masks) == pytest.approx(expected, rel=1e-5)


def test_confusion_matrix_miou_all_base_new():
    target = np.array([[0, 0, 1, 1], [2, 2, 255, 0]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 2, 0]])
    cm = S.confusion_matrix(pred, target, num_classes=4)
    # rows = truth: class 0 -> pred 0,1,0 ; class 1 -> 1,1 ; class 2 -> 2,0 ; 255 ignored
    np.testing.assert_array_equal(cm, [[2, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]])
    iou = S.iou_per_class(cm)
    # class 0: 2 / (3 + 3 - 2) = 0.5; class 1: 2 / (2 + 3 - 2) = 2/3; class 2: 1 / (2 + 1 - 1) = 0.5
    np.testing.assert_allclose(iou[:3], [0.5, 2 / 3, 0.5])
    assert np.isnan(iou[3])  # absent everywhere: left out of means
    out = S.miou_all_base_new(cm, base_classes=[0, 1], new_classes=[2, 3])
    assert out == pytest.approx({"all": (0.5 + 2 / 3 + 0.5) / 3, "base": (0.5 + 2 / 3) / 2, "new": 0.5})
    # batches add up to the dataset matrix
    cm2 = S.confusion_matrix(pred[:1], target[:1], 4) + S.confusion_matrix(pred[1:], target[1:], 4)
    np.testing.assert_array_equal(cm2, cm)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="target label 7"):
        S.confusion_matrix(np.zeros(3, int), np.array([0, 7, 255]), num_classes=4)
    with pytest.raises(ValueError, match=r"\(2, 2, 2\) and \(2, 2\)"):
        S.avsbench_miou(np.zeros((2, 2, 2)), np.zeros((2, 2), dtype=int))
    with pytest.raises(ValueError, match="frame 1"):
        S.avsbench_miou(np.array([[[0.0]], [[np.nan]]]), np.zeros((2, 1, 1)))


# -- CL-AVS metrics: pixel mAP, Max-F, Dice, AUPR ------------------------------------
# Frame A ranked by score: 0.9 (+), 0.6 (+), 0.2 (-), 0.1 (+); 3 foreground pixels.
#   AP_A = P*dR summed: 1 * 1/3 + 1 * 1/3 + (2/3) * 0 + (3/4) * 1/3 = 11/12
# Frame B: its one foreground pixel has the top score: AP_B = 1.
AP_A, AP_B = 11 / 12, 1.0
EMPTY = np.zeros((2, 2), int)


def test_pixel_map_hand_computed_and_empty_mask_conventions():
    probs, masks = np.stack([PA, PB]), np.stack([GA, GB])
    assert S.pixel_map(PA[None], GA[None], from_logits=False) == pytest.approx(AP_A)
    assert S.pixel_map(probs, masks, from_logits=False) == pytest.approx((AP_A + AP_B) / 2)
    # a frame with an empty mask: left out by default, AP 0 with empty="zero"
    probs3, masks3 = np.stack([PA, PB, PA]), np.stack([GA, GB, EMPTY])
    acc = S.PixelAPAccumulator()
    acc.update(probs3, masks3, from_logits=False)
    assert acc.compute() == pytest.approx((AP_A + AP_B) / 2) and acc.frames == 2 and acc.skipped == 1
    assert S.pixel_map(probs3, masks3, from_logits=False, empty="zero") == pytest.approx((AP_A + AP_B) / 3)
    assert np.isnan(S.pixel_map(PA[None], EMPTY[None], from_logits=False))
    # logits and their probabilities give the same ranking
    assert S.pixel_map(np.log(PA / (1 - PA))[None], GA[None]) == pytest.approx(AP_A)


def test_pixel_map_ties_within_a_bin_enter_together():
    # ranked: 0.9 (+), 0.8 (-), 0.7 (+), 0.1 (-): exact AP = 1 * 1/2 + (2/3) * 1/2 = 5/6
    p = np.array([[[0.9, 0.8], [0.7, 0.1]]])
    g = np.array([[[1, 0], [1, 0]]])
    assert S.pixel_map(p, g, from_logits=False) == pytest.approx(5 / 6)
    # 2 bins: 0.9, 0.8, 0.7 are tied in [0.5, 1] -> one point P = 2/3, R = 1 -> AP = 2/3
    assert S.pixel_map(p, g, from_logits=False, num_bins=2) == pytest.approx(2 / 3)


def test_max_f_is_f1_by_default_and_avsbench_fscore_with_beta2():
    probs, masks, videos = np.stack([PA, PB, PA]), np.stack([GA, GB, EMPTY]), ["a", "a", "b"]
    assert S.max_f(probs, masks, videos, from_logits=False, beta2=0.3) == S.avsbench_fscore(
        probs, masks, videos, from_logits=False)
    # beta^2 = 1 (F1) on frame A: thresholds <= 0.1 give P 3/4, R 1 -> F1 = 6/7 (the max;
    # (0.1, 0.2]: 2/3, (0.2, 0.6]: P 1, R 2/3 -> 0.8, (0.6, 0.9]: 0.5)
    assert S.max_f(PA[None], GA[None], from_logits=False) == pytest.approx(6 / 7)
    assert S.max_f(PA[None], GA[None], from_logits=False, beta2=0.3) == pytest.approx(1.3 * (2 / 3) / (0.3 + 2 / 3))


def test_dice_per_frame_pooled_and_empty_conventions():
    logits = np.array(
        [
            [[2.0, -1.0], [3.0, -2.0]],  # P = {(0,0), (1,0)}
            [[1.0, -1.0], [-1.0, -1.0]],  # P = {(0,0)}
            [[0.0, 0.0], [0.0, 0.0]],  # nothing (sigmoid 0.5 is not > 0.5)
            [[-1.0, -1.0], [-1.0, -1.0]],  # nothing
        ]
    )
    masks = np.array([[[1, 1], [0, 0]], EMPTY, [[0, 255], [0, 0]], EMPTY])
    # 2*1/(2+2); empty mask but 1 pixel predicted: 0; missed object: 0; both empty: 1
    np.testing.assert_allclose(S.frame_dice(logits, masks), [0.5, 0.0, 0.0, 1.0])
    # pooled: 2 * 1 / (|P| 3 + |G| 3)
    assert S.dice(logits, masks) == pytest.approx({"mean": 1.5 / 4, "pooled": 1 / 3})
    assert S.dice(-np.ones((2, 3, 3)), np.zeros((2, 3, 3))) == {"mean": 1.0, "pooled": 1.0}
    assert all(np.isnan(v) for v in S.DiceAccumulator().compute().values())


def test_aupr_hand_computed_over_pooled_pixels():
    probs, masks = np.stack([PA, PB]), np.stack([GA, GB])
    # pooled ranking: .9+ .6+ .2- .15+ .1+ .05- .05- .05-, 4 foreground pixels
    # (R, P): (0,1) (.25,1) (.5,1) (.5,2/3) (.75,3/4) (1,4/5) (1,1/2)
    expected = 0.25 + 0.25 + 0.25 * (2 / 3 + 3 / 4) / 2 + 0.25 * (3 / 4 + 4 / 5) / 2
    acc = S.AUPRAccumulator()
    acc.update(probs, masks, from_logits=False)
    assert acc.compute() == pytest.approx(expected)
    rec, prec = acc.curve()
    np.testing.assert_allclose(rec, [0, 0.25, 0.5, 0.5, 0.75, 1, 1])
    np.testing.assert_allclose(prec, [1, 1, 1, 2 / 3, 3 / 4, 4 / 5, 1 / 2])
    assert acc.pooled_ap() == pytest.approx(0.25 + 0.25 + 0.25 * 3 / 4 + 0.25 * 4 / 5)
    # an empty-mask frame's pixels join the ranking: four negatives at 0.95 come first
    # (R, P): (0,1) (0,0) (.25,1/5) (.5,1/3) (.5,2/7) (.75,3/8) (1,4/9) (1,1/3)
    with_empty = S.aupr(np.stack([PA, PB, np.full((2, 2), 0.95)]), np.stack([GA, GB, EMPTY]), from_logits=False)
    expected = 0.25 * (
        (0 + 1 / 5) / 2 + (1 / 5 + 1 / 3) / 2 + (2 / 7 + 3 / 8) / 2 + (3 / 8 + 4 / 9) / 2
    )
    assert with_empty == pytest.approx(expected)
    assert np.isnan(S.aupr(PA[None], EMPTY[None], from_logits=False))


def _random_set(seed, n=8, size=24):
    rng = np.random.default_rng(seed)
    masks = (rng.random((n, size, size)) < 0.3).astype(np.uint8)
    masks[1] = 0  # an empty frame
    logits = rng.normal(0.0, 1.5, size=masks.shape) + 1.5 * masks
    return logits.astype(np.float32), masks


def test_accumulators_do_not_depend_on_batching():
    logits, masks = _random_set(1)
    whole = [S.PixelAPAccumulator(), S.PixelAPAccumulator(empty="zero"), S.AUPRAccumulator(),
             S.DiceAccumulator(), S.FScoreAccumulator()]
    parts = [S.PixelAPAccumulator(), S.PixelAPAccumulator(empty="zero"), S.AUPRAccumulator(),
             S.DiceAccumulator(), S.FScoreAccumulator()]
    for acc in whole:
        acc.update(logits, masks)
    for lo, hi in [(0, 1), (1, 4), (4, 8)]:
        for acc in parts:
            acc.update(logits[lo:hi], masks[lo:hi])
    for a, b in zip(whole, parts):
        assert b.compute() == pytest.approx(a.compute(), rel=1e-12), type(a).__name__
    np.testing.assert_array_equal(whole[2].histogram, parts[2].histogram)


def _exact_ap_aupr(scores, labels):
    """Step-sum AP and trapezoidal AUPR of one ranking by sorting (ties form one point)."""
    order = np.argsort(-scores, kind="stable")
    s, g = scores[order], labels[order].astype(np.float64)
    last = np.r_[np.flatnonzero(np.diff(s) != 0), s.size - 1]  # last index of each tie group
    tp = np.cumsum(g)[last]
    prec, rec = tp / (last + 1), tp / g.sum()
    ap = np.sum(prec * np.diff(rec, prepend=0.0))
    r, p = np.r_[0.0, rec], np.r_[1.0, prec]
    return ap, np.sum(np.diff(r) * (p[1:] + p[:-1]) / 2)


def test_histogram_ap_and_aupr_match_sorted_scores():
    logits, masks = _random_set(2, n=6, size=40)
    probs = 1 / (1 + np.exp(-logits.astype(np.float64)))
    frames = [f for f in range(len(masks)) if masks[f].any()]
    exact_map = np.mean([_exact_ap_aupr(probs[f].ravel(), masks[f].ravel())[0] for f in frames])
    exact_ap, exact_aupr = _exact_ap_aupr(probs.ravel(), masks.ravel())
    # stated tolerance: differences of order 1 / num_bins when scores spread over [0, 1]
    acc = S.AUPRAccumulator(num_bins=1000)
    acc.update(probs, masks, from_logits=False)
    assert abs(S.pixel_map(probs, masks, from_logits=False) - exact_map) < 2e-3
    assert abs(acc.compute() - exact_aupr) < 2e-3
    assert abs(acc.pooled_ap() - exact_ap) < 2e-3
    # with few bins the error grows, as documented
    assert abs(S.aupr(probs, masks, from_logits=False, num_bins=4) - exact_aupr) > 5e-3
    # scores already on the bin grid: the histogram is exact
    b = 64
    grid = (np.floor(probs * b) + 0.5) / b
    exact_map = np.mean([_exact_ap_aupr(grid[f].ravel(), masks[f].ravel())[0] for f in frames])
    exact_ap, exact_aupr = _exact_ap_aupr(grid.ravel(), masks.ravel())
    assert S.pixel_map(grid, masks, from_logits=False, num_bins=b) == pytest.approx(exact_map, rel=1e-12)
    assert S.aupr(grid, masks, from_logits=False, num_bins=b) == pytest.approx(exact_aupr, rel=1e-12)


def test_new_metrics_leave_inputs_alone_and_name_bad_input():
    logits, masks = _random_set(3, n=2, size=4)
    before = (logits.copy(), masks.copy())
    S.pixel_map(logits, masks), S.aupr(logits, masks), S.dice(logits, masks), S.max_f(logits, masks)
    np.testing.assert_array_equal(logits, before[0])
    np.testing.assert_array_equal(masks, before[1])
    with pytest.raises(ValueError, match="frame 1 lie outside"):
        S.pixel_map(np.array([[[0.5]], [[1.5]]]), np.ones((2, 1, 1)), from_logits=False)
    with pytest.raises(ValueError, match="num_bins"):
        S.AUPRAccumulator(num_bins=0)
    with pytest.raises(ValueError, match="empty must be"):
        S.PixelAPAccumulator(empty="ignore")
    with pytest.raises(ValueError, match=r"DiceAccumulator.update.*\(1, 2, 2\) and \(1, 3, 3\)"):
        S.DiceAccumulator().update(np.zeros((1, 2, 2)), np.zeros((1, 3, 3)))


# -- AVSBench metrics of record: per-video aggregation ---------------------------------
# A plain transcription of the published definitions (AVSBench utility.py `mask_iou`,
# `Eval_Fmeasure` and the test loop with one video per batch), loop by loop, in torch.
def _official_mask_iou(pred, target, eps=1e-7):
    torch = pytest.importorskip("torch")
    n_frames, h, w = pred.shape
    p = (torch.sigmoid(pred) > 0.5).int()
    total = 0.0
    for n in range(n_frames):
        if target[n].sum() == 0:
            total += ((1 - target[n]) * (1 - p[n])).sum() / (h * w + eps)
        else:
            total += (p[n] * target[n]).sum() / (torch.max(p[n], target[n]).sum() + eps)
    return float(total / n_frames)


def _official_fmeasure(pred, gt, pr_num=255, beta2=0.3):
    torch = pytest.importorskip("torch")
    s = torch.sigmoid(pred)
    th = torch.linspace(0, 1 - 1e-10, pr_num)
    avg_f, kept = torch.zeros(pr_num), 0
    for n in range(pred.shape[0]):
        if torch.mean(gt[n]) == 0.0:
            continue
        prec, rec = torch.zeros(pr_num), torch.zeros(pr_num)
        for i in range(pr_num):
            y = (s[n] >= th[i]).float()
            tp = (y * gt[n]).sum()
            prec[i], rec[i] = tp / (y.sum() + 1e-20), tp / (gt[n].sum() + 1e-20)
        f = (1 + beta2) * prec * rec / (beta2 * prec + rec)
        f[f != f] = 0
        avg_f += f
        kept += 1
    score = avg_f / kept if kept else torch.zeros(pr_num)
    return float(score.max())


def _official_test_loop(logits, masks, videos, beta2=0.3):
    """Mean over videos (one test batch each) of mask_iou and Eval_Fmeasure."""
    torch = pytest.importorskip("torch")
    ious, fs = [], []
    for v in dict.fromkeys(videos):
        sel = [i for i, u in enumerate(videos) if u == v]
        x, y = torch.from_numpy(logits[sel]), torch.from_numpy(masks[sel]).float()
        ious.append(_official_mask_iou(x, y))
        fs.append(_official_fmeasure(x, y, beta2=beta2))
    return float(np.mean(ious)), float(np.mean(fs))


def test_avsbench_metrics_match_the_official_formulas_on_random_videos():
    rng = np.random.default_rng(5)
    lengths = {"v0": 5, "v1": 1, "v2": 3, "v3": 2, "v4": 4}
    videos = [v for v, n in lengths.items() for _ in range(n)]
    order = rng.permutation(len(videos))  # frames of a video need not be adjacent
    videos = [videos[i] for i in order]
    n = len(videos)
    masks = (rng.random((n, 12, 12)) < rng.uniform(0.05, 0.5, size=(n, 1, 1))).astype(np.uint8)
    masks[[i for i, v in enumerate(videos) if v == "v3"]] = 0  # an all-empty video
    masks[[i for i, v in enumerate(videos) if v == "v0"][1]] = 0  # an empty frame in a video
    logits = (rng.normal(0.0, 2.0, size=masks.shape) + 2.0 * masks).astype(np.float32)
    miou, fscore = _official_test_loop(logits, masks, videos)
    assert S.avsbench_miou(logits, masks, videos) == pytest.approx(miou, rel=1e-6)
    assert S.avsbench_fscore(logits, masks, videos) == pytest.approx(fscore, rel=1e-5)
    _, f1 = _official_test_loop(logits, masks, videos, beta2=1.0)
    assert S.max_f(logits, masks, videos) == pytest.approx(f1, rel=1e-5)
    # the aggregation matters here: frame mean and whole-set curve give other numbers
    assert abs(S.avsbench_miou(logits, masks) - miou) > 1e-3
    assert abs(S.whole_set_fscore(logits, masks) - fscore) > 1e-3
    # accumulators over interleaved batches give the same per-video numbers
    iou_acc, f_acc = S.VideoIoUAccumulator(), S.VideoFScoreAccumulator()
    for lo, hi in [(0, 4), (4, 5), (5, n)]:
        iou_acc.update(logits[lo:hi], masks[lo:hi], videos[lo:hi])
        f_acc.update(logits[lo:hi], masks[lo:hi], np.array(videos[lo:hi]))
    assert iou_acc.compute() == pytest.approx(miou, rel=1e-6)
    assert f_acc.compute() == pytest.approx(fscore, rel=1e-5)
    assert f_acc.per_video()["v3"] == 0.0 and len(f_acc.per_video()) == 5


def test_avsbench_per_video_hand_computed():
    # IoU frames of test_avsbench_iou_with_empty_ground_truth_rule: 1/3, 0.75 (empty mask), 0
    logits = np.array([[[2.0, -1.0], [3.0, -2.0]], [[1.0, -1.0], [-1.0, -1.0]], [[0.0, 0.0], [0.0, 0.0]]])
    masks = np.array([[[1, 1], [0, 0]], EMPTY, [[0, 1], [0, 0]]])
    # video a = frames 0 and 1 (mean 13/24), video b = frame 2 (0): every video weighs the same
    assert S.avsbench_miou(logits, masks, ["a", "a", "b"]) == pytest.approx((1 / 3 + 0.75) / 4, rel=1e-6)
    assert S.avsbench_miou(logits, masks) == pytest.approx((1 / 3 + 0.75) / 3, rel=1e-6)
    # F: video [A, B] -> max of the mean curve 0.8980 (see above); video [B] -> 1
    probs, gts = np.stack([PA, PB, PB]), np.stack([GA, GB, GB])
    two = (1.3 * 0.75 / (0.3 * 0.75 + 1) + 1.0) / 2
    assert S.avsbench_fscore(probs, gts, [0, 0, 1], from_logits=False) == pytest.approx((two + 1.0) / 2)
    # the whole-set curve peaks in (0.05, 0.1]: (0.7959 + 1 + 1) / 3
    assert S.whole_set_fscore(probs, gts, from_logits=False) == pytest.approx(
        (1.3 * 0.75 / (0.3 * 0.75 + 1) + 2.0) / 3)
    # an all-empty video counts 0 in F (and its empty frames are skipped inside other videos)
    probs, gts = np.stack([PA, PA, PA]), np.stack([GA, EMPTY, EMPTY])
    fa = 1.3 * (2 / 3) / (0.3 + 2 / 3)
    assert S.avsbench_fscore(probs, gts, ["x", "y", "x"], from_logits=False) == pytest.approx(fa / 2)


def test_avsbench_perfect_prediction():
    masks = np.zeros((4, 6, 6), np.uint8)
    masks[0, 1:4, 2:5] = 1
    masks[1, 0:2, 0:6] = 1
    logits = np.where(masks > 0, 8.0, -8.0)
    videos = ["fg", "fg", "fg", "empty"]  # frame 2 of "fg" and the whole video "empty" have no object
    assert S.avsbench_miou(logits, masks, videos) == pytest.approx(1.0, rel=1e-6)
    # F of the object video is 1; the all-empty video counts 0 even when predicted perfectly
    assert S.avsbench_fscore(logits, masks, videos) == pytest.approx(0.5)
    assert S.max_f(logits, masks, videos) == pytest.approx(0.5)
    assert S.avsbench_fscore(logits[:3], masks[:3], videos[:3]) == pytest.approx(1.0)


def test_video_ids_must_match_the_frames():
    with pytest.raises(ValueError, match=r"VideoIoUAccumulator.update: videos must give one id per frame \(2 frames\)"):
        S.VideoIoUAccumulator().update(np.zeros((2, 2, 2)), np.zeros((2, 2, 2)), ["a"])
    with pytest.raises(ValueError, match=r"one id per frame \(2 frames\)"):
        S.avsbench_fscore(np.zeros((2, 2, 2)), np.zeros((2, 2, 2)), ["a", "b", "c"])
    assert np.isnan(S.VideoFScoreAccumulator().compute()) and np.isnan(S.VideoIoUAccumulator().compute())


def test_avss_miou_hand_computed_confusion():
    # classes 0 (background), 1, 2, 3 (never present nor predicted)
    target = np.array([[[0, 1], [1, 255]], [[0, 0], [0, -1]]])
    pred = np.array([[[0, 1], [2, 2]], [[0, 0], [0, 1]]])
    # frame 0: class 0 1/1; class 1 1/2; class 2 predicted on (1,0) and on the 255 pixel: 0/2
    # frame 1: class 0 3/3; the class-1 prediction sits on an ignored (-1) pixel
    # sums over frames [2, 0.5, 0, 0], frames with a non-empty union [2, 1, 1, 0]
    acc = S.AVSSAccumulator(num_classes=4)
    acc.update(pred[:1], target[:1])
    acc.update(pred[1:], target[1:])
    np.testing.assert_allclose(acc.per_class_iou(), [1.0, 0.5, 0.0, np.nan])
    np.testing.assert_array_equal(acc.count, [2, 1, 1, 0])
    out = acc.compute()
    # the absent class counts 0 in the mean over all 4 classes
    assert out["miou"] == pytest.approx(1.5 / 4)
    assert out["miou_no_last"] == pytest.approx(1.5 / 3)
    # F (beta^2 0.3): class 0 1, 1; class 1 p 1, r 1/2 -> 1.3 * 0.5 / 0.8; class 2 0
    assert out["fscore"] == pytest.approx((1.0 + 1.3 * 0.5 / 0.8) / 4)
    assert S.avss_miou(pred, target, 4) == pytest.approx(1.5 / 4)
    # class scores (N, C, H, W) are reduced by argmax
    scores = np.moveaxis(np.eye(4)[pred], -1, 1)
    assert S.avss_miou(scores, target, 4) == pytest.approx(1.5 / 4)
    with pytest.raises(ValueError, match="frame 1 predicts a label outside 0..3"):
        S.avss_miou(np.array([[[0]], [[4]]]), np.zeros((2, 1, 1), int), 4)


def test_threshold_counting_equals_direct_comparison_at_the_boundaries(monkeypatch):
    # values exactly on the float32 thresholds, next to them, outside [0, 1]; several chunks
    th64 = np.linspace(0.0, 1.0 - 1e-10, 255)
    th = th64.astype(np.float32)
    rng = np.random.default_rng(7)
    near = np.r_[th, np.nextafter(th, np.float32(-1)), np.nextafter(th, np.float32(2)), -0.5, 1.5,
                 rng.random(64)].astype(np.float32)
    prob = rng.choice(near, size=(6, 97)).astype(np.float32)
    gt = rng.random((6, 97)) < 0.4
    gt[2] = False
    np.testing.assert_array_equal(S._thresholds_passed(prob, th), np.searchsorted(th, prob, side="right"))
    monkeypatch.setattr(S, "_CHUNK_PIXELS", 200)  # two frames per chunk
    curves, has_fg = S._frame_f_curves(prob, gt, th64, 0.3)
    sel = prob[:, :, None] >= th[None, None, :]
    tp = (sel & gt[:, :, None]).sum(axis=1).astype(np.float64)
    pp = sel.sum(axis=1).astype(np.float64)
    gp = gt.sum(axis=1, dtype=np.float64)[:, None]
    prec, rec = tp / (pp + 1e-20), tp / (gp + 1e-20)
    with np.errstate(invalid="ignore", divide="ignore"):
        f = np.nan_to_num(1.3 * prec * rec / (0.3 * prec + rec), nan=0.0)
    np.testing.assert_array_equal(has_fg, gt.any(axis=1))
    np.testing.assert_array_equal(curves, f[has_fg])
