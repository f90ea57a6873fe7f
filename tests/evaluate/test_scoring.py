"""Per-task scoring: hand-computed values, parse counts, per-sample records, stable metric names."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pg_tune.data.sample import Sample
from pg_tune.evaluate.metrics import cider_d
from pg_tune.evaluate.scoring import Item, score, score_items, score_samples
from pg_tune.models.paligemma import PaliGemmaFamily
from pg_tune.models.paligemma.boxes import encode_box, encode_objects
from pg_tune.tasks import PRIMARY_METRIC

SIZE = (200, 100)  # width, height


def _loc(box) -> str:
    return encode_box(box, SIZE)


def test_caption_cider_bleu_and_exact_match_with_per_sample_scores():
    refs = [["a red circle", "a red round shape"], ["a blue square", "a square in blue"]]
    preds = ["a red circle", "a green triangle"]
    out = score_items([Item("caption", p, r) for p, r in zip(preds, refs, strict=True)], PaliGemmaFamily())
    expected, per_id = cider_d(dict(enumerate(preds)), dict(enumerate(refs)))
    assert out.metrics["caption/cider"] == pytest.approx(expected)
    assert out.metrics["caption/exact_match"] == 0.5
    assert 0.0 <= out.metrics["caption/bleu4"] <= 1.0
    assert [r["score"] for r in out.records] == pytest.approx([per_id[0], per_id[1]])
    assert out.records[0]["score"] > out.records[1]["score"] == pytest.approx(0.0)
    assert out.metrics["caption/count"] == 2.0


def test_vqa_accuracy_official_rule_and_single_answer_exact_match():
    items = [
        Item("vqa", "two", ["2"] * 3 + ["3"] * 7),  # 3 of 10 humans agree -> 0.9 (official rule)
        Item("vqa", "Yes.", ["yes"]),  # one answer: normalised exact match -> 1
        Item("vqa", "no", ["yes"]),  # -> 0
    ]
    out = score_items(items, PaliGemmaFamily())
    assert [r["score"] for r in out.records] == pytest.approx([0.9, 1.0, 0.0])
    assert out.metrics["vqa/accuracy"] == pytest.approx(1.9 / 3)


def test_vqa_three_answer_rows_from_jsonl_score_like_big_vision(tmp_path):
    # Custom VQA data with 3 answers (jsonl "references"): unanimous and right scores 1.0, not 0.67.
    from PIL import Image

    from pg_tune.data.bad_rows import BadRows
    from pg_tune.data.formats import BuildContext
    from pg_tune.data.formats.jsonl import JsonlOptions, build

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    rows = [
        {"image": "a.png", "prefix": "answer en what color?", "suffix": "red", "task": "vqa",
         "references": ["red", "red", "red"]},
        {"image": "a.png", "prefix": "answer en how many?", "suffix": "2", "task": "vqa",
         "references": ["2", "two", "3"]},
    ]  # fmt: skip
    (tmp_path / "vqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    samples = build(JsonlOptions(path=str(tmp_path / "vqa.jsonl")), BuildContext("eval", BadRows()))
    out = score_samples(samples, ["red", "2"], PaliGemmaFamily())
    assert [r["score"] for r in out.records] == pytest.approx([1.0, 2 / 3])


def test_docvqa_anls_hand_computed():
    # "helo" vs "hello": edit distance 1 over 5 chars -> 1 - 0.2 = 0.8; "xyz" vs "abc": NL 1 -> 0.
    out = score_items(
        [Item("docvqa", "helo", ["hello", "hi"]), Item("docvqa", "xyz", ["abc"])], PaliGemmaFamily()
    )
    assert [r["score"] for r in out.records] == pytest.approx([0.8, 0.0])
    assert out.metrics["docvqa/anls"] == pytest.approx(0.4)


def test_refer_detect_accuracy_iou_and_unparsed_predictions_count_as_misses():
    gt = (0, 0, 100, 100)
    ref = _loc(gt)
    items = [
        Item("refer_detect", ref + " cat", [ref], SIZE),  # IoU 1
        Item("refer_detect", _loc((0, 0, 100, 60)), [ref], SIZE),  # IoU 0.6
        Item("refer_detect", "a cat, I think", [ref], SIZE),  # unparseable -> 0
        Item("refer_detect", "<loc0001><loc0002>", [ref], SIZE),  # truncated -> 0
    ]
    out = score_items(items, PaliGemmaFamily())
    assert out.metrics["refer_detect/acc@0.5"] == 0.5
    assert out.metrics["refer_detect/acc@0.75"] == 0.25
    assert out.metrics["refer_detect/unparsed"] == 2.0
    scores = [r["score"] for r in out.records]
    assert (
        scores[0] == pytest.approx(1.0) and scores[1] == pytest.approx(0.6, abs=0.01) and scores[2:] == [0, 0]
    )
    assert out.records[0]["parsed"][0]["label"] == "cat"
    assert out.records[0]["parsed"][0]["box"] == pytest.approx([0, 0, 100, 100], abs=0.2)
    json.dumps(out.records)  # records are JSON-ready


def test_refer_segment_mask_miou_with_codec_and_box_fallback_without():
    from pg_tune.evaluate.metrics import mask_iou
    from pg_tune.models.paligemma.masks import MaskCodec, make_random_vae_weights

    codec = MaskCodec(make_random_vae_weights(seed=0))
    box = (20, 10, 120, 90)
    seg_a = "".join(f"<seg{c:03d}>" for c in range(16))
    seg_b = "".join(f"<seg{c:03d}>" for c in range(100, 116))
    ref = _loc(box) + seg_a
    items = [
        Item("refer_segment", ref, [ref], SIZE),  # identical -> mIoU 1
        Item("refer_segment", _loc(box) + seg_b, [ref], SIZE),  # same box, other codes
        Item("refer_segment", _loc(box), [ref], SIZE),  # box without mask codes: invalid -> 0
    ]
    out = score_items(items, PaliGemmaFamily(mask_codec=codec))
    gt_mask = codec.decode_mask(list(range(16)), out.records[0]["reference_parsed"][0]["box"], SIZE)
    other = codec.decode_mask(list(range(100, 116)), out.records[1]["parsed"][0]["box"], SIZE)
    expected = [1.0, mask_iou(other, gt_mask), 0.0]
    assert [r["score"] for r in out.records] == pytest.approx(expected)
    assert out.metrics["refer_segment/miou"] == pytest.approx(sum(expected) / 3)
    assert out.metrics["refer_segment/unparsed"] == 1.0
    assert out.metrics["refer_segment/acc@0.5"] == 1.0  # all three boxes are right

    no_codec = score_items(items, PaliGemmaFamily())
    assert "refer_segment/miou" not in no_codec.metrics
    assert any("vae" in note.lower() for note in no_codec.notes)
    assert no_codec.metrics["refer_segment/acc@0.5"] == 1.0


def test_detection_map_and_per_image_f1():
    truth = encode_objects([("cat", (0, 0, 100, 50)), ("dog", (100, 50, 200, 100))], SIZE)
    perfect = Item("detect", truth, [truth], SIZE)
    half = Item("detect", encode_objects([("cat", (0, 0, 100, 50))], SIZE), [truth], SIZE)
    garbage = Item("detect", "cat dog", [truth], SIZE)
    assert score_items([perfect], PaliGemmaFamily()).metrics["detect/map"] == pytest.approx(1.0)
    out = score_items([perfect, half, garbage], PaliGemmaFamily())
    assert [r["score"] for r in out.records] == pytest.approx([1.0, 2 / 3, 0.0])
    assert out.metrics["detect/unparsed"] == 1.0
    assert 0.0 < out.metrics["detect/map"] < 1.0


def test_score_for_the_training_loop_uses_stable_names_and_reads_image_sizes(tmp_path):
    from PIL import Image

    path = tmp_path / "img.png"
    Image.new("RGB", SIZE).save(path)
    ref = _loc((0, 0, 100, 100))
    samples = [
        Sample(image=path, prefix="caption en", suffix="a red circle", source="s[0]", task="caption"),
        Sample(image=path, prefix="cat", suffix=ref, source="s[1]", task="refer_detect"),
    ]
    metrics = score(samples, ["a red circle", ref], PaliGemmaFamily())
    assert metrics["caption/exact_match"] == 1.0
    assert metrics["refer_detect/acc@0.5"] == 1.0  # image size read from the file header
    assert PRIMARY_METRIC["refer_detect"] in metrics and PRIMARY_METRIC["caption"] in metrics
    records = score_samples(samples, ["x", "y"], PaliGemmaFamily()).records
    assert records[1]["image"] == str(path) and records[1]["image_size"] == list(SIZE)
    assert records[1]["source"] == "s[1]" and records[1]["prefix"] == "cat"


def test_bad_inputs_name_the_sample():
    with pytest.raises(ValueError, match="unknown task"):
        score_items([Item("captioning", "x", ["x"])], PaliGemmaFamily())
    with pytest.raises(ValueError, match="row 7.*image_size"):
        score_items([Item("refer_detect", "x", ["<loc0001>"], extra={"source": "row 7"})], PaliGemmaFamily())
    with pytest.raises(ValueError, match="row 8.*no <loc"):
        score_items(
            [Item("refer_detect", "x", ["a cat"], SIZE, extra={"source": "row 8"})], PaliGemmaFamily()
        )


def test_gt_mask_from_meta_is_used_instead_of_decoding_the_reference():
    from pg_tune.models.paligemma.masks import MaskCodec, make_random_vae_weights

    codec = MaskCodec(make_random_vae_weights(seed=1))
    box = (0, 0, 200, 100)
    ref = _loc(box) + "".join(f"<seg{c:03d}>" for c in range(16))
    empty = np.zeros((SIZE[1], SIZE[0]), dtype=bool)
    out = score_items(
        [Item("refer_segment", _loc(box), [ref], SIZE, gt_mask=empty)], PaliGemmaFamily(mask_codec=codec)
    )
    assert out.records[0]["score"] == 0.0  # no mask predicted: 0, even against an empty ground truth


def test_docvqa_test_split_rows_are_unscored_but_written(tmp_path):
    # SP-DocVQA's test_v1.0.json has no "answers" key; one val row (with answers) rides along.
    from pathlib import Path

    from pg_tune.data.bad_rows import BadRows
    from pg_tune.data.formats import BuildContext
    from pg_tune.data.formats.docvqa import DocvqaOptions, build
    from pg_tune.evaluate.predictions import read_predictions, rescore, write_predictions

    samples_dir = Path(__file__).resolve().parents[2] / "data_formats" / "samples" / "docvqa"
    val = json.loads((samples_dir / "val_v1.0.json").read_text(encoding="utf-8"))
    test_rows = [{k: v for k, v in row.items() if k != "answers"} for row in val["data"]]
    mixed = {**val, "dataset_split": "test", "data": [val["data"][0], *test_rows]}
    (tmp_path / "test_v1.0.json").write_text(json.dumps(mixed), encoding="utf-8")
    options = DocvqaOptions(annotations=str(tmp_path / "test_v1.0.json"), images=str(samples_dir))
    samples = build(options, BuildContext("eval", BadRows()))
    assert len(samples) == 3
    out = score_samples(samples, ["1/8/93", "1/8/93", "$ 42.00"], PaliGemmaFamily())
    # Before: the two test rows were scored against "" and pulled ANLS to 1/3.
    assert out.metrics["docvqa/anls"] == 1.0
    assert out.metrics["docvqa/unscored"] == 2.0 and out.metrics["docvqa/count"] == 1.0
    assert [r["score"] for r in out.records] == [1.0, None, None]
    assert [r["references"] for r in out.records][1:] == [[], []]
    path = write_predictions(tmp_path / "predictions.jsonl", out.records)
    assert [item.prediction for item in read_predictions(path)] == ["1/8/93", "1/8/93", "$ 42.00"]
    rescored, _ = rescore(path, PaliGemmaFamily())
    assert rescored.metrics == out.metrics


def test_only_unscored_rows_give_a_count_and_no_metric():
    out = score_items([Item("docvqa", "x", [])], PaliGemmaFamily())
    assert out.metrics == {"docvqa/unscored": 1.0}
    with pytest.raises(ValueError, match="no references"):
        score_items([Item("detect", "x", [], image_size=(10, 10))], PaliGemmaFamily())
