"""The tasks pg_tune trains and scores, and the metrics each is judged by: the shared vocabulary.

Everything else names tasks and metrics through this module (recipes validate ``eval.best_metric``
against it, dataset adapters tag samples with a task, scoring reports these names), so it imports
nothing of pg_tune.
"""

from __future__ import annotations

# Metric families: captioning (CIDEr), VQA accuracy, DocVQA (ANLS), OCR, COCO detection (mAP),
# referring detection (acc@IoU) and referring segmentation (mask mIoU).
TASKS = ("caption", "vqa", "docvqa", "ocr", "detect", "refer_detect", "refer_segment")

BOX_TASKS = ("detect", "refer_detect", "refer_segment")
"""Tasks whose targets are objects (pixel boxes, and masks for ``refer_segment``)."""

TEXT_TASKS = ("caption", "vqa", "docvqa", "ocr")
"""Tasks whose targets are text; their rows may come without ground truth (DocVQA's test split)."""

PRIMARY_METRIC = {
    "caption": "caption/cider",
    "vqa": "vqa/accuracy",
    "docvqa": "docvqa/anls",
    "ocr": "ocr/anls",
    "refer_detect": "refer_detect/acc@0.5",
    "refer_segment": "refer_segment/miou",
    "detect": "detect/map",
}
"""The metric each task is judged by (higher is better)."""

METRIC_NAMES = {
    "caption": ("cider", "bleu4", "exact_match", "count"),
    "vqa": ("accuracy", "exact_match", "empty", "count"),
    "docvqa": ("anls", "exact_match", "empty", "count"),
    "ocr": ("anls", "exact_match", "empty", "count"),
    "refer_detect": ("acc@0.5", "acc@0.75", "box_miou", "unparsed", "count"),
    "refer_segment": ("miou", "acc@0.5", "acc@0.75", "box_miou", "unparsed", "count"),
    "detect": (
        "map",
        "map_50",
        "map_75",
        "precision@0.5",
        "recall@0.5",
        "unknown_labels",
        "unparsed",
        "count",
    ),
}
"""Every metric each task reports, as ``{task}/{name}``: what ``eval.best_metric`` may name
(tests/test_config.py checks it against what ``score_items`` really returns)."""

PREFERENCE_METRIC_NAMES = ("accuracy", "margin", "loss", "logp_accuracy", "count")
"""What evaluation reports on preference pairs (eval rows with a ``rejected`` answer), as
``preference/{name}``: ``accuracy`` (share of pairs whose implicit reward ranks the chosen answer
higher: ``β·(log π − log π_ref)``), ``margin`` (mean reward margin), ``loss`` (the recipe's ``dpo``
loss), ``logp_accuracy`` (share of pairs where the model alone gives the chosen answer the higher
log-probability) and ``count``. ``eval.best_metric`` may name them."""
