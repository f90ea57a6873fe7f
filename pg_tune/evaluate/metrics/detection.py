"""COCO-style detection mAP via pycocotools, from per-image lists of labelled boxes.

PaliGemma writes detections as text ("<loc..><loc..><loc..><loc..> cat ; ..."); once parsed into
``(label, (x1, y1, x2, y2), score)`` tuples per image, `coco_map` builds in-memory COCO ground-truth
and result objects and runs the official COCOeval, so numbers are the standard COCO mAP@[.5:.95],
mAP@.5, etc.

A generative model gives no confidence per box, so ``score=None`` means 1.0. With equal scores
COCOeval's stable sort keeps the order the boxes were given in, so the model's output order acts as
the ranking. We could not check big_vision's convention here (its PaliGemma evaluators in the
public repository have no COCO-detection evaluator), so this is our choice, not a copy of theirs.

    from pg_tune.evaluate.metrics import coco_map
    coco_map([[("cat", (0, 0, 10, 10), None)]], [[("cat", (0, 0, 10, 10))]])["map"]  # 1.0
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping, Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

__all__ = ["COCO_STAT_NAMES", "coco_map"]

# Names for COCOeval.stats, in its order. -1 means pycocotools found no ground truth for that entry
# (e.g. no large objects in the set); we keep its value rather than invent one.
COCO_STAT_NAMES = (
    "map", "map_50", "map_75", "map_small", "map_medium", "map_large",
    "mar_1", "mar_10", "mar_100", "mar_small", "mar_medium", "mar_large",
)  # fmt: skip

Box = Sequence[float]
Detection = tuple[str, Box, "float | None"]
GroundTruth = tuple[str, Box]


def _xywh(box: Box) -> list[float]:
    x1, y1, x2, y2 = (float(v) for v in box)
    return [x1, y1, x2 - x1, y2 - y1]


def coco_map(
    predictions: Sequence[Sequence[Detection]],
    ground_truths: Sequence[Sequence[GroundTruth]],
    label_to_category_id: Mapping[str, int] | None = None,
) -> dict[str, float]:
    """COCO box mAP of per-image predictions against per-image ground truths.

    ``predictions[i]`` and ``ground_truths[i]`` describe image i: ``(label, (x1, y1, x2, y2), score)``
    and ``(label, (x1, y1, x2, y2))``. ``score=None`` counts as 1.0 (see the module docstring).
    ``label_to_category_id`` defaults to the ground-truth labels in sorted order. Predicted labels
    outside it (a generative model can name anything) are dropped: COCOeval would ignore them anyway.
    Returns the twelve COCOeval statistics named in `COCO_STAT_NAMES`; pycocotools' printing is
    swallowed.
    """
    if len(predictions) != len(ground_truths):
        raise ValueError(
            f"got predictions for {len(predictions)} images but ground truth for {len(ground_truths)}"
        )
    if label_to_category_id is None:
        labels = sorted({label for image in ground_truths for label, _ in image})
        label_to_category_id = {label: i + 1 for i, label in enumerate(labels)}
    if not label_to_category_id:
        raise ValueError("no categories: ground truth has no boxes and no label_to_category_id was given")

    images, annotations = [], []
    for image_id, image in enumerate(ground_truths, start=1):
        images.append({"id": image_id})
        for label, box in image:
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
                    "iscrowd": 0,
                }
            )
    results = [
        {
            "image_id": image_id,
            "category_id": label_to_category_id[label],
            "bbox": _xywh(box),
            "score": 1.0 if score is None else float(score),
        }
        for image_id, image in enumerate(predictions, start=1)
        for label, box, score in image
        if label in label_to_category_id
    ]
    categories = [{"id": cid, "name": label} for label, cid in label_to_category_id.items()]
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
