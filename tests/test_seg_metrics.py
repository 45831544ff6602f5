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
