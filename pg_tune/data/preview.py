"""``pg-tune data preview``: the exact prompt/target text the recipe's model family will see.

Training rows come in the order of epoch 0 of ``pg_tune.data.mix`` (weights and per-epoch caption
choice applied), evaluation rows in recipe order. ``prefix``/``suffix`` are the family's rendering
(PaliGemma: ``<loc>``/``<seg>`` tokens from the structured targets); ``targets`` the ground truth
itself. ``--draw`` parses the rendered text back with the family (``<seg>`` masks through the
VQ-VAE) and draws it over the image, so a wrong box convention shows at a glance. A preference
pair shows both answers as the family renders them: ``chosen`` and ``rejected`` instead of ``suffix``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pg_tune.config.recipe import Recipe
from pg_tune.data.bad_rows import BadRows
from pg_tune.data.build import build_samples, train_order
from pg_tune.data.draw import draw_caption, draw_detections
from pg_tune.data.images import load_image
from pg_tune.data.sample import Sample, targets_json
from pg_tune.tasks import BOX_TASKS

if TYPE_CHECKING:
    from pg_tune.models.family import ModelFamily


def preview_samples(
    recipe: Recipe, split: str, limit: int | None, bad_rows: BadRows
) -> Iterator[tuple[int, int, Sample]]:
    """``(row index, recipe entry, sample)`` in the order the trainer (or evaluator) meets them."""
    entries = recipe.data.train if split == "train" else recipe.data.eval
    samples = build_samples(entries, split, bad_rows, seed=recipe.train.seed, family=None)
    order = train_order(samples, entries, recipe.train.seed, 0) if split == "train" else range(len(samples))
    for n, index in enumerate(order):
        if limit is not None and n >= limit:
            return
        yield index, samples.entry_of(index), samples[index]


def preview_record(
    index: int, sample: Sample, entry: int, family: ModelFamily, processor: Any | None = None
) -> dict[str, Any]:
    """One preview line: where the row came from, the text the family renders for it and, with the
    processor, the sequence positions its image takes (``image_tokens``: the recipe's
    ``model.image`` budget applied; read from the image's header, not its pixels)."""
    image = sample.image
    name = str(image) if isinstance(image, (str, Path)) else f"<in-memory {image.width}x{image.height} image>"
    record: dict[str, Any] = {
        "index": index,
        "entry": entry,
        "source": sample.source,
        "image": name,
        "task": sample.task,
        "prefix": family.render_prompt(sample),
    }
    if sample.is_pair:
        record["chosen"] = family.render_target(sample)
        record["rejected"] = family.render_target(sample.rejected_view())
    else:
        record["suffix"] = family.render_target(sample)
    if sample.targets:
        record["targets"] = targets_json(sample.targets)
    if sample.references and sample.references != (sample.suffix,):
        record["references"] = list(sample.references)
    size = sample.image_size or sample.meta.get("image_size")
    if size is not None:
        record["image_size"] = list(size)
    if processor is not None:
        budget = family.image_budget(processor, sample)
        record["image_tokens"] = budget.tokens
        if budget.encoder_passes > 1:
            record["image_views"] = budget.encoder_passes  # tiles + global view, or image + crops
    return record


def draw_sample(sample: Sample, family: ModelFamily):
    """The sample's image with its rendered target parsed back and drawn, and the prompt/target text."""
    image = load_image(sample.image, sample.source)
    prefix, suffix = family.render_prompt(sample), family.render_target(sample)
    if sample.task in BOX_TASKS:
        size = tuple(sample.image_size or sample.meta.get("image_size") or image.size)
        objects = family.parse_output(suffix, sample.task, size)
        masks = [o.mask for o in objects]
        image = draw_detections(image, objects, masks if any(m is not None for m in masks) else None)
    if sample.is_pair:
        rejected = family.render_target(sample.rejected_view())
        lines = [f"prefix: {prefix}", f"chosen: {_short(suffix)}", f"rejected: {_short(rejected)}"]
        return draw_caption(image, lines)
    return draw_caption(image, [f"prefix: {prefix}", f"suffix: {_short(suffix)}"])


def _short(text: str, width: int = 90) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def write_preview(
    recipe: Recipe,
    family: ModelFamily,
    split: str,
    limit: int | None,
    out: str | Path | None,
    draw_dir: str | Path | None,
    processor: Any | None = None,
) -> tuple[list[dict[str, Any]], BadRows]:
    """Write the preview JSONL (and PNGs) as ``family`` renders the rows (with ``processor``, each
    row's image tokens too); return the records and the bad-row counts."""
    bad_rows = BadRows(recipe.data.on_bad_row)
    records = []
    if draw_dir is not None:
        Path(draw_dir).mkdir(parents=True, exist_ok=True)
    for n, (index, entry, sample) in enumerate(preview_samples(recipe, split, limit, bad_rows)):
        records.append(preview_record(index, sample, entry, family, processor))
        if draw_dir is not None:
            draw_sample(sample, family).save(Path(draw_dir) / f"{split}_{n:04d}_row{index}.png")
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return records, bad_rows
