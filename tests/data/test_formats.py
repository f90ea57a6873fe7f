"""Each adapter on its tiny real-format sample: prompts, targets, references, sizes, bad rows."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest

from pg_tune.config.schema import from_dict
from pg_tune.data.bad_rows import BadRows
from pg_tune.data.formats import FORMATS, BuildContext
from pg_tune.data.sample import DataError
from pg_tune.models.paligemma import PaliGemmaFamily
from pg_tune.models.paligemma.boxes import parse_detections
from pg_tune.models.paligemma.masks import load_codec

PALIGEMMA = PaliGemmaFamily()


def build(fmt: str, stage: str = "train", policy: str = "stop", seed: int = 0, vae_path=None, **options):
    """Build ``fmt`` for ``stage`` (train/eval); ``options`` are the recipe keys (``split`` included).

    Structured rows come back with ``suffix`` set to PaliGemma's rendering of their targets (with the
    VQ-VAE at ``vae_path``), so the strings below pin big_vision's encodings byte for byte.
    """
    bad = BadRows(policy)
    opts = from_dict(FORMATS[fmt].options, options, fmt)
    rows = list(FORMATS[fmt].build(opts, BuildContext(split=stage, bad_rows=bad, seed=seed)))
    codec = load_codec(vae_path) if vae_path else None
    return [
        dataclasses.replace(r, suffix=PaliGemmaFamily(mask_codec=codec).render_target(r)) if r.targets else r
        for r in rows
    ], bad


def test_coco_captions_train_pairs_and_eval_references(samples_dir):
    d = samples_dir / "coco_captions"
    kw = dict(annotations=str(d / "captions_val2017.json"), images=str(d / "images"))
    train, _ = build("coco_captions", **kw)
    assert len(train) == 5 and {s.prefix for s in train} == {"caption en"}
    assert train[0].suffix == "A red cat sits beside a blue dog."
    assert "group" not in train[0].meta
    grouped, _ = build("coco_captions", train_pairs="one_per_image", **kw)
    assert {s.meta["group"] for s in grouped} == {
        f"{d / 'captions_val2017.json'}#139",
        f"{d / 'captions_val2017.json'}#285",
    }
    evals, _ = build("coco_captions", stage="eval", prompt="cap en", **kw)
    assert [len(s.references) for s in evals] == [3, 2]
    assert evals[0].prefix == "cap en" and evals[0].task == "caption"


def test_coco_detection_prompts_boxes_and_options(samples_dir):
    d = samples_dir / "coco_detection"
    kw = dict(annotations=str(d / "instances_val2017.json"), images=str(d / "images"))
    rows, _ = build("coco_detection", **kw)
    first = rows[0]
    assert first.prefix == "detect cat ; dog" and first.task == "detect"
    assert first.image_size == (96, 64)
    # cat bbox [8, 10, 30, 40] in a 96x64 image: y0 = 10/64*1023 = 159.8 -> 160, x0 = 8/96*1023 = 85.25 -> 85
    assert (
        first.suffix == "<loc0160><loc0085><loc0799><loc0405> cat ; <loc0320><loc0554><loc0799><loc0938> dog"
    )
    dets = parse_detections(first.suffix, first.image_size)
    assert [d.label for d in dets] == ["cat", "dog"] and dets[0].box[0] == pytest.approx(8, abs=0.1)
    only_dog, _ = build("coco_detection", classes=["dog"], prompt_classes="all", **kw)
    assert [s.prefix for s in only_dog] == ["detect dog", "detect dog"]
    with_crowd, _ = build("coco_detection", classes=["dog"], crowd="keep", **kw)
    assert with_crowd[0].suffix.count("dog") == 2
    ordered, _ = build("coco_detection", order="largest_first", max_objects=1, **kw)
    assert ordered[0].suffix.endswith(" cat") and ";" not in ordered[0].suffix  # 30x40 beats 36x30
    everything, _ = build(
        "coco_detection",
        prompt="detect {classes}",
        classes=["cat"],
        prompt_classes="all",
        keep_empty=True,
        stage="eval",
        **kw,
    )
    assert [s.suffix.count("cat") for s in everything] == [1, 0]
    with pytest.raises(DataError, match="not in the file's categories"):
        build("coco_detection", classes=["zebra"], **kw)


def test_coco_detection_clips_and_counts_bad_boxes(samples_dir, tmp_path):
    d = samples_dir / "coco_detection"
    data = json.loads((d / "instances_val2017.json").read_text())
    data["annotations"][0]["bbox"] = [-10, 10, 30, 40]  # sticks out on the left
    data["annotations"][1]["bbox"] = [52, 20, 0, 30]  # zero width
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    rows, bad = build("coco_detection", policy="skip", annotations=str(path), images=str(d / "images"))
    assert bad.counts == {"box_clipped": 1, "degenerate_box": 1}
    assert (
        "[annotations][1]" in bad.examples["degenerate_box"][0]
        and "'bbox'" in bad.examples["degenerate_box"][0]
    )
    assert rows[0].suffix.startswith("<loc0160><loc0000>")
    with pytest.raises(DataError, match=r"\[annotations\]\[1\].*no area"):
        build("coco_detection", policy="stop", annotations=str(path), images=str(d / "images"))


def test_malformed_annotation_json_names_the_line(tmp_path):
    path = tmp_path / "captions.json"
    path.write_text('{\n "images": [],\n "annotations": [,]\n}')
    with pytest.raises(DataError, match=r"captions.json:3: malformed JSON"):
        build("coco_captions", annotations=str(path), images=str(tmp_path))


def test_refcoco_detect_from_pickle_and_parquet_agree(samples_dir):
    d = samples_dir / "refcoco"
    from_pickle, _ = build(
        "refcoco",
        refs=str(d / "refs(unc).p"),
        instances=str(d / "instances.json"),
        images=str(d / "images"),
        split="val",
    )
    from_parquet, _ = build(
        "refcoco",
        parquet=str(d / "refcoco_val.parquet"),
        images=str(d),
        columns={"image": "image_path", "box": "bbox", "expression": "sentences"},
        split="val",
    )
    assert [(s.prefix, s.suffix) for s in from_pickle] == [(s.prefix, s.suffix) for s in from_parquet]
    assert from_pickle[0].prefix == "detect the red cat on the left" and from_pickle[0].task == "refer_detect"
    assert len(from_pickle) == 3 and from_pickle[0].image_size == (96, 64)
    raw, _ = build(
        "refcoco",
        refs=str(d / "refs(unc).p"),
        instances=str(d / "instances.json"),
        images=str(d / "images"),
        split="train",
        sentence="raw",
        prompt="{expression}",
    )
    assert [s.prefix for s in raw] == ["The big blue square"]


def test_refcoco_segment_encodes_mask_tokens(samples_dir, vae_path):
    d = samples_dir / "refcoco"
    kw = dict(
        refs=str(d / "refs(unc).p"),
        instances=str(d / "instances.json"),
        images=str(d / "images"),
        split="train",
    )
    rows, _ = build("refcoco", task="segment", vae_path=vae_path, **kw)
    (row,) = rows
    assert row.prefix == "segment the big blue square" and row.task == "refer_segment"
    dets = parse_detections(row.suffix, row.image_size)
    assert len(dets) == 1 and dets[0].seg is not None and len(dets[0].seg) == 16
    # The real mask travels with the sample (COCO polygons here), for scoring at full resolution.
    (target,) = row.targets
    assert isinstance(target.mask, list) and target.rasterise(row.image_size).shape == row.image_size[::-1]
    with pytest.raises(ValueError, match="model.vae_path"):
        build("refcoco", task="segment", vae_path=None, **kw)


def test_docvqa_train_one_answer_per_question_eval_all(samples_dir):
    d = samples_dir / "docvqa"
    kw = dict(annotations=str(d / "val_v1.0.json"), images=str(d))
    train, _ = build("docvqa", **kw)
    assert [s.suffix for s in train] == ["1/8/93", "1/8/1993", "$ 42.00"]
    assert train[0].meta["group"] == train[1].meta["group"] and "group" not in train[2].meta
    assert train[0].prefix == "answer en what is the date mentioned in this letter?"
    evals, _ = build("docvqa", stage="eval", prompt="{question}", **kw)
    assert evals[0].prefix == "what is the date mentioned in this letter?"
    assert evals[0].references == ("1/8/93", "1/8/1993") and evals[0].task == "docvqa"


def test_jsonl_structured_detect_and_segment(samples_dir, vae_path):
    rows, _ = build("jsonl", path=str(samples_dir / "jsonl" / "data.jsonl"), vae_path=vae_path)
    caption, detect, seg_polygon, seg_mask = rows
    assert caption.suffix == "a red cat and a blue dog"
    assert detect.prefix == "detect cat ; dog" and detect.task == "detect"
    assert (
        detect.suffix == "<loc0160><loc0085><loc0799><loc0405> cat ; <loc0320><loc0554><loc0799><loc0938> dog"
    )
    assert seg_polygon.prefix == "segment red cat" and seg_polygon.task == "refer_segment"
    for row in (seg_polygon, seg_mask):
        (det,) = parse_detections(row.suffix, row.image_size)
        assert det.seg is not None
    # The mask PNG's tight box is the dog's drawn rectangle [20, 16, 64, 64].
    assert seg_mask.suffix.startswith("<loc0205><loc0256><loc0818><loc0818>")


def test_jsonl_structured_without_vae_is_a_clear_error(samples_dir):
    with pytest.raises(ValueError, match="model.vae_path"):
        build("jsonl", path=str(samples_dir / "jsonl" / "data.jsonl"))


def test_hf_saved_dataset_is_lazy_and_maps_columns(samples_dir):
    rows, _ = build(
        "hf",
        path=str(samples_dir / "hf" / "docs"),
        split="train",
        prompt="answer en {question}",
        columns={"suffix": "answers"},
        task="docvqa",
    )
    options = {"path": str(samples_dir / "hf" / "docs"), "split": "train", "prompt": "{question}"}
    options["columns"] = {"suffix": "answers"}
    view = FORMATS["hf"].build(from_dict(FORMATS["hf"].options, options), BuildContext("train", BadRows()))
    # A lazy view over the memory-mapped table: nothing decoded until a row is asked for.
    assert type(view).__name__ == "HfSamples" and len(view) == 2
    assert rows[0].prefix == "answer en what is the date?" and rows[0].suffix == "1/8/93"
    assert rows[0].references == ("1/8/93", "1/8/1993")
    assert rows[0].image.size == (120, 60)
    with pytest.raises(DataError, match="missing columns"):
        build("hf", path=str(samples_dir / "hf" / "docs"), split="train", prompt="{question}")


def test_hf_parquet(tmp_path, samples_dir):
    import datasets

    ds = datasets.load_from_disk(str(samples_dir / "hf" / "docs"))["train"]
    ds.to_parquet(str(tmp_path / "part-0.parquet"))
    rows, _ = build(
        "hf", path=str(tmp_path / "*.parquet"), prompt="{question}", columns={"suffix": "answers"}
    )
    assert [r.suffix for r in rows] == ["1/8/93", "$ 42.00"]


def test_missing_images_are_counted_with_their_place(samples_dir, tmp_path):
    d = tmp_path / "docvqa"
    shutil.copytree(samples_dir / "docvqa", d)
    (d / "documents" / "pybv0228_81.png").unlink()
    rows, bad = build("docvqa", policy="skip", annotations=str(d / "val_v1.0.json"), images=str(d))
    assert len(rows) == 2 and bad.counts == {"missing_image": 1}
    assert "val_v1.0.json[data][1](questionId=338)" in bad.examples["missing_image"][0]


def test_detection_object_orders():
    from pg_tune.data.formats.coco_detection import _ordered

    objs = [("a", (50, 0, 60, 10)), ("b", (0, 0, 40, 40)), ("c", (20, 5, 25, 6))]
    assert [o[0] for o in _ordered(objs, "left_to_right", None)] == ["b", "c", "a"]
    assert [o[0] for o in _ordered(objs, "largest_first", None)] == ["b", "a", "c"]
    import random

    once = _ordered(objs, "random", random.Random("0:1"))
    assert once == _ordered(objs, "random", random.Random("0:1")) and sorted(once) == sorted(objs)


def _format_options(samples_dir, fmt):
    """Recipe keys that read each shipped sample (every format has one; shapes needs none)."""
    d = samples_dir
    return {
        "coco_captions": dict(
            annotations=str(d / "coco_captions" / "captions_val2017.json"),
            images=str(d / "coco_captions" / "images"),
        ),
        "coco_detection": dict(
            annotations=str(d / "coco_detection" / "instances_val2017.json"),
            images=str(d / "coco_detection" / "images"),
        ),
        "docvqa": dict(annotations=str(d / "docvqa" / "val_v1.0.json"), images=str(d / "docvqa")),
        "jsonl": dict(path=str(d / "jsonl" / "data.jsonl")),
        "hf": dict(
            path=str(d / "hf" / "docs"), split="train", prompt="{question}", columns={"suffix": "answers"}
        ),
        "refcoco": dict(
            refs=str(d / "refcoco" / "refs(unc).p"),
            instances=str(d / "refcoco" / "instances.json"),
            images=str(d / "refcoco" / "images"),
            split="val",
        ),
        "shapes": dict(num_samples=5),
    }[fmt]


@pytest.mark.parametrize("stage", ["train", "eval"])
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_limit_is_at_most_n_emitted_samples_in_every_format(samples_dir, tmp_path, fmt, stage):
    # Old meanings: images (coco_captions: 1 image = 3 training captions), rows before answer
    # expansion (docvqa: 1 question = 2 training answers), refs before sentences (refcoco), none
    # (shapes). Now every format emits the first N samples of what it would emit without a limit.
    options = _format_options(samples_dir, fmt)
    if fmt == "jsonl":  # structured segment rows need the VQ-VAE; keep the sample's first two lines
        options["path"] = str(_first_lines(samples_dir / "jsonl" / "data.jsonl", 2, tmp_path))
    full, _ = build(fmt, stage=stage, **options)
    assert len(full) >= 2, "the sample must have more rows than the limit for this test to mean anything"
    for n in (1, 2):
        limited, _ = build(fmt, stage=stage, limit=n, **options)
        assert [s.source for s in limited] == [s.source for s in full][:n]


def _first_lines(path, n, folder):
    out = folder / "data.jsonl"
    out.write_text("".join(path.read_text(encoding="utf-8").splitlines(keepends=True)[:n]), encoding="utf-8")
    (out.parent / "images").symlink_to(path.parent / "images")
    return out
