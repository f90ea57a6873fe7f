"""Ground-truth masks as COCO ``segmentation`` values: polygons or RLE, rasterised on demand.

Samples keep masks in this compact form (``ObjectTarget.mask``) and rasterise them at the original
image resolution only when scoring or rendering needs the pixels.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def segmentation_to_mask(segmentation: Any, image_size: tuple[int, int]) -> np.ndarray:
    """A COCO ``segmentation`` (polygons, RLE or uncompressed RLE) -> HxW bool mask, via pycocotools."""
    from pycocotools import mask as mask_utils

    width, height = (int(v) for v in image_size)
    if isinstance(segmentation, list):
        if not segmentation or not all(isinstance(p, (list, tuple)) and len(p) >= 6 for p in segmentation):
            raise ValueError("polygons must be lists of at least 3 (x, y) points")
        rles = mask_utils.frPyObjects([[float(v) for v in p] for p in segmentation], height, width)
        rle = mask_utils.merge(rles)
    elif isinstance(segmentation, dict) and "counts" in segmentation:
        rle = dict(segmentation)
        if isinstance(rle["counts"], list):
            rle = mask_utils.frPyObjects(rle, height, width)
        elif isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
        if tuple(rle["size"]) != (height, width):
            raise ValueError(
                f"RLE size {list(rle['size'])} differs from the image's [height, width] {[height, width]}"
            )
    else:
        raise ValueError(f"expected polygons or an RLE dict, got {type(segmentation).__name__}")
    return mask_utils.decode(rle).astype(bool)


def mask_to_rle(mask: np.ndarray) -> dict[str, Any]:
    """A boolean HxW mask as a compact COCO RLE ``{"size": [h, w], "counts": str}`` (JSON-ready)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def mask_box(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """Tight pixel box ``(x0, y0, x1, y1)`` around a mask (x1/y1 exclusive); ``None`` if empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
