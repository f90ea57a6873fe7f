"""COCO captions: ``captions_{split}.json`` plus the image folder.

One raw record (``annotations`` entry; ``images`` gives the file name and size)::

    {"id": 48, "image_id": 139, "caption": "A woman stands in the dining area at the table."}

Training yields one pair per caption (``train_pairs: every_caption``), or, with
``train_pairs: one_per_image``, one caption per image per epoch, drawn afresh each epoch by the
training sampler (``pg_tune.data.mix``) as big_vision's ``choice_no_replacement`` does.
Evaluation yields one sample per image whose ``references`` hold all its captions (CIDEr needs
them). Selected in a recipe by::

    data:
      train:
        - format: coco_captions
          annotations: coco/annotations/captions_train2017.json
          images: coco/train2017
          prompt: caption en
"""

from __future__ import annotations

from pathlib import Path

from pg_tune.config.datasets import CocoCaptionsOptions
from pg_tune.data.formats._common import BuildContext, apply_limit, limit_reached, read_json
from pg_tune.data.sample import Sample


def build(options: CocoCaptionsOptions, ctx: BuildContext) -> list[Sample]:
    path = Path(options.annotations)
    data = read_json(path, "COCO captions annotations")
    root = Path(options.images)
    images: dict[int, dict] = {}
    for i, image in enumerate(data.get("images", [])):
        where = f"{path}[images][{i}]"
        if not isinstance(image, dict) or "id" not in image or not isinstance(image.get("file_name"), str):
            ctx.bad_rows.bad("missing_field", f"{where}: an image needs 'id' and 'file_name'")
            continue
        images[image["id"]] = image
    captions: dict[int, list[str]] = {}
    for i, ann in enumerate(data.get("annotations", [])):
        where = f"{path}[annotations][{i}]"
        if not isinstance(ann, dict) or "image_id" not in ann:
            ctx.bad_rows.bad("missing_field", f"{where}: missing field 'image_id'")
            continue
        caption = ann.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            ctx.bad_rows.bad("empty_suffix", f"{where}: field 'caption' is missing or empty")
            continue
        if ann["image_id"] not in images:
            ctx.bad_rows.bad("unknown_image", f"{where}: image_id {ann['image_id']} is not in 'images'")
            continue
        captions.setdefault(ann["image_id"], []).append(" ".join(caption.split()))

    samples: list[Sample] = []
    for image_id, texts in captions.items():
        if limit_reached(samples, options.limit):
            break
        info = images[image_id]
        image = root / info["file_name"]
        where = f"{path}[image_id={image_id}]"
        if not image.is_file():
            ctx.bad_rows.bad("missing_image", f"{where}: image file not found: {image}")
            continue
        meta = {"image_id": image_id}
        if ctx.split == "train":
            group = {"group": f"{path}#{image_id}"} if options.train_pairs == "one_per_image" else {}
            samples.extend(
                Sample(
                    image,
                    options.prompt,
                    text,
                    f"{where}[caption {k}]",
                    "caption",
                    tuple(texts),
                    {**meta, **group},
                )
                for k, text in enumerate(texts)
            )
        else:
            samples.append(Sample(image, options.prompt, texts[0], where, "caption", tuple(texts), meta))
    return apply_limit(samples, options.limit)
