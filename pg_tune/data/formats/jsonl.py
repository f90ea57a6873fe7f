"""Custom JSONL: one ``{"image": ..., "prefix": ..., "suffix": ...}`` object a line.

The de-facto format of big_vision's ``forkme`` config and Roboflow's PaliGemma exports::

    {"image": "imgs/0001.jpg", "prefix": "caption en", "suffix": "a red circle"}

Image paths are relative to the JSONL file's folder (or ``image_root``). Optional keys per line:
``task`` (the metric family, default from the options) and ``references`` (all ground truths, for
evaluation). Selected in a recipe by::

    data:
      train:
        - format: jsonl
          path: data/train.jsonl
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pg_tune.data.formats import BuildContext
from pg_tune.data.sample import TASKS, DataError, Sample


@dataclass
class JsonlOptions:
    path: str
    image_root: str | None = None
    """Folder image paths are relative to; default: the JSONL file's folder."""
    task: str = "caption"
    """Metric family for rows without a ``task`` key (caption, vqa, docvqa, detect, ...)."""
    limit: int | None = None


def build(options: JsonlOptions, ctx: BuildContext) -> list[Sample]:
    path = Path(options.path)
    if not path.is_file():
        raise DataError(f"{path}: JSONL file not found")
    root = Path(options.image_root) if options.image_root else path.parent
    samples: list[Sample] = []
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            where = f"{path}:{line_no}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                ctx.bad_rows.bad(
                    "not_utf8", f"{where}: line is not valid UTF-8 ({e.reason} at byte {e.start})"
                )
                continue
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                ctx.bad_rows.bad("malformed_json", f"{where}: malformed JSON: {e.msg} (column {e.colno})")
                continue
            sample = _row_to_sample(row, where, root, options, ctx)
            if sample is not None:
                samples.append(sample)
            if options.limit is not None and len(samples) >= options.limit:
                break
    return samples


def _row_to_sample(
    row: object, where: str, root: Path, options: JsonlOptions, ctx: BuildContext
) -> Sample | None:
    if not isinstance(row, dict):
        ctx.bad_rows.bad("wrong_type", f"{where}: expected a JSON object, got {type(row).__name__}")
        return None
    for key in ("image", "prefix", "suffix"):
        if key not in row:
            ctx.bad_rows.bad("missing_field", f"{where}: missing field {key!r}")
            return None
        if not isinstance(row[key], str):
            ctx.bad_rows.bad("wrong_type", f"{where}: field {key!r} must be a string, got {row[key]!r}")
            return None
    if ctx.split == "train" and not row["suffix"].strip():
        ctx.bad_rows.bad("empty_suffix", f"{where}: empty suffix: nothing to learn from this row")
        return None
    image = root / row["image"]
    if not image.is_file():
        ctx.bad_rows.bad("missing_image", f"{where}: image file not found: {image}")
        return None
    task = row.get("task", options.task)
    if task not in TASKS:
        ctx.bad_rows.bad(
            "unknown_task", f"{where}: field 'task' must be one of {', '.join(TASKS)}, got {task!r}"
        )
        return None
    references = row.get("references", [])
    if not isinstance(references, list) or not all(isinstance(r, str) for r in references):
        ctx.bad_rows.bad("wrong_type", f"{where}: field 'references' must be a list of strings")
        return None
    return Sample(
        image=image,
        prefix=row["prefix"],
        suffix=row["suffix"],
        source=where,
        task=task,
        references=tuple(references),
    )
