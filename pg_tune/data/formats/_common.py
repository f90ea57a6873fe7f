"""Small pieces every format shares: reading JSON with line numbers, checking boxes, prompts.

Private to the format modules; each function reports through ``ctx.bad_rows`` with the place
(``file:line`` or ``file[index]``) and the field, so nothing is silently dropped.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pg_tune.data.bad_rows import BadRows
from pg_tune.data.sample import DataError, Sample


@dataclass(frozen=True)
class BuildContext:
    """What a builder may know besides its own options."""

    split: str  # "train" or "eval"
    bad_rows: BadRows
    seed: int = 0


def read_json(path: str | Path, what: str) -> Any:
    """A whole JSON file; a missing or malformed file is a ``DataError`` naming line and column."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {what} file not found")
    try:
        with path.open("rb") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON in {what}: {e.msg} (column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: {what} is not valid UTF-8 ({e.reason} at byte {e.start})") from None


def check_box(
    box_xyxy: Sequence[float], image_size: tuple[int, int], where: str, bad_rows: BadRows
) -> tuple[float, float, float, float] | None:
    """Clip a pixel box to the image (counted as ``box_clipped``); ``None`` if it is degenerate.

    Corners given in the wrong order (``x0 > x1`` or ``y0 > y1``) are swapped and counted as
    ``box_swapped`` (a repair, like clipping: the row is kept, the note names it).

    Degenerate means non-finite, or zero width/height after clipping: such a box encodes to equal
    loc tokens and teaches the model nothing.
    """
    try:
        x0, y0, x1, y1 = (float(v) for v in box_xyxy)
    except (TypeError, ValueError):
        bad_rows.bad("bad_box", f"{where}: box must be 4 numbers [x0, y0, x1, y1], got {box_xyxy!r}")
        return None
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        bad_rows.bad("bad_box", f"{where}: box has a non-finite value: {list(box_xyxy)!r}")
        return None
    width, height = image_size
    swapped = [name for name, (a, b) in (("x0 > x1", (x0, x1)), ("y0 > y1", (y0, y1))) if a > b]
    x0, x1 = sorted((x0, x1))
    y0, y1 = sorted((y0, y1))
    if swapped:
        bad_rows.note(
            "box_swapped",
            f"{where}: box {list(box_xyxy)!r} has {' and '.join(swapped)}; read as {[x0, y0, x1, y1]}",
        )
    clipped = (
        min(max(x0, 0.0), width),
        min(max(y0, 0.0), height),
        min(max(x1, 0.0), width),
        min(max(y1, 0.0), height),
    )
    if clipped != (x0, y0, x1, y1):
        bad_rows.note(
            "box_clipped",
            f"{where}: box {[round(v, 2) for v in (x0, y0, x1, y1)]} lies outside the {width}x{height} image; "
            f"clipped to {[round(v, 2) for v in clipped]}",
        )
    if clipped[2] - clipped[0] <= 0 or clipped[3] - clipped[1] <= 0:
        bad_rows.bad("degenerate_box", f"{where}: box {list(box_xyxy)!r} has no area inside the image")
        return None
    return clipped


def limit_reached(samples: Sequence[Sample], limit: int | None) -> bool:
    """True once ``samples`` holds ``limit`` samples: builders stop reading their source there."""
    return limit is not None and len(samples) >= limit


def apply_limit(samples: list[Sample], limit: int | None) -> list[Sample]:
    """The one meaning of a format's ``limit``: at most this many emitted samples, in source order.

    Counted after answer/caption/sentence expansion and bad-row skipping, so ``limit: 100`` gives
    100 samples whatever the format (``data_formats/README.md``).
    """
    return samples if limit is None else samples[:limit]


def format_prompt(template: str, where: str, **fields: str) -> str:
    """Fill ``{name}`` fields of a prompt template; an unknown field names the template."""
    try:
        return template.format(**fields)
    except (KeyError, IndexError) as e:
        raise DataError(
            f"{where}: prompt template {template!r} uses unknown field {e}; available: {', '.join(fields)}"
        ) from None
