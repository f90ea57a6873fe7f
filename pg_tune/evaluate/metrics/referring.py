"""Referring-expression metrics (RefCOCO/+/g): box accuracy at IoU thresholds and mask IoU.

PaliGemma answers "detect X" / "segment X" with location (and segmentation) tokens that may not
parse. big_vision's segmentation evaluator scores such an answer as a miss for box accuracy and as
IoU 0 for the mask; callers pass ``None`` for it here and get the same treatment, so an unparseable
answer can never improve a score.

Boxes are ``(x1, y1, x2, y2)`` in any one coordinate system (pixels or normalised), masks boolean
arrays of the ground truth's shape.

    from pg_tune.evaluate.metrics import refer_detection_accuracy
    refer_detection_accuracy([(0, 0, 10, 10), None], [(0, 0, 10, 10), (5, 5, 9, 9)])
    # {0.5: 0.5, 0.75: 0.5}
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["box_iou", "mask_cumulative_iou", "mask_iou", "mask_miou", "refer_detection_accuracy"]

Box = Sequence[float]


def box_iou(box_a: Box, box_b: Box) -> float:
    """IoU of two ``(x1, y1, x2, y2)`` boxes; degenerate boxes have area 0 and give IoU 0."""
    ax1, ay1, ax2, ay2 = (float(v) for v in box_a)
    bx1, by1, bx2, by2 = (float(v) for v in box_b)
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    area_a = max(0.0, ax2 - ax1) * max(0.0, ay2 - ay1)
    area_b = max(0.0, bx2 - bx1) * max(0.0, by2 - by1)
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0


def refer_detection_accuracy(
    pred_boxes: Sequence[Box | None],
    gt_boxes: Sequence[Box],
    thresholds: Sequence[float] = (0.5, 0.75),
) -> dict[float, float]:
    """Fraction of expressions whose predicted box has IoU >= threshold with the ground truth.

    One box per expression. ``None`` (answer did not parse into a box) counts as a miss at every
    threshold. The comparison is ``>=``, as in big_vision (``iou_thresh <= box_iou``).
    """
    _check_lengths(pred_boxes, gt_boxes, "boxes")
    ious = [0.0 if pred is None else box_iou(pred, gt) for pred, gt in zip(pred_boxes, gt_boxes, strict=True)]
    return {t: sum(iou >= t for iou in ious) / len(ious) for t in thresholds}


def _intersection_union(pred: np.ndarray | None, gt: np.ndarray) -> tuple[int, int]:
    gt = np.asarray(gt, dtype=bool)
    if pred is None:
        return 0, int(gt.sum())
    pred = np.asarray(pred, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"predicted mask has shape {pred.shape} but ground truth has {gt.shape}")
    return int(np.logical_and(pred, gt).sum()), int(np.logical_or(pred, gt).sum())


def mask_iou(pred_mask: np.ndarray | None, gt_mask: np.ndarray) -> float:
    """IoU of two boolean masks of the same shape; ``None`` gives 0, two empty masks give 1."""
    inter, union = _intersection_union(pred_mask, gt_mask)
    if union == 0:
        return 0.0 if pred_mask is None else 1.0
    return inter / union


def mask_miou(pred_masks: Sequence[np.ndarray | None], gt_masks: Sequence[np.ndarray]) -> float:
    """Mean over expressions of the mask IoU (big_vision's ``miou``); ``None`` predictions count as 0.

    Each expression weighs the same whatever the object's size. Compare `mask_cumulative_iou`.
    """
    _check_lengths(pred_masks, gt_masks, "masks")
    return sum(mask_iou(p, g) for p, g in zip(pred_masks, gt_masks, strict=True)) / len(gt_masks)


def mask_cumulative_iou(pred_masks: Sequence[np.ndarray | None], gt_masks: Sequence[np.ndarray]) -> float:
    """Cumulative (overall) IoU: total intersection pixels / total union pixels over all expressions.

    The "oIoU" many referring-segmentation papers report next to mIoU; large objects weigh more.
    A ``None`` prediction adds no intersection and its ground-truth area to the union.
    """
    _check_lengths(pred_masks, gt_masks, "masks")
    pairs = [_intersection_union(p, g) for p, g in zip(pred_masks, gt_masks, strict=True)]
    total_union = sum(u for _, u in pairs)
    return sum(i for i, _ in pairs) / total_union if total_union else 0.0


def _check_lengths(preds: Sequence, gts: Sequence, what: str) -> None:
    if len(preds) != len(gts):
        raise ValueError(f"got {len(preds)} predicted {what} but {len(gts)} ground-truth {what}")
    if not gts:
        raise ValueError(f"no ground-truth {what} given")
