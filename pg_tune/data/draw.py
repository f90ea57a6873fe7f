"""Drawing decoded boxes and masks over an image, to see what a target (or a prediction) says.

Used by ``pg-tune data preview --draw``; evaluation can reuse it for predictions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240))


def draw_detections(
    image: Image.Image,
    detections: Sequence[Any],
    masks: Sequence[np.ndarray | None] | None = None,
    colour: tuple[int, int, int] | None = None,
) -> Image.Image:
    """A copy of ``image`` with each object's box and label (and mask, half-transparent) drawn.

    ``detections`` are objects with a ``label`` and a pixel ``box`` ``(x0, y0, x1, y1)`` (a family's
    ``ParsedObject``s).

    ``masks[i]`` is an HxW bool array for ``detections[i]`` or ``None``. ``colour`` fixes one
    colour for all; by default each object gets the next palette colour.
    """
    out = image.convert("RGB").copy()
    overlay = Image.new("RGBA", out.size, (0, 0, 0, 0))
    for i in range(len(detections)):
        rgb = colour or PALETTE[i % len(PALETTE)]
        mask = masks[i] if masks is not None and i < len(masks) else None
        if mask is not None:
            alpha = Image.fromarray((np.asarray(mask, dtype=bool) * 110).astype(np.uint8), "L")
            overlay.paste(Image.new("RGBA", out.size, (*rgb, 255)), (0, 0), alpha)
    out = Image.alpha_composite(out.convert("RGBA"), overlay).convert("RGB")
    draw = ImageDraw.Draw(out)
    width = max(1, round(min(out.size) / 150))
    for i, det in enumerate(detections):
        rgb = colour or PALETTE[i % len(PALETTE)]
        x0, y0, x1, y1 = det.box
        draw.rectangle((x0, y0, x1, y1), outline=rgb, width=width)
        if det.label:
            left, top, right, bottom = draw.textbbox((x0, y0), det.label)
            ty = y0 - (bottom - top) - 2 if y0 - (bottom - top) - 2 >= 0 else y0
            draw.rectangle((x0, ty, x0 + right - left + 4, ty + bottom - top + 2), fill=rgb)
            draw.text((x0 + 2, ty), det.label, fill=(255, 255, 255))
    return out


def draw_caption(image: Image.Image, lines: Sequence[str]) -> Image.Image:
    """``image`` with text lines (e.g. prefix and suffix) in a band beneath it."""
    image = image.convert("RGB")
    probe = ImageDraw.Draw(image)
    line_h = probe.textbbox((0, 0), "Ag")[3] + 4
    text_w = max((probe.textbbox((0, 0), line)[2] for line in lines), default=0) + 6
    band = Image.new(
        "RGB", (max(image.width, text_w), image.height + line_h * len(lines) + 4), (255, 255, 255)
    )
    band.paste(image, (0, 0))
    draw = ImageDraw.Draw(band)
    for k, line in enumerate(lines):
        draw.text((3, image.height + 2 + k * line_h), line, fill=(0, 0, 0))
    return band
