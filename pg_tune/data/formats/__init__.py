"""The dataset formats a recipe can name under ``data.train`` / ``data.eval``.

Each format is one small module with one builder that returns ``Sample``s; its recipe keys are an
options dataclass in ``pg_tune/config/datasets.py`` (so recipes validate without importing data code).
Adding a format is one new file, its options there, and one line here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pg_tune.config.datasets import FORMAT_OPTIONS
from pg_tune.data.formats._common import BuildContext
from pg_tune.data.sample import Sample


@dataclass(frozen=True)
class Format:
    options: type
    build: Callable[[Any, BuildContext], Sequence[Sample]]
    tasks: Callable[[Any], dict[str, str]]
    """The tasks its rows will have, found without reading an image (``pg-tune validate`` checks them
    against the model family): task -> where it is declared (``task: segment``, ``FILE:LINE``), or
    ``""`` when the format itself implies it."""


def _registry() -> dict[str, Format]:
    from pg_tune.data.formats import coco_captions, coco_detection, docvqa, hf, jsonl, refcoco, shapes

    builders = {
        "coco_captions": coco_captions.build,
        "coco_detection": coco_detection.build,
        "docvqa": docvqa.build,
        "hf": hf.build,
        "jsonl": jsonl.build,
        "refcoco": refcoco.build,
        "shapes": shapes.build,
    }
    tasks = {
        "coco_captions": lambda options: {"caption": ""},
        "coco_detection": lambda options: {"detect": ""},
        "docvqa": lambda options: {"docvqa": ""},
        "hf": lambda options: {options.task: f"task: {options.task}"},
        "jsonl": jsonl.row_tasks,  # each row may name its own
        "refcoco": lambda options: {refcoco.TASKS[options.task]: f"task: {options.task}"},
        "shapes": lambda options: {"caption": ""},
    }
    assert builders.keys() == FORMAT_OPTIONS.keys() == tasks.keys(), (
        "a format needs options (config/datasets.py)"
    )
    return {name: Format(FORMAT_OPTIONS[name], build, tasks[name]) for name, build in builders.items()}


FORMATS: dict[str, Format] = _registry()
