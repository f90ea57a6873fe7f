"""Per-task metrics over predictions, with a score and a parsed structure for every sample.

The metric family comes from the task (``Sample.task``)::

    caption        caption/cider, caption/bleu4 (pycocoevalcap's CIDEr-D and BLEU-4, PTB-tokenised)
    vqa            vqa/accuracy (VQAv2, official normalisation)
    docvqa         docvqa/anls
    ocr            ocr/anls
    refer_detect   refer_detect/acc@0.5, refer_detect/acc@0.75, refer_detect/box_miou (mean box IoU)
    refer_segment  refer_segment/miou (mask mIoU, needs the VQ-VAE), refer_segment/acc@0.5 (boxes)
    detect         detect/map, detect/map_50, detect/map_75 (COCO, pycocotools)

Text tasks also report ``{task}/exact_match``; every task reports ``{task}/count`` and, where
outputs are parsed (boxes, masks), ``{task}/unparsed``: how many predictions gave no usable box or
mask. Those count as misses (IoU 0), never as errors. ``PRIMARY_METRIC`` names the one number per
task to select checkpoints by. CIDEr is reported on pycocoevalcap's scale (papers multiply by 100).

``score(samples, predictions)`` returns the metrics (what the training loop logs);
``score_samples`` / ``score_items`` also return one record per sample (see
``data_formats/predictions.md``), which ``pg-tune eval`` writes to ``predictions.jsonl``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pg_tune.codecs.boxes import Detection, parse_detections
from pg_tune.data.sample import TASKS, Sample
from pg_tune.evaluate.metrics import (
    anls_score,
    bleu4,
    box_iou,
    cider_d,
    coco_map,
    mask_iou,
    normalize_vqa_answer,
    vqa_accuracy,
)

BOX_TASKS = ("detect", "refer_detect", "refer_segment")

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
    "detect": ("map", "map_50", "map_75", "unparsed", "count"),
}
"""Every metric each task reports, as ``{task}/{name}``: what ``eval.best_metric`` may name
(tests/test_config.py checks it against what ``score_items`` really returns)."""


@dataclass
class Item:
    """What scoring needs of one sample: the task, the generated text and every ground truth.

    ``image_size`` is (width, height) of the original image, needed to read boxes; ``gt_mask`` is an
    optional full-size boolean ground-truth mask for ``refer_segment`` (otherwise the reference's
    ``<seg>`` codes are decoded). ``extra`` is copied into the record unchanged (image, prefix, ...).
    """

    task: str
    prediction: str
    references: Sequence[str]
    image_size: tuple[int, int] | None = None
    gt_mask: np.ndarray | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Scored:
    """Corpus metrics, one JSON-ready record per item (input order), and notes for the reader."""

    metrics: dict[str, float]
    records: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)


def _normalise(text: str) -> str:
    return " ".join(text.lower().strip().rstrip(".").split())


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 when the prediction equals a reference after lowercasing and whitespace/final-period cleanup."""
    return float(any(_normalise(prediction) == _normalise(r) for r in references))


def detections_json(detections: Sequence[Detection]) -> list[dict[str, Any]]:
    return [
        {
            "label": d.label,
            "box": [round(v, 2) for v in d.box],
            "loc": list(d.loc),
            **({"seg": list(d.seg)} if d.seg is not None else {}),
        }
        for d in detections
    ]


def _require_size(item: Item, index: int) -> tuple[int, int]:
    if item.image_size is None:
        where = item.extra.get("source") or f"item {index}"
        raise ValueError(f"{where}: task {item.task!r} needs image_size [width, height] to read boxes")
    width, height = item.image_size
    return int(width), int(height)


def _reference_objects(item: Item, index: int) -> list[Detection]:
    size = _require_size(item, index)
    objects = parse_detections(item.references[0] if item.references else "", size)
    if not objects and item.task != "detect":
        where = item.extra.get("source") or f"item {index}"
        raise ValueError(
            f"{where}: reference {list(item.references)[:1]!r} of task {item.task!r} has no "
            f"<loc..>x4 box; referring tasks need one in the suffix"
        )
    return objects


def _score_caption(group: list[tuple[int, Item]], out: Scored) -> None:
    predictions = {i: item.prediction for i, item in group}
    references = {i: list(item.references) for i, item in group}
    cider, cider_per = cider_d(predictions, references)
    bleu, _ = bleu4(predictions, references)
    out.metrics["caption/cider"] = cider
    out.metrics["caption/bleu4"] = bleu
    out.metrics["caption/exact_match"] = float(
        np.mean([exact_match(item.prediction, item.references) for _, item in group])
    )
    for i, _ in group:
        out.records[i]["score"] = cider_per[i]


def _vqa_score(prediction: str, answers: Sequence[str]) -> float:
    # The official leave-one-out rule scores any answer against a single reference as 0 (no subset
    # keeps it), so one-answer datasets are scored by exact match after the official normalisation.
    if len(answers) == 1:
        return float(normalize_vqa_answer(prediction) == normalize_vqa_answer(answers[0]))
    return vqa_accuracy(prediction, answers)


def _score_text(task: str, group: list[tuple[int, Item]], out: Scored) -> None:
    if task == "vqa":
        name, fn = "vqa/accuracy", _vqa_score
    else:  # docvqa, ocr: average normalised Levenshtein similarity
        name, fn = f"{task}/anls", anls_score
    scores = []
    for i, item in group:
        scores.append(fn(item.prediction, list(item.references)))
        out.records[i]["score"] = scores[-1]
    out.metrics[name] = float(np.mean(scores))
    out.metrics[f"{task}/exact_match"] = float(
        np.mean([exact_match(item.prediction, item.references) for _, item in group])
    )
    out.metrics[f"{task}/empty"] = float(sum(not item.prediction.strip() for _, item in group))


def _score_referring(task: str, group: list[tuple[int, Item]], out: Scored, mask_codec: Any | None) -> None:
    ious, mask_ious, unparsed = [], [], 0
    for i, item in group:
        size = _require_size(item, i)
        gt = _reference_objects(item, i)[0]
        predicted = parse_detections(item.prediction, size)
        record = out.records[i]
        record["parsed"] = detections_json(predicted)
        record["reference_parsed"] = detections_json([gt])
        iou = box_iou(predicted[0].box, gt.box) if predicted else 0.0
        ious.append(iou)
        record["box_iou"] = iou
        ok = bool(predicted) and (task != "refer_segment" or predicted[0].seg is not None)
        unparsed += not ok
        if task == "refer_segment" and mask_codec is not None:
            gt_mask = item.gt_mask
            if gt_mask is None:
                if gt.seg is None:
                    where = item.extra.get("source") or f"item {i}"
                    raise ValueError(f"{where}: refer_segment reference has no 16 <seg..> codes")
                gt_mask = mask_codec.decode_mask(gt.seg, gt.box, size)
            pred_mask = None
            if predicted and predicted[0].seg is not None:
                pred_mask = mask_codec.decode_mask(predicted[0].seg, predicted[0].box, size)
            mask_ious.append(mask_iou(pred_mask, gt_mask))
            record["score"] = mask_ious[-1]
        else:
            record["score"] = iou
    for t in (0.5, 0.75):
        out.metrics[f"{task}/acc@{t}"] = float(np.mean([v >= t for v in ious]))
    out.metrics[f"{task}/box_miou"] = float(np.mean(ious))
    if task == "refer_segment":
        if mask_codec is not None:
            out.metrics["refer_segment/miou"] = float(np.mean(mask_ious))
        else:
            out.notes.append(
                "refer_segment: mask mIoU not computed (no VQ-VAE weights: set eval.vae_path or pass "
                "--vae-path vae-oid.npz); boxes scored instead (refer_segment/acc@0.5, box_miou)"
            )
    out.metrics[f"{task}/unparsed"] = float(unparsed)


def _f1_at_half(predicted: Sequence[Detection], truth: Sequence[Detection]) -> float:
    """Per-image F1 at IoU 0.5 (greedy, same label): a readable per-sample score for the gallery."""
    if not predicted and not truth:
        return 1.0
    used: set[int] = set()
    hits = 0
    for p in predicted:
        best, best_iou = None, 0.5
        for j, t in enumerate(truth):
            if j not in used and t.label == p.label and (iou := box_iou(p.box, t.box)) >= best_iou:
                best, best_iou = j, iou
        if best is not None:
            used.add(best)
            hits += 1
    return 2 * hits / (len(predicted) + len(truth))


def _score_detect(group: list[tuple[int, Item]], out: Scored) -> None:
    preds, truths, unparsed = [], [], 0
    for i, item in group:
        size = _require_size(item, i)
        truth = _reference_objects(item, i)
        predicted = parse_detections(item.prediction, size)
        unparsed += bool(item.prediction.strip()) and not predicted
        record = out.records[i]
        record["parsed"] = detections_json(predicted)
        record["reference_parsed"] = detections_json(truth)
        record["score"] = _f1_at_half(predicted, truth)
        preds.append([(d.label, d.box, None) for d in predicted])
        truths.append([(d.label, d.box) for d in truth])
    if any(truths):
        stats = coco_map(preds, truths)
        for name in ("map", "map_50", "map_75"):
            out.metrics[f"detect/{name}"] = stats[name]
    else:
        out.notes.append("detect: no ground-truth boxes in any reference; mAP not computed")
    out.metrics["detect/unparsed"] = float(unparsed)


def score_items(items: Sequence[Item], mask_codec: Any | None = None) -> Scored:
    """Metrics per task plus one record per item; unparseable predictions are counted, never raised."""
    records = [
        {
            **item.extra,
            "task": item.task,
            "prediction": item.prediction,
            "references": list(item.references),
            **({"image_size": list(item.image_size)} if item.image_size is not None else {}),
            "parsed": None,
            "score": None,
        }
        for item in items
    ]
    out = Scored(metrics={}, records=records)
    by_task: dict[str, list[tuple[int, Item]]] = {}
    for i, item in enumerate(items):
        if item.task not in TASKS:
            raise ValueError(f"item {i}: unknown task {item.task!r} (one of {', '.join(TASKS)})")
        if not item.references:
            where = item.extra.get("source") or f"item {i}"
            raise ValueError(f"{where}: no references to score against")
        by_task.setdefault(item.task, []).append((i, item))
    for task, group in sorted(by_task.items()):
        if task == "caption":
            _score_caption(group, out)
        elif task in ("vqa", "docvqa", "ocr"):
            _score_text(task, group, out)
        elif task in ("refer_detect", "refer_segment"):
            _score_referring(task, group, out, mask_codec)
        else:
            _score_detect(group, out)
        out.metrics[f"{task}/count"] = float(len(group))
    for record in records:
        if isinstance(record["score"], float) and not math.isfinite(record["score"]):
            record["score"] = None
    return out


def sample_item(sample: Sample, prediction: str) -> Item:
    """An ``Item`` for a dataset sample; box tasks read the image size from ``meta`` or the file header."""
    size = sample.meta.get("image_size")
    if size is None and sample.task in BOX_TASKS:
        from pg_tune.data.images import image_size

        size = image_size(sample.image, sample.source)
    gt_mask = sample.meta.get("mask")
    return Item(
        task=sample.task,
        prediction=prediction,
        references=sample.all_references,
        image_size=tuple(size) if size is not None else None,
        gt_mask=np.asarray(gt_mask, dtype=bool) if gt_mask is not None else None,
        extra={
            "source": sample.source,
            "image": str(sample.image) if isinstance(sample.image, (str, Path)) else None,
            "prefix": sample.prefix,
        },
    )


def score_samples(
    samples: Sequence[Sample], predictions: Sequence[str], mask_codec: Any | None = None
) -> Scored:
    """``score_items`` for dataset samples and their generated texts (same order)."""
    if len(samples) != len(predictions):
        raise ValueError(f"got {len(predictions)} predictions for {len(samples)} samples")
    return score_items([sample_item(s, p) for s, p in zip(samples, predictions, strict=True)], mask_codec)


def score(
    samples: Sequence[Sample], predictions: Sequence[str], mask_codec: Any | None = None
) -> dict[str, float]:
    """Metrics per task, named ``{task}/{metric}`` (what the training loop logs)."""
    return score_samples(samples, predictions, mask_codec).metrics


def load_mask_codec(vae_path: str | Path | None) -> Any | None:
    """The mask VQ-VAE from ``vae_path`` or the local cache, or None; never downloads.

    Evaluation must not reach the network on its own, so without a file it scores boxes only.
    """
    from pg_tune.codecs import masks

    if vae_path is not None:
        if not Path(vae_path).is_file():
            raise FileNotFoundError(f"VQ-VAE weights not found: {vae_path} (big_vision's vae-oid.npz)")
        return masks.MaskCodec.from_npz(vae_path)
    cached = masks._default_cache_dir() / masks.VAE_FILENAME
    return masks.MaskCodec.load(cached) if cached.is_file() else None
