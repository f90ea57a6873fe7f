"""Box geometry every model family and dataset shares: pixel boxes ``[x0, y0, x1, y1]`` of the
original image, checked and converted (COCO's ``[x, y, w, h]``). Model-specific encodings of boxes
(PaliGemma's ``<loc>`` tokens, the chat families' text boxes) live in their family's folder.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence


def check_image_size(image_size: Sequence[int]) -> tuple[int, int]:
    """``(width, height)`` as two positive ints; ``ValueError`` naming what was given otherwise."""
    try:
        width, height = image_size
    except (TypeError, ValueError):
        raise ValueError(f"image_size must be (width, height), got {image_size!r}") from None
    # numbers.Real covers Python and numpy scalars (np.int64 from an array's shape, np.float32);
    # bool is a Real too but never a size.
    if not all(
        isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and v > 0
        for v in (width, height)
    ):
        raise ValueError(f"image_size must be two positive numbers (width, height), got {image_size!r}")
    return int(width), int(height)


def check_xyxy(box_xyxy: Sequence[float]) -> tuple[float, float, float, float]:
    """Four finite floats ``(x0, y0, x1, y1)``; ``ValueError`` naming what was given otherwise."""
    try:
        values = tuple(float(v) for v in box_xyxy)
    except (TypeError, ValueError):
        raise ValueError(f"box must be 4 numbers [x0, y0, x1, y1], got {box_xyxy!r}") from None
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise ValueError(f"box must be 4 finite numbers [x0, y0, x1, y1], got {box_xyxy!r}")
    return values  # type: ignore[return-value]


def coco_bbox_to_xyxy(bbox: Sequence[float]) -> tuple[float, float, float, float]:
    """COCO stores ``[x, y, w, h]`` in absolute pixels; pg_tune's boxes are ``[x0, y0, x1, y1]``."""
    x, y, w, h = check_xyxy(bbox)
    if w < 0 or h < 0:
        raise ValueError(f"COCO bbox [x, y, w, h] has a negative size: {list(bbox)!r}")
    return (x, y, x + w, y + h)
