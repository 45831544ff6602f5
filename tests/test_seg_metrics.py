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
    assert np.isnan(S.avsbench_fscore(PA[None], np.zeros((1, 2, 2)), from_logits=False))


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


def test_max_f_is_the_whole_set_fscore_with_beta2_option():
    probs, masks = np.stack([PA, PB, PA]), np.stack([GA, GB, EMPTY])
    assert S.max_f(probs, masks, from_logits=False) == S.avsbench_fscore(probs, masks, from_logits=False)
    # beta^2 = 1 (F1) on frame A: thresholds <= 0.1 give P 3/4, R 1 -> F1 = 6/7 (the max;
    # (0.1, 0.2]: 2/3, (0.2, 0.6]: P 1, R 2/3 -> 0.8, (0.6, 0.9]: 0.5)
    assert S.max_f(PA[None], GA[None], from_logits=False, beta2=1.0) == pytest.approx(6 / 7)


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
