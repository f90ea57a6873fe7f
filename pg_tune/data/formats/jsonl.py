"""Custom JSONL: one ``{"image": ..., "prefix": ..., "suffix": ...}`` object a line.

The de-facto format of big_vision's ``forkme`` config and Roboflow's PaliGemma exports::

    {"image": "imgs/0001.jpg", "prefix": "caption en", "suffix": "a red circle"}

A structured form spares writing ``<loc>``/``<seg>`` tokens by hand. Boxes are pixel
``[x0, y0, x1, y1]``; a segment object gives a ``polygon`` (``[x, y, x, y, ...]`` or
``[[x, y], ...]``) or a ``mask`` PNG (same size as the image, non-zero = object)::

    {"image": "imgs/0002.jpg", "task": "detect", "objects": [{"label": "cat", "box": [10, 20, 200, 180]}]}
    {"image": "imgs/0003.jpg", "task": "segment", "objects": [{"label": "left cat", "polygon": [...]}]}

Detection rows become the prompt ``detect cat ; dog`` and their objects as targets (label, pixel
box; segment rows also the mask, kept as polygon or RLE). The model family renders them (PaliGemma:
``<loc..>x4 cat ; <loc..>x4 dog``, and ``<loc..>x4<seg..>x16 left cat`` for ``segment left cat``
as the mix checkpoints answer, through the VQ-VAE at ``model.vae_path``). A row may still set its
own ``prefix``.

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
from pathlib import Path

from pg_tune.config.datasets import JsonlOptions
from pg_tune.data.formats._common import BuildContext, apply_limit, check_box, limit_reached
from pg_tune.data.images import image_size, load_image
from pg_tune.data.masks import mask_box, mask_to_rle, segmentation_to_mask
from pg_tune.data.sample import DataError, ObjectTarget, Sample
from pg_tune.tasks import TASKS


def build(options: JsonlOptions, ctx: BuildContext) -> list[Sample]:
    path = Path(options.path)
    if not path.is_file():
        raise DataError(f"{path}: JSONL file not found")
    root = Path(options.image_root) if options.image_root else path.parent
    samples: list[Sample] = []
    rows = 0
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            where = f"{path}:{line_no}"
            try:
                # utf-8-sig on the first line: a BOM (Windows editors, some exporters) is not content.
                text = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as e:
                rows += 1
                ctx.bad_rows.bad(
                    "not_utf8", f"{where}: line is not valid UTF-8 ({e.reason} at byte {e.start})"
                )
                continue
            if not text.strip():
                continue
            rows += 1
            try:
                row = json.loads(text.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                ctx.bad_rows.bad("malformed_json", f"{where}: malformed JSON: {e.msg} (column {e.colno})")
                continue
            sample = _row_to_sample(row, where, root, options, ctx)
            if sample is not None:
                samples.append(sample)
            if limit_reached(samples, options.limit):
                break
    if rows == 0:
        raise DataError(f"{path}: no rows (the file is empty or blank); one JSON object a line is expected")
    return apply_limit(samples, options.limit)


def _row_to_sample(
    row: object, where: str, root: Path, options: JsonlOptions, ctx: BuildContext
) -> Sample | None:
    if not isinstance(row, dict):
        ctx.bad_rows.bad("wrong_type", f"{where}: expected a JSON object, got {type(row).__name__}")
        return None
    if "objects" in row:
        return _structured_row(row, where, root, options, ctx)
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


_STRUCTURED_TASKS = {"detect": "detect", "segment": "refer_segment"}


def row_tasks(options: JsonlOptions) -> dict[str, str]:
    """Each task the file's rows have, with the first ``FILE:LINE`` that has it; no image is read.

    Unreadable lines are left to the build (``pg-tune data validate`` names them); a missing file
    gives nothing here.
    """
    path = Path(options.path)
    found: dict[str, str] = {}
    if not path.is_file():
        return found
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                row = json.loads(raw.decode("utf-8-sig" if line_no == 1 else "utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue
            if not isinstance(row, dict):
                continue
            structured = "objects" in row
            task = _STRUCTURED_TASKS.get(row.get("task")) if structured else row.get("task", options.task)
            if isinstance(task, str) and task in TASKS:
                found.setdefault(task, f"{path}:{line_no}")
    return found


def _structured_row(
    row: dict, where: str, root: Path, options: JsonlOptions, ctx: BuildContext
) -> Sample | None:
    """``{"image", "task": detect|segment, "objects": [...]}`` -> a sample with typed targets."""
    task = row.get("task")
    if task not in _STRUCTURED_TASKS:
        ctx.bad_rows.bad("wrong_type", f"{where}: field 'task' must be 'detect' or 'segment' with 'objects'")
        return None
    if not isinstance(row.get("image"), str):
        ctx.bad_rows.bad("missing_field", f"{where}: missing field 'image'")
        return None
    objects = row["objects"]
    if not isinstance(objects, list) or not objects:
        ctx.bad_rows.bad("empty_suffix", f"{where}: field 'objects' must be a non-empty list")
        return None
    image = root / row["image"]
    try:
        size = image_size(image, where)
    except DataError as e:
        ctx.bad_rows.bad("missing_image" if not image.is_file() else "unreadable_image", str(e))
        return None
    segment = task == "segment"
    labels, targets = [], []
    for k, obj in enumerate(objects):
        at = f"{where}: objects[{k}]"
        if not isinstance(obj, dict) or not isinstance(obj.get("label"), str) or not obj["label"].strip():
            ctx.bad_rows.bad("missing_field", f"{at}: needs a non-empty string 'label'")
            return None
        label = " ".join(obj["label"].split())
        mask = segmentation = None
        if segment:
            found = _object_mask(obj, size, root, at, ctx)
            if found is None:
                return None
            mask, segmentation = found
        if "box" in obj:
            box = check_box(obj["box"], size, f"{at}.box", ctx.bad_rows)
        elif mask is not None:
            box = mask_box(mask)
            if box is None:
                ctx.bad_rows.bad("degenerate_box", f"{at}: the mask is empty")
        else:
            ctx.bad_rows.bad("missing_field", f"{at}: missing field 'box' ([x0, y0, x1, y1] in pixels)")
            return None
        if box is None:
            return None
        labels.append(label)
        targets.append(ObjectTarget(label, box, segmentation))
    prefix = row.get("prefix")
    if not isinstance(prefix, str):
        prefix = f"{task} " + " ; ".join(dict.fromkeys(labels))
    return Sample(image, prefix, "", where, _STRUCTURED_TASKS[task], (), {}, tuple(targets), size)


def _object_mask(obj: dict, size: tuple[int, int], root: Path, at: str, ctx: BuildContext):
    """``(HxW bool mask, COCO segmentation)`` from ``polygon`` or a ``mask`` PNG; ``None`` after reporting."""
    import numpy as np

    if "polygon" in obj:
        polygon = obj["polygon"]
        if isinstance(polygon, list) and polygon and all(isinstance(p, list) for p in polygon):
            polygon = [v for point in polygon for v in point]
        try:
            segmentation = [[float(v) for v in polygon]]
            return segmentation_to_mask(segmentation, size), segmentation
        except (TypeError, ValueError) as e:
            ctx.bad_rows.bad("bad_mask", f"{at}.polygon: {e}")
            return None
    if "mask" in obj:
        try:
            mask = np.asarray(load_image(root / str(obj["mask"]), at).convert("L")) > 0
        except DataError as e:
            ctx.bad_rows.bad("missing_image", f"{at}.mask: {e}")
            return None
        if mask.shape != (size[1], size[0]):
            ctx.bad_rows.bad(
                "bad_mask", f"{at}.mask: {mask.shape[1]}x{mask.shape[0]} differs from the image {size}"
            )
            return None
        return mask, mask_to_rle(mask)
    ctx.bad_rows.bad("missing_field", f"{at}: a segment object needs 'polygon' or 'mask'")
    return None
