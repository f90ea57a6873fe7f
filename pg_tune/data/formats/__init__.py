"""The dataset formats a recipe can name under ``data.train`` / ``data.eval``.

Each format is one small module with an options dataclass (its recipe keys) and one builder that
returns ``Sample``s. Adding a format is one new file plus one line here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pg_tune.data.bad_rows import BadRows
from pg_tune.data.sample import Sample


@dataclass(frozen=True)
class BuildContext:
    """What a builder may know besides its own options."""

    split: str  # "train" or "eval"
    bad_rows: BadRows
    seed: int = 0


@dataclass(frozen=True)
class Format:
    options: type
    build: Callable[[Any, BuildContext], Sequence[Sample]]


def _registry() -> dict[str, Format]:
    from pg_tune.data.formats import coco_captions, coco_detection, docvqa, hf, jsonl, refcoco, shapes

    return {
        "coco_captions": Format(coco_captions.CocoCaptionsOptions, coco_captions.build),
        "coco_detection": Format(coco_detection.CocoDetectionOptions, coco_detection.build),
        "docvqa": Format(docvqa.DocvqaOptions, docvqa.build),
        "hf": Format(hf.HfOptions, hf.build),
        "jsonl": Format(jsonl.JsonlOptions, jsonl.build),
        "refcoco": Format(refcoco.RefcocoOptions, refcoco.build),
        "shapes": Format(shapes.ShapesOptions, shapes.build),
    }


FORMATS: dict[str, Format] = _registry()
