"""COCO detection: ``instances_{split}.json`` plus the image folder, as ``detect a ; b`` prompts.

One raw record (``annotations`` entry; ``categories`` names it, ``images`` sizes it)::

    {"id": 1768, "image_id": 289343, "category_id": 18, "bbox": [473.07, 395.93, 38.65, 28.67],
     "area": 702.1, "iscrowd": 0, "segmentation": [[...]]}

Each image becomes ``prefix = "detect cat ; dog"`` and its objects as targets (label + pixel box),
which the model family renders (PaliGemma: ``<loc..>x4 cat ; <loc..>x4 dog``, big_vision's box
encoding). Boxes outside the image are clipped
and counted; degenerate ones are bad rows. Selected in a recipe by::

    data:
      train:
        - format: coco_detection
          annotations: coco/annotations/instances_train2017.json
          images: coco/train2017
          classes: [cat, dog]        # optional subset
          prompt_classes: present    # or: all
"""

from __future__ import annotations

import random
from pathlib import Path

from pg_tune.config.datasets import CocoDetectionOptions
from pg_tune.data.boxes import coco_bbox_to_xyxy
from pg_tune.data.formats._common import (
    BuildContext,
    apply_limit,
    check_box,
    format_prompt,
    limit_reached,
    read_json,
)
from pg_tune.data.sample import DataError, ObjectTarget, Sample


def build(options: CocoDetectionOptions, ctx: BuildContext) -> list[Sample]:
    path = Path(options.annotations)
    data = read_json(path, "COCO instances annotations")
    if options.keep_empty and ctx.split == "train":
        raise DataError(f"{path}: keep_empty is for evaluation only; a training row needs a target")
    categories = {c["id"]: str(c["name"]) for c in data.get("categories", []) if isinstance(c, dict)}
    if options.classes is not None:
        unknown = sorted(set(options.classes) - set(categories.values()))
        if unknown:
            raise DataError(f"{path}: classes {unknown} are not in the file's categories")
    wanted = set(options.classes) if options.classes is not None else set(categories.values())
    all_names = [name for _, name in sorted(categories.items()) if name in wanted]

    images = {im["id"]: im for im in data.get("images", []) if isinstance(im, dict) and "id" in im}
    objects: dict[int, list[tuple[str, tuple[float, float, float, float]]]] = {
        image_id: [] for image_id in images
    }
    # Crowd regions left out of the target stay ground truth for scoring (COCOeval ignores matches).
    crowds: dict[int, list[tuple[str, tuple[float, float, float, float]]]] = {
        image_id: [] for image_id in images
    }
    for i, ann in enumerate(data.get("annotations", [])):
        where = f"{path}[annotations][{i}]"
        if not isinstance(ann, dict) or not all(k in ann for k in ("image_id", "category_id", "bbox")):
            ctx.bad_rows.bad("missing_field", f"{where}: an annotation needs image_id, category_id and bbox")
            continue
        if ann["image_id"] not in images:
            ctx.bad_rows.bad("unknown_image", f"{where}: image_id {ann['image_id']} is not in 'images'")
            continue
        name = categories.get(ann["category_id"])
        if name is None:
            ctx.bad_rows.bad(
                "unknown_category", f"{where}: category_id {ann['category_id']} is not in 'categories'"
            )
            continue
        if name not in wanted:
            continue
        crowd_only = bool(ann.get("iscrowd", 0)) and options.crowd == "skip"
        info = images[ann["image_id"]]
        size = (int(info["width"]), int(info["height"]))
        try:
            xyxy = coco_bbox_to_xyxy(ann["bbox"])
        except ValueError as e:
            ctx.bad_rows.bad("bad_box", f"{where}: field 'bbox': {e}")
            continue
        box = check_box(xyxy, size, f"{where}: field 'bbox'", ctx.bad_rows)
        if box is not None:
            (crowds if crowd_only else objects)[ann["image_id"]].append((name, box))

    root = Path(options.images)
    samples: list[Sample] = []
    for image_id, objs in objects.items():
        if limit_reached(samples, options.limit):
            break
        if not objs and not options.keep_empty:
            continue
        info = images[image_id]
        where = f"{path}[image_id={image_id}]"
        image = root / str(info.get("file_name", ""))
        if not image.is_file():
            ctx.bad_rows.bad("missing_image", f"{where}: image file not found: {image}")
            continue
        objs = _ordered(objs, options.order, random.Random(f"{ctx.seed}:{image_id}"))
        if options.max_objects is not None:
            objs = objs[: options.max_objects]
        present = list(dict.fromkeys(name for name, _ in objs))
        names = all_names if options.prompt_classes == "all" else present
        size = (int(info["width"]), int(info["height"]))
        targets = tuple(ObjectTarget(name, box) for name, box in objs)
        prefix = format_prompt(options.prompt, where, classes=" ; ".join(names))
        meta = {
            "image_id": image_id,
            "crowd": tuple(crowds[image_id]),
            "categories": tuple(all_names),
        }
        samples.append(Sample(image, prefix, "", where, "detect", (), meta, targets=targets, image_size=size))
    return apply_limit(samples, options.limit)


def _ordered(objs, order: str, rng: random.Random):
    if order == "left_to_right":
        return sorted(objs, key=lambda o: (o[1][0], o[1][1]))
    if order == "largest_first":
        return sorted(objs, key=lambda o: -(o[1][2] - o[1][0]) * (o[1][3] - o[1][1]))
    if order == "random":
        objs = list(objs)
        rng.shuffle(objs)
    return list(objs)
