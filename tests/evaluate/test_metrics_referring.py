"""Referring-expression metrics on hand-computed boxes and masks."""

import numpy as np
import pytest

from pg_tune.evaluate.metrics import (
    box_iou,
    mask_cumulative_iou,
    mask_iou,
    mask_miou,
    refer_detection_accuracy,
)


@pytest.mark.parametrize(
    ("a", "b", "iou"),
    [
        ((0, 0, 10, 10), (0, 0, 10, 10), 1.0),
        ((0, 0, 10, 10), (5, 0, 15, 10), 50 / 150),  # half overlap: 50 / (100 + 100 - 50)
        ((0, 0, 10, 10), (0, 0, 10, 5), 0.5),  # contained: 50 / 100
        ((0, 0, 10, 10), (10, 10, 20, 20), 0.0),  # touching corners
        ((0, 0, 10, 10), (20, 20, 30, 30), 0.0),
        ((5, 5, 5, 9), (0, 0, 10, 10), 0.0),  # degenerate prediction
        ((0.0, 0.0, 0.5, 0.5), (0.25, 0.0, 0.75, 0.5), 1 / 3),  # normalised coordinates
    ],
)
def test_box_iou(a, b, iou):
    assert box_iou(a, b) == pytest.approx(iou)
    assert box_iou(b, a) == pytest.approx(iou)


def test_detection_accuracy_thresholds_and_none():
    gt = [(0, 0, 10, 10)] * 4
    preds = [
        (0, 0, 10, 10),  # IoU 1.0: hit at both
        (0, 0, 10, 6),  # IoU 0.6: hit at .5 only
        (0, 0, 10, 7.5),  # IoU 0.75 exactly: hit at .75 (>=)
        None,  # unparseable answer: miss
    ]
    assert refer_detection_accuracy(preds, gt) == {0.5: 0.75, 0.75: 0.5}
    assert refer_detection_accuracy(preds, gt, thresholds=(0.9,)) == {0.9: 0.25}


def _mask(shape, rows, cols):
    m = np.zeros(shape, dtype=bool)
    m[rows, cols] = True
    return m


def test_mask_iou_by_hand():
    gt = _mask((4, 4), slice(0, 2), slice(0, 4))  # 8 pixels
    pred = _mask((4, 4), slice(0, 4), slice(0, 2))  # 8 pixels, 4 shared -> 4 / 12
    assert mask_iou(pred, gt) == pytest.approx(1 / 3)
    assert mask_iou(gt, gt) == 1.0
    assert mask_iou(None, gt) == 0.0
    assert mask_iou(np.zeros((4, 4), bool), np.zeros((4, 4), bool)) == 1.0


def test_miou_and_cumulative_iou_with_a_none_prediction():
    gt_small = _mask((4, 4), slice(0, 1), slice(0, 2))  # 2 pixels
    gt_big = _mask((4, 4), slice(0, 4), slice(0, 4))  # 16 pixels
    pred_small = _mask((4, 4), slice(0, 1), slice(0, 1))  # 1 pixel inside: IoU 1/2
    pred_big = _mask((4, 4), slice(0, 4), slice(0, 3))  # 12 pixels inside: IoU 12/16
    preds = [pred_small, pred_big, None]
    gts = [gt_small, gt_big, gt_big]
    assert mask_miou(preds, gts) == pytest.approx((0.5 + 0.75 + 0.0) / 3)
    # (1 + 12 + 0) / (2 + 16 + 16)
    assert mask_cumulative_iou(preds, gts) == pytest.approx(13 / 34)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="shape"):
        mask_iou(np.zeros((2, 2), bool), np.zeros((3, 3), bool))
    with pytest.raises(ValueError, match="1 predicted boxes but 2"):
        refer_detection_accuracy([None], [(0, 0, 1, 1)] * 2)
    with pytest.raises(ValueError, match="no ground-truth masks"):
        mask_miou([], [])
