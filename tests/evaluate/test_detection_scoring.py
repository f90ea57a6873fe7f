"""COCO detection scoring on the shipped COCO sample: box confidences from token log-probabilities,
crowd regions ignored, invented labels counted; mAP checked against pycocotools on the raw file."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from pg_tune.data.bad_rows import BadRows
from pg_tune.data.formats import BuildContext
from pg_tune.data.formats.coco_detection import CocoDetectionOptions, build
from pg_tune.evaluate.metrics import coco_map
from pg_tune.evaluate.predictions import rescore, write_predictions
from pg_tune.evaluate.scoring import score_samples as _score_samples
from pg_tune.models.paligemma import PaliGemmaFamily
from pg_tune.models.paligemma.boxes import encode_box, parse_detections

COCO_DIR = Path(__file__).resolve().parents[2] / "data_formats" / "samples" / "coco_detection"
ANNOTATIONS = COCO_DIR / "instances_val2017.json"


@pytest.fixture(scope="module")
def samples():
    options = CocoDetectionOptions(annotations=str(ANNOTATIONS), images=str(COCO_DIR / "images"))
    rows = build(options, BuildContext("eval", BadRows()))
    assert [s.meta["image_id"] for s in rows] == [139, 285]
    return rows


class Generation(str):
    """A prediction with its ``(start, end, logprob)`` tokens, as ``Generated.scored_tokens()`` gives."""

    def __new__(cls, text, token_logprobs):
        obj = super().__new__(cls, text)
        obj.token_logprobs = token_logprobs
        return obj


PG = PaliGemmaFamily()


def score_samples(samples, texts, family=PG):
    logprobs = [getattr(t, "token_logprobs", None) for t in texts]
    return _score_samples(samples, [str(t) for t in texts], family, token_logprobs=logprobs)


def _generation(sample, objects) -> Generation:
    """Model output writing ``objects`` [(label, box, p)]: every token of an object at probability p."""
    size = sample.image_size
    parts, logprobs, cursor = [], [], 0
    for k, (label, box, p) in enumerate(objects):
        if k:
            parts.append(" ;")
            logprobs.append((cursor, cursor + 2, math.log(0.5)))  # separators belong to no object
            cursor += 2
        pieces = [f"<loc{b:04d}>" for b in _bins(encode_box(box, size))] + [f" {label}"]
        if k:
            pieces[0] = " " + pieces[0]
        for piece in pieces:
            parts.append(piece)
            logprobs.append((cursor, cursor + len(piece), math.log(p)))
            cursor += len(piece)
    return Generation("".join(parts), logprobs)


def _bins(tokens: str) -> list[int]:
    return [int(tokens[i + 4 : i + 8]) for i in range(0, len(tokens), 9)]


CAT, DOG = (8, 10, 38, 50), (52, 20, 88, 50)  # image 139 (and a crowd of dogs along its bottom)
DOG_285 = (20, 16, 64, 64)
CROWD = (0, 50, 96, 64)


def _outputs(samples, crowd_box=False, invented=False):
    first = [("cat", CAT, 0.9), ("dog", DOG, 0.8), ("dog", (60, 0, 90, 12), 0.2)]  # last: a miss
    if crowd_box:
        first.append(("dog", (2, 52, 40, 63), 0.95))  # inside the crowd region
    if invented:
        first.append(("unicorn", (40, 0, 60, 20), 0.99))
    return [_generation(samples[0], first), _generation(samples[1], [("dog", DOG_285, 0.7)])]


def test_map_does_not_depend_on_image_order(samples):
    texts = _outputs(samples)
    forward = score_samples(samples, texts, PaliGemmaFamily()).metrics["detect/map"]
    backward = score_samples(samples[::-1], texts[::-1], PaliGemmaFamily()).metrics["detect/map"]
    assert forward == pytest.approx(backward, abs=1e-12)
    # Without confidences (the old rule: every box 1.0) the same boxes score differently per order.
    plain = [str(t) for t in texts]  # no token_logprobs
    old_forward = score_samples(samples, plain, PaliGemmaFamily()).metrics["detect/map"]
    old_backward = score_samples(samples[::-1], plain[::-1], PaliGemmaFamily()).metrics["detect/map"]
    assert abs(old_forward - old_backward) > 0.01


def _pycocotools_map(texts, samples) -> float:
    """COCOeval on the raw annotation file (polygons, RLE crowd, iscrowd) with the same boxes."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ANNOTATIONS))
        names = {c["name"]: c["id"] for c in gt.dataset["categories"]}
        unknown = max(names.values()) + 1
        results = []
        for text, sample in zip(texts, samples, strict=True):
            for d in parse_detections(text, sample.image_size):
                x0, y0, x1, y1 = d.box
                results.append(
                    {
                        "image_id": sample.meta["image_id"],
                        "category_id": names.get(d.label, unknown),
                        "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "score": _confidence(text, d),
                    }
                )
        evaluator = COCOeval(gt, gt.loadRes(results), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return float(evaluator.stats[0])


def _confidence(text, detection) -> float:
    from pg_tune.evaluate.metrics import object_confidence
    from pg_tune.models.paligemma.boxes import parse_detection_spans

    for d, span in parse_detection_spans(text, (1, 1)):
        if d.loc == detection.loc and d.label == detection.label:
            return object_confidence(span, text.token_logprobs)
    raise AssertionError(detection)


def test_crowd_regions_are_ignored_as_pycocotools_does(samples):
    base = score_samples(samples, _outputs(samples), PaliGemmaFamily()).metrics
    with_crowd_box = _outputs(samples, crowd_box=True)
    scored = score_samples(samples, with_crowd_box, PaliGemmaFamily()).metrics
    # The confident box on the crowd is neither a hit nor a false positive: mAP is unchanged ...
    assert scored["detect/map"] == pytest.approx(base["detect/map"], abs=1e-12)
    assert scored["detect/precision@0.5"] == base["detect/precision@0.5"]
    # ... and equals COCOeval on the raw file, where the crowd region is an iscrowd=1 RLE annotation.
    assert scored["detect/map"] == pytest.approx(_pycocotools_map(with_crowd_box, samples), abs=1e-9)
    # Old rule (crowd dropped from the ground truth) made it a top-ranked false positive.
    truths = [[(o.label, o.box) for o in s.targets] for s in samples]
    preds = [[(d.label, d.box, _confidence(t, d)) for d in parse_detections(t, s.image_size)]
             for t, s in zip(with_crowd_box, samples, strict=True)]  # fmt: skip
    assert coco_map(preds, truths)["map"] < scored["detect/map"] - 0.01


def test_invented_labels_are_counted_not_dropped(samples):
    base = score_samples(samples, _outputs(samples), PaliGemmaFamily()).metrics
    texts = _outputs(samples, invented=True)
    scored = score_samples(samples, texts, PaliGemmaFamily())
    metrics = scored.metrics
    # pycocotools averages AP over categories with ground truth: the invented one cannot move mAP ...
    assert metrics["detect/map"] == pytest.approx(base["detect/map"], abs=1e-12)
    assert metrics["detect/map"] == pytest.approx(_pycocotools_map(texts, samples), abs=1e-9)
    # ... so pg_tune counts it where it can: a false positive at IoU 0.5, and by name.
    assert metrics["detect/unknown_labels"] == 1.0 and base["detect/unknown_labels"] == 0.0
    assert metrics["detect/precision@0.5"] == pytest.approx(3 / 5)  # 3 hits; the miss + unicorn
    assert base["detect/precision@0.5"] == pytest.approx(3 / 4)
    assert [o["label"] for o in scored.records[0]["parsed"]][-1] == "unicorn"


def test_box_scores_are_written_and_rescored_identically(samples, tmp_path):
    texts = _outputs(samples, crowd_box=True, invented=True)
    scored = score_samples(samples, texts, PaliGemmaFamily())
    parsed = scored.records[0]["parsed"]
    assert [round(o["score"], 6) for o in parsed] == [0.9, 0.8, 0.2, 0.95, 0.99]
    path = write_predictions(tmp_path / "predictions.jsonl", scored.records)
    line = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
    assert line["crowd"] == [{"label": "dog", "box": [0.0, 50.0, 96.0, 64.0]}]
    again, _ = rescore(path, PaliGemmaFamily())
    assert again.metrics == scored.metrics
