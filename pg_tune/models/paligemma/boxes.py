"""Boxes to ``<locNNNN>`` tokens and back, the way big_vision trained PaliGemma.

Encoding (big_vision ``pp/proj/paligemma``): a pixel box ``[x0, y0, x1, y1]`` is normalised to
``[ymin, xmin, ymax, xmax]`` by the original image height/width, binned with ``round(v * 1023)``,
clipped to ``[0, 1023]`` and written as ``<loc%04d>`` in y, x, y, x order. Objects are joined with
``" ; "``. ``round`` here is Python's, which rounds halves to even exactly like ``tf.round`` does,
so a value of 2.5 bins to 2 (not 3) in both.

Decoding divides by 1023, not 1024. Hugging Face's demos decode with ``/1024``, but PaliGemma was
trained on big_vision's ``* 1023`` binning, so ``/1023`` is the exact inverse of what the model
learned; the two rules differ by less than 0.1% of the image size (at most one bin).

``parse_detections`` reads what models really emit, not only well-formed strings: labels may be
missing, spacing may vary, output may be cut off mid-object, objects may repeat, ``<eos>``/``<pad>``
may trail, and a box may come with ``ymin > ymax``. It never raises on such text; it returns what it
can recover (possibly ``[]``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pg_tune.data.boxes import check_image_size, check_xyxy

__all__ = [
    "MAX_LOC",
    "NUM_SEG_TOKENS",
    "Detection",
    "decode_box",
    "encode_box",
    "encode_objects",
    "loc_bins",
    "parse_detection_spans",
    "parse_detections",
]

MAX_LOC = 1023
"""Largest location bin: ``<loc0000>``..``<loc1023>``."""
NUM_SEG_TOKENS = 16
"""A referring-segmentation answer carries 16 ``<segNNN>`` codes after its 4 loc tokens."""
_MAX_SEG = 127

OBJECT_SEPARATOR = " ; "


@dataclass(frozen=True)
class Detection:
    """One object read back from model output.

    ``box`` is pixel ``(x0, y0, x1, y1)`` with ``x0 <= x1`` and ``y0 <= y1``; ``loc`` keeps the raw
    bins in token order ``(ymin, xmin, ymax, xmax)`` (after sorting each pair) so callers can
    re-emit or compare tokens exactly; ``seg`` holds the 16 mask codes when the object had them.
    """

    label: str
    box: tuple[float, float, float, float]
    loc: tuple[int, int, int, int]
    seg: tuple[int, ...] | None = None


def _bin(v: float) -> int:
    return min(max(round(v * MAX_LOC), 0), MAX_LOC)


def loc_bins(box_xyxy: Sequence[float], image_size: Sequence[int]) -> tuple[int, int, int, int]:
    """Bins ``(ymin, xmin, ymax, xmax)`` in token order; out-of-image boxes are clipped, as in big_vision."""
    x0, y0, x1, y1 = check_xyxy(box_xyxy)
    width, height = check_image_size(image_size)
    return (_bin(y0 / height), _bin(x0 / width), _bin(y1 / height), _bin(x1 / width))


def _loc_string(bins: Iterable[int]) -> str:
    return "".join(f"<loc{b:04d}>" for b in bins)


def encode_box(box_xyxy: Sequence[float], image_size: Sequence[int]) -> str:
    """Pixel box ``[x0, y0, x1, y1]`` of an image ``(width, height)`` -> ``"<locY><locX><locY><locX>"``."""
    return _loc_string(loc_bins(box_xyxy, image_size))


def encode_objects(objects: Iterable[tuple[str, Sequence[float]]], image_size: Sequence[int]) -> str:
    """Detection suffix: ``"<loc..>x4 label ; <loc..>x4 label"`` for ``(label, box_xyxy)`` pairs."""
    parts = []
    for item in objects:
        try:
            label, box = item
        except (TypeError, ValueError):
            raise ValueError(f"each object must be a (label, box_xyxy) pair, got {item!r}") from None
        label = str(label).strip()
        if not label:
            raise ValueError(f"object label is empty for box {box!r}: detection suffixes need a label")
        parts.append(f"{encode_box(box, image_size)} {label}")
    return OBJECT_SEPARATOR.join(parts)


_LOC_RE = re.compile(r"<loc(\d{4})>")


def decode_box(loc: str | Sequence[int], image_size: Sequence[int]) -> tuple[float, float, float, float]:
    """Four loc bins (ints in token order, or a ``"<loc..>x4"`` string) -> pixel ``(x0, y0, x1, y1)``.

    Uses big_vision's ``/1023`` (see the module docstring). Swapped pairs are sorted so the result
    is always a proper box.
    """
    width, height = check_image_size(image_size)
    if isinstance(loc, str):
        bins = [int(m) for m in _LOC_RE.findall(loc)]
    else:
        try:
            bins = [int(v) for v in loc]
        except (TypeError, ValueError):
            raise ValueError(f"loc must be 4 ints or a '<loc..>' string, got {loc!r}") from None
    if len(bins) != 4 or not all(0 <= b <= MAX_LOC for b in bins):
        raise ValueError(f"loc must be 4 bins in [0, {MAX_LOC}], got {loc!r}")
    ymin, xmin, ymax, xmax = bins
    ymin, ymax = sorted((ymin, ymax))
    xmin, xmax = sorted((xmin, xmax))
    return (xmin / MAX_LOC * width, ymin / MAX_LOC * height, xmax / MAX_LOC * width, ymax / MAX_LOC * height)


# Anything in angle brackets that is not a loc/seg token (<eos>, <pad>, <end_of_turn>, ...) is noise.
_OTHER_SPECIAL_RE = re.compile(r"<(?!loc\d{4}>|seg\d{3}>)[^<>\s]*>")
_PIECE_RE = re.compile(r"<loc(\d{4})>|<seg(\d{3})>|(;)|([^<;]+|<)")


def parse_detections(text: str, image_size: Sequence[int]) -> list[Detection]:
    """Read detections (and segmentation codes) from generated text; never raises on the text.

    Rules, chosen for what PaliGemma emits in practice:

    - an object starts with 4 loc tokens (spaces between them are allowed); fewer than 4 before the
      text ends or something else intervenes is a truncated/garbled group and is dropped;
    - up to 16 ``<segNNN>`` may follow; only a complete set of 16 is kept in ``seg``;
    - the label is the text after the tokens up to ``;`` or the next loc token (may be empty);
    - ``<eos>``, ``<pad>`` and other non-loc/seg special tokens are ignored;
    - exact duplicates (same label, bins and codes) are kept once, in first-seen order;
    - loc bins above 1023 make the object invalid; seg codes above 127 drop only the codes.

    ``image_size`` is ``(width, height)`` of the original image; a bad one is a caller bug and raises.
    """
    return [detection for detection, _ in parse_detection_spans(text, image_size)]


def parse_detection_spans(text: str, image_size: Sequence[int]) -> list[tuple[Detection, tuple[int, int]]]:
    """`parse_detections`, each detection with the ``[start, end)`` characters of ``text`` it was read
    from (its loc tokens through its label, separators excluded), e.g. to score it from the
    log-probabilities of the tokens that wrote it (``pg_tune.evaluate.metrics.detection``)."""
    width, height = check_image_size(image_size)
    if not isinstance(text, str):
        return []
    # Same length, so character positions still index the caller's text.
    text = _OTHER_SPECIAL_RE.sub(lambda m: " " * len(m.group()), text)

    detections: list[tuple[Detection, tuple[int, int]]] = []
    seen: set[tuple[str, tuple[int, ...], tuple[int, ...] | None]] = set()
    pending_locs: list[int] = []
    pending_start = 0
    current: dict | None = None

    def finish() -> None:
        nonlocal current
        if current is None:
            return
        locs, segs, label = current["loc"], current["seg"], " ".join("".join(current["label"]).split())
        start, end = current["start"], current["end"]
        current = None
        if not all(0 <= b <= MAX_LOC for b in locs):
            return
        seg = tuple(segs) if len(segs) == NUM_SEG_TOKENS and all(0 <= s <= _MAX_SEG for s in segs) else None
        ymin, ymax = sorted((locs[0], locs[2]))
        xmin, xmax = sorted((locs[1], locs[3]))
        loc = (ymin, xmin, ymax, xmax)
        key = (label, loc, seg)
        if key in seen:
            return
        seen.add(key)
        box = (
            xmin / MAX_LOC * width,
            ymin / MAX_LOC * height,
            xmax / MAX_LOC * width,
            ymax / MAX_LOC * height,
        )
        detections.append((Detection(label=label, box=box, loc=loc, seg=seg), (start, end)))

    for match in _PIECE_RE.finditer(text):
        loc_digits, seg_digits, separator, other = match.groups()
        if loc_digits is not None:
            if current is not None:
                finish()
            if not pending_locs:
                pending_start = match.start()
            pending_locs.append(int(loc_digits))
            if len(pending_locs) == 4:
                current = {"loc": pending_locs, "seg": [], "label": [], "labelled": False}
                current.update(start=pending_start, end=match.end())
                pending_locs = []
        elif seg_digits is not None:
            pending_locs = []
            if current is not None and not current["labelled"] and len(current["seg"]) < NUM_SEG_TOKENS:
                current["seg"].append(int(seg_digits))
                current["end"] = match.end()
        elif separator is not None:
            pending_locs = []
            finish()
        else:
            if other.strip():
                pending_locs = []  # text inside a loc group: the group is garbled
                if current is not None:
                    current["labelled"] = True
                    current["label"].append(other)
                    current["end"] = match.start() + len(other.rstrip())
            elif current is not None and current["labelled"]:
                current["label"].append(other)
    finish()
    return detections
