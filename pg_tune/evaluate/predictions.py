"""``predictions.jsonl``: one scored sample a line, written by ``pg-tune eval``, re-scored without a model.

The format is specified in ``data_formats/predictions.md``. Reading validates every line and names
the file, line and field of anything wrong; only ``task``, ``prediction``, ``references`` (and
``image_size`` for box and mask tasks) are needed to recompute the metrics.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pg_tune.data.images import MAX_IMAGE_PIXELS
from pg_tune.data.sample import DataError, targets_from_json
from pg_tune.evaluate.scoring import Item, Scored, score_items
from pg_tune.tasks import BOX_TASKS, TASKS, TEXT_TASKS

if TYPE_CHECKING:
    from pg_tune.models.family import ModelFamily

_SCORING_KEYS = ("task", "prediction", "references", "image_size", "reference_objects")


def write_predictions(path: str | Path, records: Iterable[dict[str, Any]]) -> Path:
    """Write records (from ``score_items``) as JSON lines, UTF-8, keys in a stable order."""
    path = Path(path)
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def _item(row: Any, where: str) -> Item:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for key in ("task", "prediction", "references"):
        if key not in row:
            raise DataError(f"{where}: missing field {key!r}")
    task, prediction, references = row["task"], row["prediction"], row["references"]
    if task not in TASKS:
        raise DataError(f"{where}: field 'task' must be one of {', '.join(TASKS)}, got {task!r}")
    if not isinstance(prediction, str):
        raise DataError(f"{where}: field 'prediction' must be a string, got {prediction!r}")
    objects = (
        targets_from_json(row["reference_objects"], f"{where}: field 'reference_objects'")
        if "reference_objects" in row
        else ()
    )
    # Text tasks may have none (a DocVQA test row: written, counted as unscored); box tasks need one.
    empty_ok = task in TEXT_TASKS
    if (
        not isinstance(references, list)
        or not (references or objects or empty_ok)
        or not all(isinstance(r, str) for r in references)
    ):
        raise DataError(
            f"{where}: field 'references' must be a non-empty list of strings, got {references!r}"
        )
    size = row.get("image_size")
    if size is not None:
        if (
            not isinstance(size, list)
            or len(size) != 2
            or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 1
                for v in size
            )
        ):
            raise DataError(f"{where}: field 'image_size' must be [width, height] in pixels, got {size!r}")
        size = (int(size[0]), int(size[1]))
        # No image pg_tune reads is larger, and the report allocates at this size.
        if size[0] * size[1] > MAX_IMAGE_PIXELS:
            raise DataError(
                f"{where}: field 'image_size' {list(size)} is over the {MAX_IMAGE_PIXELS:,}-pixel bound of "
                "any image pg_tune reads (data/images.py); this file was not written by pg-tune eval"
            )
    elif task in BOX_TASKS:
        raise DataError(f"{where}: field 'image_size' [width, height] is required for task {task!r}")
    extra = {
        k: v
        for k, v in row.items()
        if k not in _SCORING_KEYS + ("parsed", "score", "reference_parsed", "box_iou")
    }
    extra.setdefault("source", where)
    logprobs = row.get("token_logprobs")  # detect: [[start, end, logprob], ...], the boxes' confidences
    if logprobs is not None and (
        not isinstance(logprobs, list)
        or not all(
            isinstance(t, list) and len(t) == 3 and all(isinstance(v, (int, float)) for v in t)
            for t in logprobs
        )
    ):
        raise DataError(
            f"{where}: field 'token_logprobs' must be [[start, end, logprob], ...], got {logprobs!r:.80}"
        )
    token_logprobs = [(int(a), int(b), float(lp)) for a, b, lp in logprobs] if logprobs else None
    return Item(
        task, prediction, references, size, extra=extra, objects=objects, token_logprobs=token_logprobs
    )


def read_predictions(path: str | Path) -> list[Item]:
    """Every line of a predictions file as a scoring ``Item``; raises ``DataError`` naming the line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: predictions file not found")
    items = []
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            where = f"{path}:{line_no}"
            try:
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: line is not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: malformed JSON: {e.msg} (column {e.colno})") from None
            items.append(_item(row, where))
    if not items:
        raise DataError(f"{path}: no predictions in the file")
    return items


def family_of_predictions(items: Sequence[Item], path: str | Path, family: str | None = None) -> str:
    """The model family whose parser reads these predictions: the one every line names (``family``,
    written by ``pg-tune eval``), or ``family`` (``--family``) for files without it."""
    named = {item.extra.get("family") for item in items}
    if family is not None:
        return family
    if None in named or len(named) != 1:
        found = sorted(str(n) for n in named if n is not None)
        raise DataError(
            f"{path}: "
            + (
                f"lines name several model families ({', '.join(found)}); re-score each family's lines apart"
                if len(found) > 1
                else "lines name no model family (field 'family', written by pg-tune eval since 0.2); say which "
                "family's parser reads them with --family (paligemma, gemma3, smolvlm)"
            )
        )
    return named.pop()


def rescore(path: str | Path, family: ModelFamily) -> tuple[Scored, dict[str, dict[str, float]]]:
    """Metrics of a saved predictions file, parsed by ``family`` (``family_of_predictions``): over all
    lines, and per ``dataset`` when lines name one."""
    items = read_predictions(path)
    overall = score_items(items, family)
    per_dataset: dict[str, dict[str, float]] = {}
    names = [item.extra.get("dataset") for item in items]
    if any(names):
        for name in dict.fromkeys(names):
            subset = [item for item, n in zip(items, names, strict=True) if n == name]
            per_dataset[str(name)] = score_items(subset, family).metrics
    return overall, per_dataset
