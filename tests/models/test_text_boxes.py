"""Boxes as text for families without location tokens, and the chat prompts (pg_tune.models.chat.base)."""

from __future__ import annotations

import math

import pytest

from pg_tune.data.sample import DataError, ObjectTarget, Sample
from pg_tune.models.chat.base import chat_prompt, parse_text_boxes, render_text_boxes, text_box


def _sample(task: str, targets, size=(200, 100), prefix="detect cat ; dog") -> Sample:
    return Sample("x.png", prefix, "", "rows.jsonl:7", task=task, targets=tuple(targets), image_size=size)


def test_render_is_ymin_xmin_ymax_xmax_normalised_to_1000():
    # 200 x 100 image: x by 200, y by 100.
    assert text_box((20, 10, 100, 50), (200, 100)) == "[100, 100, 500, 500]"
    assert text_box((0, 0, 200, 100), (200, 100)) == "[0, 0, 1000, 1000]"
    assert text_box((-5, 0, 250, 101), (200, 100)) == "[0, 0, 1000, 1000]"  # clipped to the image
    sample = _sample("detect", [ObjectTarget("cat", (20, 10, 100, 50)), ObjectTarget("dog", (0, 0, 10, 10))])
    assert render_text_boxes(sample) == "[100, 100, 500, 500] cat ; [0, 0, 100, 50] dog"
    referring = _sample("refer_detect", [ObjectTarget("", (20, 10, 100, 50))])
    assert render_text_boxes(referring) == "[100, 100, 500, 500]"


def test_render_refuses_segmentation_and_missing_size():
    from pg_tune.models.chat.gemma3 import Gemma3Family

    with pytest.raises(
        DataError, match=r"rows.jsonl:7: model family 'gemma3' cannot do task refer_segment"
    ) as e:
        Gemma3Family().render_target(_sample("refer_segment", [ObjectTarget("", (0, 0, 5, 5))]))
    assert e.value.reason == "unsupported_task" and "families that support it: paligemma" in str(e.value)
    with pytest.raises(DataError, match="image size"):
        render_text_boxes(_sample("detect", [ObjectTarget("a", (0, 0, 5, 5))], size=None))


def test_parse_round_trips_rendered_targets():
    sample = _sample(
        "detect", [ObjectTarget("cat", (20, 10, 100, 50)), ObjectTarget("big dog", (40, 30, 180, 90))]
    )
    parsed = parse_text_boxes(render_text_boxes(sample), "detect", (200, 100))
    assert [p.label for p in parsed] == ["cat", "big dog"]
    assert [p.box for p in parsed] == [(20.0, 10.0, 100.0, 50.0), (40.0, 30.0, 180.0, 90.0)]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[100,100,500,500]cat;[0,0,100,50] dog", [("cat", (20, 10, 100, 50)), ("dog", (0, 0, 10, 10))]),
        ("(100.5, 100, 500, 500) cat", [("cat", (20, 10.05, 100, 50))]),
        ("[500, 500, 100, 100] cat", [("cat", (20, 10, 100, 50))]),  # min/max swapped: sorted
        ("[100, 100, 1200, 500] cat", [("cat", (20, 10, 100, 100))]),  # past 1000: clipped
        ("[100, 100, 100, 500] cat ; [0, 0, 10, 10] dog", [("dog", (0, 0, 2, 1))]),  # empty box dropped
        ("Sure! [100, 100, 500, 500] cat ; [0, 0, 10", [("cat", (20, 10, 100, 50))]),  # cut off
        ("[100, 100, 500, 500]", [("", (20, 10, 100, 50))]),  # no label
        ("no boxes here", []),
        ("", []),
    ],
)
def test_parse_is_robust(text, expected):
    parsed = parse_text_boxes(text, "detect", (200, 100))
    assert [p.label for p in parsed] == [label for label, _ in expected]
    assert [v for p in parsed for v in p.box] == pytest.approx([v for _, box in expected for v in box])


def test_referring_keeps_the_first_box_and_a_degenerate_first_box_is_a_miss():
    assert len(parse_text_boxes("[0, 0, 10, 10] ; [10, 10, 20, 20]", "refer_detect", (100, 100))) == 1
    assert parse_text_boxes("[10, 0, 10, 10]", "refer_detect", (100, 100)) == []
    assert parse_text_boxes(None, "detect", (100, 100)) == []  # type: ignore[arg-type]


def test_each_object_is_scored_by_the_tokens_that_wrote_it():
    # Scoring passes (start, end, logprob) per generated token (issue 23: a detection eval crashed
    # summing those tuples); each object's confidence comes from its own box and label only.
    text = "[0, 0, 10, 10] cat ; [5, 5, 9, 9] dog"
    cut = text.index(" ; ")
    tokens = [(0, cut, -0.1), (cut, cut + 3, -5.0), (cut + 3, len(text), -2.0)]
    cat, dog = parse_text_boxes(text, "detect", (10, 10), tokens)
    assert cat.score == pytest.approx(math.exp(-0.1)) and dog.score == pytest.approx(math.exp(-2.0))
    (unscored,) = parse_text_boxes("[0, 0, 10, 10] a", "detect", (10, 10))
    assert unscored.score is None


@pytest.mark.parametrize(
    ("prefix", "task", "prompt"),
    [
        ("caption en", "caption", "Caption this image."),
        ("caption fr", "caption", "Caption this image in language fr."),
        ("answer en what color is it?", "vqa", "what color is it?"),
        ("what is the total?", "docvqa", "what is the total?"),
        ("ocr", "ocr", "Read the text in this image."),
        (
            "detect cat ; dog",
            "detect",
            "Detect cat ; dog. Answer with the box [ymin, xmin, ymax, xmax] from 0 to 1000 and label of each, "
            "separated by ' ; '.",
        ),
        (
            "detect the left cat",
            "refer_detect",
            "Find the left cat. Answer with its box [ymin, xmin, ymax, xmax] from 0 to 1000.",
        ),
        (
            "the left cat",
            "refer_detect",
            "Find the left cat. Answer with its box [ymin, xmin, ymax, xmax] from 0 to 1000.",
        ),
        ("describe the scene in detail", "caption", "describe the scene in detail"),
    ],
)
def test_chat_prompts(prefix, task, prompt):
    assert chat_prompt(Sample("x.png", prefix, "s", "src", task=task)) == prompt
