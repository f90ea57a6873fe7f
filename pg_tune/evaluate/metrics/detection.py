"""COCO-style detection mAP via pycocotools, from per-image lists of labelled, scored boxes.

PaliGemma writes detections as text ("<loc..><loc..><loc..><loc..> cat ; ..."); once parsed into
``(label, (x1, y1, x2, y2), score)`` tuples per image, `coco_map` builds in-memory COCO ground-truth
and result objects and runs the official COCOeval, so numbers are the standard COCO mAP@[.5:.95],
mAP@.5, etc. The rules it follows, each checked against pycocotools in the tests:

- **Scores.** COCOeval ranks every detection of a category by score across the whole set. A
  generative model has no detector confidence, so `object_confidence` makes one per object from
  the generated tokens: exp(mean log-probability of the tokens that wrote the object: its 4 loc
  tokens and its label). With one score for all (the old 1.0 everywhere) COCOeval's stable sort
  falls back to image order and the same predictions score differently when images swap places.
  ``score=None`` still means 1.0, for callers without log-probabilities.
- **Crowd regions** (COCO ``iscrowd=1``) stay in the ground truth flagged as crowd: COCOeval never
  counts them as misses, and a detection matched to one (overlap measured as intersection over the
  detection's area) is ignored rather than counted as a false positive.
- **Labels outside the category set** are passed to COCOeval under categories of their own, not
  dropped. pycocotools averages AP over the categories that have ground truth, so a category with
  none cannot move mAP (a detection in it is a false positive of a category with no AP): mAP does
  not charge for invented labels. ``detect/unknown_labels`` and ``detect/precision@0.5`` (where they
  are false positives) do, see ``pg_tune.evaluate.scoring``.

    from pg_tune.evaluate.metrics import coco_map
    coco_map([[("cat", (0, 0, 10, 10), 0.9)]], [[("cat", (0, 0, 10, 10))]])["map"]  # 1.0
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Mapping, Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

__all__ = ["COCO_STAT_NAMES", "coco_map", "matches_at", "object_confidence"]

# Names for COCOeval.stats, in its order. -1 means pycocotools found no ground truth for that entry
# (e.g. no large objects in the set); we keep its value rather than invent one.
COCO_STAT_NAMES = (
    "map", "map_50", "map_75", "map_small", "map_medium", "map_large",
    "mar_1", "mar_10", "mar_100", "mar_small", "mar_medium", "mar_large",
)  # fmt: skip

Box = Sequence[float]
Detection = tuple[str, Box, "float | None"]
GroundTruth = tuple[str, Box]
TokenLogprob = tuple[int, int, float]
"""One generated token: ``[start, end)`` characters of the decoded text it wrote, its log-probability."""


def object_confidence(span: tuple[int, int], token_logprobs: Sequence[TokenLogprob]) -> float | None:
    """exp(mean log-probability) of the tokens overlapping the characters ``span`` of the output.

    ``span`` is where a detection was read from (``pg_tune.models.paligemma.boxes.parse_detection_spans``); tokens
    that wrote nothing visible (empty ranges) are skipped. None when no token overlaps.
    """
    start, end = span
    values = [lp for a, b, lp in token_logprobs if b > a and a < end and b > start]
    if not values:
        return None
    return math.exp(sum(values) / len(values))


def _iou_and_ioa(a: Box, b: Box) -> tuple[float, float]:
    """IoU of boxes a and b, and intersection over a's area (COCO's overlap with a crowd region)."""
    ax0, ay0, ax1, ay1 = a
    bx0, by0, bx1, by1 = b
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    area_a = max(0.0, ax1 - ax0) * max(0.0, ay1 - ay0)
    area_b = max(0.0, bx1 - bx0) * max(0.0, by1 - by0)
    union = area_a + area_b - inter
    return (inter / union if union > 0 else 0.0), (inter / area_a if area_a > 0 else 0.0)


def matches_at(
    predicted: Sequence[Detection],
    truth: Sequence[GroundTruth],
    crowd: Sequence[GroundTruth] = (),
    threshold: float = 0.5,
) -> tuple[int, int, int]:
    """(true positives, false positives, ground truths) of one image at one IoU threshold.

    Greedy in score order (ties: output order), same label, one match per ground truth, as COCOeval
    does at a single threshold; a detection left unmatched that covers a same-label crowd region
    (intersection / its area >= threshold) is ignored, neither hit nor false positive. Any other
    detection, one with a label outside the category set included, is a false positive.
    """
    order = sorted(
        range(len(predicted)), key=lambda i: -(1.0 if predicted[i][2] is None else predicted[i][2])
    )
    used: set[int] = set()
    hits = false = 0
    for i in order:
        label, box, _ = predicted[i]
        best, best_iou = None, threshold
        for j, (t_label, t_box) in enumerate(truth):
            if j not in used and t_label == label and (iou := _iou_and_ioa(box, t_box)[0]) >= best_iou:
                best, best_iou = j, iou
        if best is not None:
            used.add(best)
            hits += 1
        elif not any(
            c_label == label and _iou_and_ioa(box, c_box)[1] >= threshold for c_label, c_box in crowd
        ):
            false += 1
    return hits, false, len(truth)


def _xywh(box: Box) -> list[float]:
    x1, y1, x2, y2 = (float(v) for v in box)
    return [x1, y1, x2 - x1, y2 - y1]


def coco_map(
    predictions: Sequence[Sequence[Detection]],
    ground_truths: Sequence[Sequence[GroundTruth]],
    label_to_category_id: Mapping[str, int] | None = None,
    crowds: Sequence[Sequence[GroundTruth]] | None = None,
) -> dict[str, float]:
    """COCO box mAP of per-image predictions against per-image ground truths.

    ``predictions[i]`` and ``ground_truths[i]`` describe image i: ``(label, (x1, y1, x2, y2), score)``
    and ``(label, (x1, y1, x2, y2))``; ``crowds[i]`` holds image i's crowd regions (``iscrowd=1``),
    same form. ``score=None`` counts as 1.0. ``label_to_category_id`` defaults to the ground-truth
    labels (crowds included) in sorted order; predicted labels outside it get categories of their
    own (see the module docstring). Returns the twelve COCOeval statistics named in
    `COCO_STAT_NAMES`; pycocotools' printing is swallowed.
    """
    if len(predictions) != len(ground_truths):
        raise ValueError(
            f"got predictions for {len(predictions)} images but ground truth for {len(ground_truths)}"
        )
    crowds = crowds if crowds is not None else [[] for _ in ground_truths]
    if len(crowds) != len(ground_truths):
        raise ValueError(
            f"got crowd regions for {len(crowds)} images but ground truth for {len(ground_truths)}"
        )
    if label_to_category_id is None:
        labels = sorted({label for image in (*ground_truths, *crowds) for label, _ in image})
        label_to_category_id = {label: i + 1 for i, label in enumerate(labels)}
    if not label_to_category_id:
        raise ValueError("no categories: ground truth has no boxes and no label_to_category_id was given")
    category_of = dict(label_to_category_id)
    for image in predictions:
        for label, _, _ in image:
            if label not in category_of:  # its own category: no ground truth, so it cannot move AP
                category_of[label] = max(category_of.values()) + 1

    images, annotations = [], []
    for image_id, (image, crowd) in enumerate(zip(ground_truths, crowds, strict=True), start=1):
        images.append({"id": image_id})
        for is_crowd, objects in ((0, image), (1, crowd)):
            for label, box in objects:
                if label not in label_to_category_id:
                    raise ValueError(
                        f"ground-truth label {label!r} of image {image_id - 1} is not in label_to_category_id"
                    )
                xywh = _xywh(box)
                # Ids start at 1: COCOeval uses 0 to mean "unmatched".
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": label_to_category_id[label],
                        "bbox": xywh,
                        "area": xywh[2] * xywh[3],
                        "iscrowd": is_crowd,
                    }
                )
    results = [
        {
            "image_id": image_id,
            "category_id": category_of[label],
            "bbox": _xywh(box),
            "score": 1.0 if score is None else float(score),
        }
        for image_id, image in enumerate(predictions, start=1)
        for label, box, score in image
    ]
    categories = [{"id": cid, "name": label} for label, cid in category_of.items()]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = {"images": images, "annotations": annotations, "categories": categories}
        coco_gt.createIndex()
        if results:
            coco_dt = coco_gt.loadRes(results)
        else:  # loadRes cannot take an empty list; an empty result set is still a valid input to COCOeval.
            coco_dt = COCO()
            coco_dt.dataset = {"images": images, "annotations": [], "categories": categories}
            coco_dt.createIndex()
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {
        name: float(value) for name, value in zip(COCO_STAT_NAMES, np.asarray(evaluator.stats), strict=True)
    }
