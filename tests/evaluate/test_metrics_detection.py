"""COCO mAP through pycocotools on tiny hand-made cases.

Expected numbers are what pycocotools 2.0.11's COCOeval returns for these inputs (its 101-point
interpolation gives 0.9999999999999998 for a perfect class, hence the 1e-12 tolerance).
"""

import pytest

from pg_tune.evaluate.metrics import COCO_STAT_NAMES, coco_map

TOL = 1e-12


def test_perfect_predictions_give_map_1():
    gts = [[("cat", (0, 0, 10, 10)), ("dog", (20, 20, 80, 90))], [("cat", (5, 5, 300, 200))]]
    preds = [[(label, box, None) for label, box in image] for image in gts]
    stats = coco_map(preds, gts)
    assert set(stats) == set(COCO_STAT_NAMES)
    for name in ("map", "map_50", "map_75", "mar_100"):
        assert stats[name] == pytest.approx(1.0, abs=TOL)


def test_iou_0_6_counts_at_0_5_but_not_at_0_75():
    # 100x60 box inside a 100x100 one: IoU 0.6, a match at thresholds .50 .55 .60 of the ten.
    stats = coco_map([[("cat", (0, 0, 100, 60), None)]], [[("cat", (0, 0, 100, 100))]])
    assert stats["map_50"] == pytest.approx(1.0, abs=TOL)
    assert stats["map_75"] == 0.0
    assert stats["map"] == pytest.approx(0.3, abs=TOL)
    assert stats["map_large"] == pytest.approx(0.3, abs=TOL)  # 100*100 > 96^2
    assert stats["map_small"] == -1.0  # no small ground truth: pycocotools' -1 is kept


def test_map_is_averaged_over_categories():
    gts = [[("cat", (0, 0, 10, 10))], [("dog", (0, 0, 50, 50))]]
    stats = coco_map([[("cat", (0, 0, 10, 10), None)], []], gts)
    assert stats["map"] == pytest.approx(0.5, abs=TOL)


def test_equal_scores_rank_in_output_order():
    gts = [[("cat", (0, 0, 10, 10))]]
    miss, hit = ("cat", (50, 50, 60, 60), None), ("cat", (0, 0, 10, 10), None)
    assert coco_map([[hit, miss]], gts)["map"] == pytest.approx(1.0, abs=TOL)
    assert coco_map([[miss, hit]], gts)["map"] == pytest.approx(0.5, abs=TOL)
    # Explicit scores override the order.
    scored = [[("cat", (50, 50, 60, 60), 0.1), ("cat", (0, 0, 10, 10), 0.9)]]
    assert coco_map(scored, gts)["map"] == pytest.approx(1.0, abs=TOL)


def test_no_or_unknown_predictions_score_zero():
    gts = [[("cat", (0, 0, 10, 10))]]
    assert coco_map([[]], gts)["map"] == 0.0
    # "dog" has no ground truth: its own category, which pycocotools leaves out of the mean AP.
    assert coco_map([[("dog", (0, 0, 10, 10), None)]], gts)["map"] == 0.0


def test_explicit_category_map_and_errors():
    gts = [[("cat", (0, 0, 10, 10))]]
    stats = coco_map([[("cat", (0, 0, 10, 10), 0.5)]], gts, label_to_category_id={"cat": 17, "dog": 18})
    assert stats["map"] == pytest.approx(1.0, abs=TOL)  # dog has no ground truth: not averaged in
    with pytest.raises(ValueError, match="'cat' of image 0 is not in"):
        coco_map([[]], gts, label_to_category_id={"dog": 1})
    with pytest.raises(ValueError, match="2 images but ground truth for 1"):
        coco_map([[], []], gts)
