"""``pg-tune data preview``: the exact prefix/suffix pairs training (or evaluation) will see.

Training rows come in the order of epoch 0 of ``pg_tune.data.mix`` (weights and per-epoch caption
choice applied), evaluation rows in recipe order. ``--draw`` decodes each suffix with the codecs
(``<loc>`` boxes, ``<seg>`` masks through the VQ-VAE) and draws it over the image, so a wrong
box convention shows at a glance.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pg_tune.codecs.boxes import parse_detections
from pg_tune.config.recipe import Recipe
from pg_tune.data.bad_rows import BadRows
from pg_tune.data.build import build_samples, train_order
from pg_tune.data.draw import draw_caption, draw_detections
from pg_tune.data.images import load_image
from pg_tune.data.sample import Sample

BOX_TASKS = ("detect", "refer_detect", "refer_segment")


def preview_samples(
    recipe: Recipe, split: str, limit: int | None, bad_rows: BadRows
) -> Iterator[tuple[int, int, Sample]]:
    """``(row index, recipe entry, sample)`` in the order the trainer (or evaluator) meets them."""
    entries = recipe.data.train if split == "train" else recipe.data.eval
    samples = build_samples(entries, split, bad_rows, seed=recipe.train.seed)
    order = train_order(samples, entries, recipe.train.seed, 0) if split == "train" else range(len(samples))
    for n, index in enumerate(order):
        if limit is not None and n >= limit:
            return
        yield index, samples.entry_of(index), samples[index]


def preview_record(index: int, sample: Sample, entry: int) -> dict[str, Any]:
    image = sample.image
    name = str(image) if isinstance(image, (str, Path)) else f"<in-memory {image.width}x{image.height} image>"
    record: dict[str, Any] = {
        "index": index,
        "entry": entry,
        "source": sample.source,
        "image": name,
        "task": sample.task,
        "prefix": sample.prefix,
        "suffix": sample.suffix,
    }
    if sample.references and sample.references != (sample.suffix,):
        record["references"] = list(sample.references)
    if "image_size" in sample.meta:
        record["image_size"] = list(sample.meta["image_size"])
    return record


def draw_sample(sample: Sample, vae_path: str | None = None):
    """The sample's image with its target drawn: decoded boxes/masks, and the prefix/suffix text."""
    image = load_image(sample.image, sample.source)
    if sample.task in BOX_TASKS:
        size = tuple(sample.meta.get("image_size", image.size))
        if sample.task == "refer_segment" and vae_path:
            from pg_tune.data.formats._common import mask_codec

            pairs = mask_codec(vae_path, sample.source).parse_segment(sample.suffix, size)
            image = draw_detections(image, [d for d, _ in pairs], [m for _, m in pairs])
        else:
            image = draw_detections(image, parse_detections(sample.suffix, size))
    return draw_caption(image, [f"prefix: {sample.prefix}", f"suffix: {_short(sample.suffix)}"])


def _short(text: str, width: int = 90) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def write_preview(
    recipe: Recipe, split: str, limit: int | None, out: str | Path | None, draw_dir: str | Path | None
) -> tuple[list[dict[str, Any]], BadRows]:
    """Write the preview JSONL (and PNGs); return the records and the bad-row counts."""
    bad_rows = BadRows(recipe.data.on_bad_row)
    entries = recipe.data.train if split == "train" else recipe.data.eval
    records = []
    if draw_dir is not None:
        Path(draw_dir).mkdir(parents=True, exist_ok=True)
    for n, (index, entry, sample) in enumerate(preview_samples(recipe, split, limit, bad_rows)):
        records.append(preview_record(index, sample, entry))
        if draw_dir is not None:
            vae_path = getattr(entries[entry].options, "vae_path", None)
            draw_sample(sample, vae_path).save(Path(draw_dir) / f"{split}_{n:04d}_row{index}.png")
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return records, bad_rows
