"""Evaluation metrics for PaliGemma transfer tasks, each matching the reference implementation.

Captioning: `cider_d`, `bleu4` (pycocoevalcap). DocVQA: `anls`. VQAv2: `vqa_accuracy`.
Referring expressions: `refer_detection_accuracy`, `mask_miou` (big_vision's rules). Detection:
`coco_map` (pycocotools).
"""

from pg_tune.evaluate.metrics.anls import anls, anls_score, levenshtein
from pg_tune.evaluate.metrics.cider import PTB_PUNCTUATION, bleu4, cider_d, ptb_tokenize
from pg_tune.evaluate.metrics.detection import COCO_STAT_NAMES, coco_map, matches_at, object_confidence
from pg_tune.evaluate.metrics.referring import (
    box_iou,
    mask_cumulative_iou,
    mask_iou,
    mask_miou,
    refer_detection_accuracy,
)
from pg_tune.evaluate.metrics.vqa import mean_vqa_accuracy, normalize_vqa_answer, vqa_accuracy

__all__ = [
    "COCO_STAT_NAMES",
    "PTB_PUNCTUATION",
    "anls",
    "anls_score",
    "bleu4",
    "box_iou",
    "cider_d",
    "coco_map",
    "levenshtein",
    "mask_cumulative_iou",
    "mask_iou",
    "mask_miou",
    "matches_at",
    "mean_vqa_accuracy",
    "normalize_vqa_answer",
    "object_confidence",
    "ptb_tokenize",
    "refer_detection_accuracy",
    "vqa_accuracy",
]
