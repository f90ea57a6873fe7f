"""A self-contained HTML report of one evaluation: summary metrics, then a gallery worst-first.

Everything lives in one folder: ``index.html`` and ``images/NNNNN.png`` (each sample's image with
ground-truth boxes/masks in green and predicted ones in magenta drawn on it). No scripts, no
network: open ``index.html`` from disk, or copy the folder anywhere.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

THUMB_SIDE = 320
DRAW_MAX_SIDE = 1024
"""Images (and masks) are drawn at most this large before the thumbnail, whatever a record says."""
GT_COLOUR = (0, 170, 70)
PRED_COLOUR = (220, 0, 140)

_CSS = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; background: #fafafa; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 2em; }
table.metrics { border-collapse: collapse; margin: 8px 0 16px; }
table.metrics td, table.metrics th { border: 1px solid #ccc; padding: 3px 10px; text-align: left; }
table.metrics td.num { text-align: right; font-variant-numeric: tabular-nums; }
.notes li { color: #8a4b00; }
.legend span { display: inline-block; padding: 0 8px; margin-right: 8px; color: #fff; border-radius: 3px; }
.gallery { display: flex; flex-wrap: wrap; gap: 14px; }
.card { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 8px; width: 340px; }
.card img { display: block; max-width: 100%; height: auto; margin-bottom: 6px; }
.card dl { margin: 0; font-size: 0.85em; } .card dt { font-weight: 600; color: #555; }
.card dd { margin: 0 0 4px 0; word-break: break-word; font-family: ui-monospace, monospace; }
.score { font-weight: 700; }
"""


COUNT_SUFFIXES = ("/count", "/unparsed", "/empty")
"""Metrics that count samples: shown as integers."""


def _fmt(name: str, value: Any) -> str:
    if isinstance(value, float) and name.endswith(COUNT_SUFFIXES):
        return str(int(value))
    return f"{value:.4f}" if isinstance(value, float) else html.escape(str(value))


def _open_image(image: Any) -> Image.Image | None:
    from pg_tune.data.images import load_image
    from pg_tune.data.sample import DataError

    if image is None:
        return None
    try:
        return load_image(image).copy()
    except DataError:
        return None


def _bounded(size: tuple[int, int] | None) -> tuple[tuple[int, int] | None, float]:
    """``size`` scaled down so its longer side is at most ``DRAW_MAX_SIDE``, and the factor used."""
    if size is None:
        return None, 1.0
    width, height = size
    scale = min(1.0, DRAW_MAX_SIDE / max(width, height))
    return (max(1, round(width * scale)), max(1, round(height * scale))), scale


def _scaled(objects: Sequence[Mapping[str, Any]], scale: float) -> list[Mapping[str, Any]]:
    if scale == 1.0:
        return list(objects)
    return [{**o, "box": [v * scale for v in o["box"]]} if o.get("box") else o for o in objects]


def _placeholder(size: tuple[int, int] | None) -> Image.Image:
    width, height = size or (THUMB_SIDE, THUMB_SIDE * 3 // 4)
    image = Image.new("RGB", (width, height), (225, 225, 225))
    ImageDraw.Draw(image).text((8, 8), "image not available", fill=(90, 90, 90))
    return image


def _masks(
    objects: Sequence[Mapping[str, Any]], size: tuple[int, int], codec: Any | None
) -> list[np.ndarray]:
    ready = [np.asarray(o["pixels"], dtype=bool) for o in objects if o.get("pixels") is not None]
    if codec is None:
        return ready
    return ready + [codec.decode_mask(o["seg"], o["box"], size) for o in objects if o.get("seg") is not None]


def _with_true_masks(
    truth: list[Mapping[str, Any]], record: Mapping[str, Any], size: tuple[int, int] | None, work
) -> list[Mapping[str, Any]]:
    """Ground-truth objects with their real masks (``reference_objects``) rasterised at the drawn size."""
    objects = record.get("reference_objects") or []
    if size is None or work is None or len(objects) != len(truth):
        return truth
    from pg_tune.data.masks import segmentation_to_mask

    out = list(truth)
    for k, obj in enumerate(objects):
        if isinstance(obj, Mapping) and obj.get("mask") is not None:
            try:
                mask = segmentation_to_mask(obj["mask"], size)
            except (TypeError, ValueError):
                continue  # a malformed mask in a hand-written file: draw the box only
            pixels = Image.fromarray(mask).resize(work, Image.NEAREST)
            out[k] = {**out[k], "pixels": np.asarray(pixels, dtype=bool)}
    return out


def draw_annotations(
    image: Image.Image,
    truth: Sequence[Mapping[str, Any]],
    predicted: Sequence[Mapping[str, Any]],
    mask_codec: Any | None = None,
    max_side: int | None = THUMB_SIDE,
) -> Image.Image:
    """``image`` with ground-truth (green) and predicted (magenta) boxes, labels and masks drawn on it.

    Objects are the parsed dicts of a prediction record (``label``, ``box`` in pixels of ``image``,
    optional ``seg``); masks are decoded only when a ``mask_codec`` is given. ``max_side`` scales the
    result down (boxes drawn after scaling, so lines stay crisp).
    """
    image = image.convert("RGB")
    size = image.size
    overlay = np.asarray(image, dtype=np.float32).copy()
    for colour, objects in ((GT_COLOUR, truth), (PRED_COLOUR, predicted)):
        for mask in _masks(objects, size, mask_codec):
            overlay[mask] = 0.5 * overlay[mask] + 0.5 * np.array(colour, dtype=np.float32)
    image = Image.fromarray(overlay.astype(np.uint8))
    scale = 1.0
    if max_side is not None and max(size) != max_side:
        scale = max_side / max(size)
        image = image.resize((max(1, round(size[0] * scale)), max(1, round(size[1] * scale))), Image.BILINEAR)
    draw = ImageDraw.Draw(image)
    width = max(2, round(max(image.size) / 160))
    for colour, objects in ((GT_COLOUR, truth), (PRED_COLOUR, predicted)):
        for obj in objects:
            x0, y0, x1, y1 = (v * scale for v in obj["box"])
            draw.rectangle((x0, y0, x1, y1), outline=colour, width=width)
            if obj.get("label"):
                text_y = y0 - 12 if y0 >= 12 else y1 + 2
                draw.text((x0 + 2, text_y), str(obj["label"]), fill=colour)
    return image


def _gallery_order(indices: list[int], records: Sequence[Mapping[str, Any]]) -> list[int]:
    # Worst first; samples without a score (cannot be judged) come first of all.
    return sorted(
        indices, key=lambda i: (records[i].get("score") is not None, records[i].get("score") or 0.0, i)
    )


def _card(record: Mapping[str, Any], image_name: str, image_size: tuple[int, int]) -> str:
    refs = record.get("references") or []
    ref_items = "".join(f"<dd>{html.escape(r)}</dd>" for r in refs[:5])
    if len(refs) > 5:
        ref_items += f"<dd>… and {len(refs) - 5} more</dd>"
    score = record.get("score")
    extra = ""
    if record.get("box_iou") is not None and record.get("task") == "refer_segment":
        extra = f"<dt>box IoU</dt><dd>{record['box_iou']:.3f}</dd>"
    return (
        '<div class="card">'
        f'<img src="{html.escape(image_name)}" width="{image_size[0]}" height="{image_size[1]}" '
        f'alt="{html.escape(str(record.get("source", "")))}">'
        "<dl>"
        f'<dt>score</dt><dd class="score">{"–" if score is None else f"{score:.3f}"}</dd>{extra}'
        f"<dt>prompt</dt><dd>{html.escape(str(record.get('prefix', '')))}</dd>"
        f"<dt>prediction</dt><dd>{html.escape(record.get('prediction', '')) or '<i>(empty)</i>'}</dd>"
        f"<dt>reference</dt>{ref_items}"
        f"<dt>source</dt><dd>{html.escape(str(record.get('source', '')))}</dd>"
        "</dl></div>"
    )


def write_report(
    out_dir: str | Path,
    title: str,
    metrics_by_dataset: Mapping[str, Mapping[str, float]],
    records: Sequence[Mapping[str, Any]],
    images: Sequence[Any] | None = None,
    notes: Sequence[str] = (),
    mask_codec: Any | None = None,
    limit: int = 200,
) -> Path:
    """Write ``out_dir/index.html`` and its images; returns the path of ``index.html``.

    ``records`` are prediction records (``pg_tune.evaluate.scoring``); ``images[i]`` is record i's
    image (a path or PIL image; default: the record's ``image`` path). At most ``limit`` samples per
    dataset and task are shown, worst first.
    """
    out_dir = Path(out_dir)
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    images = list(images) if images is not None else [r.get("image") for r in records]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    for name, metrics in metrics_by_dataset.items():
        rows = "".join(
            f'<tr><td>{html.escape(k)}</td><td class="num">{_fmt(k, v)}</td></tr>' for k, v in metrics.items()
        )
        parts.append(
            f"<h2>{html.escape(name)}</h2><table class='metrics'><tr><th>metric</th><th>value</th></tr>{rows}</table>"
        )
    if notes:
        parts.append('<ul class="notes">' + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    parts.append(
        f'<p class="legend"><span style="background:rgb{GT_COLOUR}">ground truth</span>'
        f'<span style="background:rgb{PRED_COLOUR}">prediction</span> Samples are sorted worst first.</p>'
    )
    groups: dict[tuple[str, str], list[int]] = {}
    for i, record in enumerate(records):
        groups.setdefault((str(record.get("dataset", "")), str(record.get("task", ""))), []).append(i)
    for (dataset, task), indices in groups.items():
        shown = _gallery_order(indices, records)[:limit]
        heading = " · ".join(x for x in (dataset, task) if x)
        parts.append(f"<h2>{html.escape(heading)} — {len(shown)} of {len(indices)} samples, worst first</h2>")
        parts.append('<div class="gallery">')
        for i in shown:
            record = records[i]
            image = _open_image(images[i])
            size = tuple(record["image_size"]) if record.get("image_size") else None
            # Draw at a bounded size: the record's size comes from a file and may be anything.
            work, scale = _bounded(size or (image.size if image is not None else None))
            if image is None:
                image = _placeholder(work)
            elif image.size != work:
                image = image.resize(work)  # boxes are in the pixels of the recorded size, scaled alike
            truth = _with_true_masks(_scaled(record.get("reference_parsed") or [], scale), record, size, work)
            drawn = draw_annotations(image, truth, _scaled(record.get("parsed") or [], scale), mask_codec)
            name = f"images/{i:05d}.png"
            drawn.save(out_dir / name)
            parts.append(_card(record, name, drawn.size))
        parts.append("</div>")
    parts.append("</body></html>")
    index = out_dir / "index.html"
    index.write_text("\n".join(parts), encoding="utf-8")
    return index
