"""Per-task metrics over predictions, with a score and a parsed structure for every sample.

The metric family comes from the task (``Sample.task``)::

    caption        caption/cider, caption/bleu4 (pycocoevalcap's CIDEr-D and BLEU-4, PTB-tokenised)
    vqa            vqa/accuracy (VQAv2, official normalisation)
    docvqa         docvqa/anls
    ocr            ocr/anls
    refer_detect   refer_detect/acc@0.5, refer_detect/acc@0.75, refer_detect/box_miou (mean box IoU)
    refer_segment  refer_segment/miou (mask mIoU, needs the VQ-VAE), refer_segment/acc@0.5 (boxes)
    detect         detect/map, detect/map_50, detect/map_75 (COCO, pycocotools; boxes ranked by
                   token log-probabilities), detect/precision@0.5, recall@0.5, unknown_labels

Box and mask tasks are scored against the sample's TRUE ground truth (``Sample.targets``: pixel
boxes of the original image, real masks rasterised from polygons/RLE at the original resolution),
never against a quantised ``<loc>`` rendering or a VQ-VAE reconstruction. Predictions are parsed by
the model family (``ModelFamily.parse_output``); for PaliGemma's referring tasks that is big_vision's
rule (only the first 4 output tokens make the box; a non-location token or ``ymax <= ymin`` /
``xmax <= xmin`` is a miss). A referring row with several reference objects (custom ``segment``
rows) matches predicted to reference objects by IoU (Hungarian) and scores every one:
``sum(matched IoU) / max(#references, #predictions)``. Items without targets (old prediction files)
fall back to reading the ground truth from the reference text.

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

from pg_tune.data.sample import ObjectTarget, Sample, targets_json
from pg_tune.evaluate.metrics import (
    anls_score,
    bleu4,
    box_iou,
    cider_d,
    coco_map,
    mask_iou,
    matches_at,
    vqa_accuracy,
)
from pg_tune.models.family import ModelFamily, ParsedObject
from pg_tune.tasks import BOX_TASKS, TASKS, TEXT_TASKS


@dataclass
class Item:
    """What scoring needs of one sample: the task, the generated text and every ground truth.

    ``image_size`` is (width, height) of the original image, needed to read boxes; ``objects`` the
    true ground-truth objects (pixel boxes, real masks) of box and mask tasks; ``gt_mask`` an optional
    full-size boolean mask overriding the first object's. Without ``objects`` the ground truth is read
    from ``references[0]`` by the family's parser (quantised; only for old prediction files).
    ``token_logprobs`` (optional, ``(start, end, logprob)`` per generated token) give each detection
    a confidence. ``extra`` is copied into the record.
    """

    task: str
    prediction: str
    references: Sequence[str]
    image_size: tuple[int, int] | None = None
    gt_mask: np.ndarray | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    objects: Sequence[ObjectTarget] = ()
    token_logprobs: Sequence[tuple[int, int, float]] | None = None


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


def objects_json(objects: Sequence[ParsedObject]) -> list[dict[str, Any]]:
    """Parsed objects as JSON: label, pixel box, score when known, and the family's raw tokens."""
    return [
        {
            "label": o.label,
            "box": [round(v, 2) for v in o.box],
            **({"score": round(o.score, 4)} if o.score is not None else {}),
            **dict(o.tokens or {}),
        }
        for o in objects
    ]


def _require_size(item: Item, index: int) -> tuple[int, int]:
    if item.image_size is None:
        where = item.extra.get("source") or f"item {index}"
        raise ValueError(f"{where}: task {item.task!r} needs image_size [width, height] to read boxes")
    width, height = item.image_size
    return int(width), int(height)


@dataclass
class _Truth:
    """One ground-truth object as scoring uses it: a pixel box and, lazily, a full-size mask."""

    label: str
    box: tuple[float, float, float, float]
    target: ObjectTarget | None = None
    mask_array: np.ndarray | None = None
    tokens: dict[str, Any] | None = None

    def mask(self, size: tuple[int, int], mask_codec: Any | None) -> np.ndarray | None:
        if self.mask_array is None and self.target is not None:
            self.mask_array = self.target.rasterise(size)
        if self.mask_array is None and self.tokens and "seg" in self.tokens and mask_codec is not None:
            # Old prediction files only: the reference's own <seg> codes, decoded (a reconstruction).
            self.mask_array = mask_codec.decode_mask(self.tokens["seg"], self.box, size)
        return self.mask_array


def _truth(item: Item, index: int, family: ModelFamily) -> list[_Truth]:
    size = _require_size(item, index)
    if item.objects:
        truth = [_Truth(o.label, tuple(float(v) for v in o.box), o) for o in item.objects]
    else:
        text = item.references[0] if item.references else ""
        parsed = family.parse_output(text, "detect", size)
        truth = [_Truth(o.label, o.box, tokens=dict(o.tokens or {})) for o in parsed]
    if item.gt_mask is not None and truth:
        truth[0].mask_array = np.asarray(item.gt_mask, dtype=bool)
    if not truth and item.task != "detect":
        where = item.extra.get("source") or f"item {index}"
        raise ValueError(
            f"{where}: task {item.task!r} has no reference object (no targets and no <loc..>x4 box in "
            f"{list(item.references)[:1]!r}); referring tasks need one"
        )
    return truth


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
    # One rule per answer count (10: official, 1: exact match, else min(matches/3, 1)): see metrics/vqa.py.
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


def _match(values: np.ndarray) -> list[tuple[int, int]]:
    """Hungarian matching maximising the summed ``values[pred, ref]``; pairs with value 0 are dropped."""
    from scipy.optimize import linear_sum_assignment

    if values.size == 0:
        return []
    rows, cols = linear_sum_assignment(values, maximize=True)
    return [(int(r), int(c)) for r, c in zip(rows, cols, strict=True) if values[r, c] > 0]


def _score_referring(task: str, group: list[tuple[int, Item]], out: Scored, family: ModelFamily) -> None:
    """Box accuracy / box mIoU and (with the VQ-VAE) mask mIoU against the true ground truth."""
    hits = {0.5: [], 0.75: []}
    ious, mask_ious, unparsed = [], [], 0
    mask_codec = family.mask_codec
    with_masks = task == "refer_segment" and mask_codec is not None
    for i, item in group:
        size = _require_size(item, i)
        truth = _truth(item, i, family)
        predicted = family.parse_output(item.prediction, task, size, item.token_logprobs)
        record = out.records[i]
        record["parsed"] = objects_json(predicted)
        record["reference_parsed"] = [{"label": t.label, "box": [round(v, 2) for v in t.box]} for t in truth]
        ok = bool(predicted) and (
            task != "refer_segment" or (predicted[0].tokens or {}).get("seg") is not None
        )
        unparsed += not ok
        if len(truth) == 1:
            # big_vision: one expression, one answer: the first object of the output, nothing else.
            pairs = [(0, 0)] if predicted else []
            denominator = 1
        else:
            box_values = np.array([[box_iou(p.box, t.box) for t in truth] for p in predicted]).reshape(
                len(predicted), len(truth)
            )
            pairs = _match(box_values)
            denominator = max(len(truth), len(predicted))
        box_scores = [box_iou(predicted[p].box, truth[t].box) for p, t in pairs]
        iou = sum(box_scores) / denominator
        ious.append(iou)
        for threshold in hits:
            hits[threshold].append(sum(v >= threshold for v in box_scores) / denominator)
        record["box_iou"] = iou
        if with_masks:
            mask_scores = []
            for p, t in pairs:
                gt_mask = truth[t].mask(size, mask_codec)
                if gt_mask is None:
                    where = item.extra.get("source") or f"item {i}"
                    raise ValueError(f"{where}: refer_segment reference has no mask to score against")
                mask_scores.append(mask_iou(predicted[p].mask, gt_mask))
            mask_ious.append(sum(mask_scores) / denominator)
            record["score"] = mask_ious[-1]
        else:
            record["score"] = iou
    for threshold, values in hits.items():
        out.metrics[f"{task}/acc@{threshold}"] = float(np.mean(values))
    out.metrics[f"{task}/box_miou"] = float(np.mean(ious))
    if task == "refer_segment":
        if with_masks:
            out.metrics["refer_segment/miou"] = float(np.mean(mask_ious))
        else:
            out.notes.append(
                "refer_segment: mask mIoU not computed (no VQ-VAE weights: set model.vae_path or pass "
                "--vae-path vae-oid.npz); boxes scored instead (refer_segment/acc@0.5, box_miou)"
            )
    out.metrics[f"{task}/unparsed"] = float(unparsed)


def _f1_at_half(predicted: Sequence[ParsedObject], truth: Sequence[_Truth]) -> float:
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


def _score_detect(group: list[tuple[int, Item]], out: Scored, family: ModelFamily) -> None:
    # Rules (box confidences from token log-probabilities, crowd regions, labels outside the
    # category set): pg_tune.evaluate.metrics.detection's module docstring and docs/evaluation.md.
    preds, truths, crowds, unparsed, unscored = [], [], [], 0, 0
    categories: set[str] = set()
    for i, item in group:
        size = _require_size(item, i)
        truth = _truth(item, i, family)
        crowd = [(c["label"], tuple(c["box"])) for c in item.extra.get("crowd") or ()]
        categories.update(item.extra.get("categories") or ())
        categories.update(t.label for t in truth)
        categories.update(label for label, _ in crowd)
        predicted = family.parse_output(item.prediction, "detect", size, item.token_logprobs)
        unscored += sum(d.score is None for d in predicted)
        unparsed += bool(item.prediction.strip()) and not predicted
        record = out.records[i]
        record["parsed"] = objects_json(predicted)
        record["reference_parsed"] = [{"label": t.label, "box": [round(v, 2) for v in t.box]} for t in truth]
        record["score"] = _f1_at_half(predicted, truth)
        preds.append([(d.label, d.box, d.score) for d in predicted])
        truths.append([(d.label, d.box) for d in truth])
        crowds.append(crowd)
    if any(truths):
        stats = coco_map(preds, truths, crowds=crowds)
        for name in ("map", "map_50", "map_75"):
            out.metrics[f"detect/{name}"] = stats[name]
        counts = [matches_at(p, t, c) for p, t, c in zip(preds, truths, crowds, strict=True)]
        hits, false, n_truth = (sum(column) for column in zip(*counts, strict=True))
        out.metrics["detect/precision@0.5"] = hits / (hits + false) if hits + false else 0.0
        out.metrics["detect/recall@0.5"] = hits / n_truth
    else:
        out.notes.append("detect: no ground-truth boxes in any reference; mAP not computed")
    out.metrics["detect/unparsed"] = float(unparsed)
    out.metrics["detect/unknown_labels"] = float(
        sum(label not in categories for image in preds for label, _, _ in image)
    )
    if unscored:
        out.notes.append(
            f"detect: {unscored} boxes have no token log-probabilities (e.g. a predictions file "
            "without token_logprobs); they were ranked with score 1.0, so mAP depends on their order"
        )


def score_items(items: Sequence[Item], family: ModelFamily) -> Scored:
    """Metrics per task plus one record per item; unparseable predictions are counted, never raised.

    The model ``family`` that wrote the predictions parses them (masks through its bound mask codec;
    each record names it, so a predictions file re-scores with the same parser). A text-task item
    with no references (e.g. a DocVQA test question) is not scored: its record keeps ``score: None``,
    it is left out of the task's metrics and counted in ``{task}/unscored``.
    """
    records = [
        {
            **item.extra,
            "family": family.name,
            "task": item.task,
            "prediction": item.prediction,
            "references": list(item.references),
            **({"reference_objects": targets_json(item.objects)} if item.objects else {}),
            **({"image_size": list(item.image_size)} if item.image_size is not None else {}),
            "parsed": None,
            "score": None,
        }
        for item in items
    ]
    out = Scored(metrics={}, records=records)
    by_task: dict[str, list[tuple[int, Item]]] = {}
    unscored: dict[str, int] = {}
    for i, item in enumerate(items):
        if item.task not in TASKS:
            raise ValueError(f"item {i}: unknown task {item.task!r} (one of {', '.join(TASKS)})")
        if not item.references and not item.objects:
            if item.task in TEXT_TASKS:
                unscored[item.task] = unscored.get(item.task, 0) + 1
                by_task.setdefault(item.task, [])
                continue
            where = item.extra.get("source") or f"item {i}"
            raise ValueError(f"{where}: no references to score against")
        by_task.setdefault(item.task, []).append((i, item))
    for task, group in sorted(by_task.items()):
        if task in unscored:
            out.metrics[f"{task}/unscored"] = float(unscored[task])
            out.notes.append(f"{task}: {unscored[task]} rows have no ground truth (not scored)")
        if not group:
            continue
        if task == "caption":
            _score_caption(group, out)
        elif task in ("vqa", "docvqa", "ocr"):
            _score_text(task, group, out)
        elif task in ("refer_detect", "refer_segment"):
            _score_referring(task, group, out, family)
        else:
            _score_detect(group, out, family)
        out.metrics[f"{task}/count"] = float(len(group))
    for record in records:
        if isinstance(record["score"], float) and not math.isfinite(record["score"]):
            record["score"] = None
    return out


def sample_item(
    sample: Sample, prediction: str, token_logprobs: Sequence[tuple[int, int, float]] | None = None
) -> Item:
    """An ``Item`` for a dataset sample; box tasks read the image size from the sample or the file header."""
    size = sample.image_size or sample.meta.get("image_size")
    if size is None and sample.task in BOX_TASKS:
        from pg_tune.data.images import image_size

        size = image_size(sample.image, sample.source)
    gt_mask = sample.meta.get("mask")
    # No references, suffix or targets: no ground truth at all (a DocVQA test row): not scored.
    has_truth = bool(sample.references) or bool(sample.suffix) or bool(sample.targets)
    detect_extra = {}
    if sample.task == "detect":
        # What detection scoring needs beyond text, carried in the record so a predictions file
        # re-scores to the same numbers: token log-probabilities (box confidences), crowd regions.
        detect_extra = {
            "token_logprobs": [list(t) for t in token_logprobs] if token_logprobs else None,
            "crowd": [{"label": label, "box": list(box)} for label, box in sample.meta.get("crowd", ())],
            "categories": list(sample.meta.get("categories", ())),
        }
    return Item(
        task=sample.task,
        prediction=str(prediction),
        references=() if (sample.targets and not sample.suffix) or not has_truth else sample.all_references,
        image_size=tuple(size) if size is not None else None,
        gt_mask=np.asarray(gt_mask, dtype=bool) if gt_mask is not None else None,
        objects=sample.targets,
        token_logprobs=token_logprobs,
        extra={
            "source": sample.source,
            "image": str(sample.image) if isinstance(sample.image, (str, Path)) else None,
            "prefix": sample.prefix,
            **detect_extra,
        },
    )


def score_samples(
    samples: Sequence[Sample],
    predictions: Sequence[str],
    family: ModelFamily,
    token_logprobs: Sequence[Sequence[tuple[int, int, float]] | None] | None = None,
) -> Scored:
    """``score_items`` for dataset samples and their generated texts (same order).

    ``token_logprobs`` (optional, one ``(start, end, logprob)`` sequence per prediction,
    ``Generated.scored_tokens()``) give each detection a confidence.
    """
    if len(samples) != len(predictions):
        raise ValueError(f"got {len(predictions)} predictions for {len(samples)} samples")
    logprobs = token_logprobs if token_logprobs is not None else [None] * len(samples)
    items = [sample_item(s, p, lp) for s, p, lp in zip(samples, predictions, logprobs, strict=True)]
    return score_items(items, family)


def score(
    samples: Sequence[Sample],
    predictions: Sequence[str],
    family: ModelFamily,
) -> dict[str, float]:
    """Metrics per task, named ``{task}/{metric}`` (what the training loop logs)."""
    return score_samples(samples, predictions, family).metrics
