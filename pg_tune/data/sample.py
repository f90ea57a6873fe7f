"""The one data contract: every dataset adapter yields ``Sample``s, nothing else.

Adapters never tokenize and never write model-specific strings: a sample carries its task, its
prompt (``prefix``) and either literal target text (``suffix``: captions, answers, raw JSONL rows)
or typed ``targets`` (``ObjectTarget``: label, pixel box, optional real mask). A preference pair is
the same sample with a second, dispreferred answer: ``suffix`` is the chosen one and ``rejected``
the other (``rejected_view`` is that answer as a sample of its own). The model family
(``pg_tune.models.family``) renders targets to text and its collator turns samples into inputs;
scoring compares predictions with the targets themselves (true pixel boxes and masks).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from PIL import Image


@dataclass(frozen=True)
class ObjectTarget:
    """One ground-truth object: its label, its box and, where the data has one, its real mask.

    ``box`` is ``(x0, y0, x1, y1)`` in pixels of the ORIGINAL image. ``mask`` is a COCO
    ``segmentation``: a list of polygons ``[[x, y, x, y, ...], ...]`` or an RLE dict
    ``{"size": [h, w], "counts": ...}``; ``rasterise`` turns it into a boolean array at the
    original resolution (lazily: nothing is decoded until scoring or rendering asks).
    """

    label: str
    box: tuple[float, float, float, float]
    mask: Any = None

    def rasterise(self, image_size: tuple[int, int]):
        """The mask as an ``[height, width]`` bool array for an image ``(width, height)``; None if none."""
        if self.mask is None:
            return None
        from pg_tune.data.masks import segmentation_to_mask

        return segmentation_to_mask(self.mask, image_size)


@dataclass(frozen=True)
class Sample:
    """One image with its prompt (``prefix``) and target (``suffix``).

    ``source`` says where the row came from (``file:line`` or ``dataset[row]``) so every error can
    name it. ``task`` and ``references`` are what evaluation needs: the metric family and every
    ground truth (all captions of an image, all answers of a question).

    ``task`` is one of ``TASKS``. Box and mask tasks carry ``targets`` (typed ground truth, see
    ``ObjectTarget``) and ``image_size`` (width, height) instead of target text: the model family
    renders them (``ModelFamily.render_target``). ``meta`` carries anything else a row knows.

    ``rejected`` makes the sample a preference pair (``train.objective: dpo``): ``suffix`` is the
    chosen answer and ``rejected`` the dispreferred one, both text for the same image and prompt.
    """

    image: str | Path | Image.Image
    prefix: str
    suffix: str
    source: str
    task: str = "caption"
    references: tuple[str, ...] = ()
    meta: Mapping[str, Any] = field(default_factory=dict)
    targets: tuple[ObjectTarget, ...] = ()
    image_size: tuple[int, int] | None = None
    rejected: str | None = None

    @property
    def all_references(self) -> tuple[str, ...]:
        return self.references or (self.suffix,)

    @property
    def is_pair(self) -> bool:
        """True for a preference pair (``suffix`` chosen, ``rejected`` dispreferred)."""
        return self.rejected is not None

    def rejected_view(self) -> Sample:
        """The pair's rejected answer as a sample of its own (same image, prompt, source), so a family
        renders and lays it out exactly as it does the chosen one."""
        if self.rejected is None:
            error = DataError(
                f"{self.source}: not a preference pair (no rejected answer); train.objective=dpo trains on "
                "rows with a chosen and a rejected answer"
            )
            error.reason = "not_a_pair"  # type: ignore[attr-defined]
            raise error
        return replace(self, suffix=self.rejected, rejected=None, references=())


def targets_json(objects: Sequence[ObjectTarget]) -> list[dict[str, Any]]:
    """Ground-truth objects as JSON (preview, ``reference_objects`` in predictions.jsonl)."""
    return [
        {
            "label": o.label,
            "box": [round(float(v), 3) for v in o.box],
            **({"mask": o.mask} if o.mask is not None else {}),
        }
        for o in objects
    ]


def targets_from_json(rows: Any, where: str) -> tuple[ObjectTarget, ...]:
    """``targets_json`` read back; raises ``DataError`` naming ``where`` on a malformed entry."""
    if not isinstance(rows, list):
        raise DataError(f"{where}: expected a list of objects, got {type(rows).__name__}")
    out = []
    for k, row in enumerate(rows):
        try:
            box = tuple(float(v) for v in row["box"])
            if len(box) != 4:
                raise ValueError
            out.append(ObjectTarget(str(row.get("label", "")), box, row.get("mask")))
        except (KeyError, TypeError, ValueError, AttributeError):
            raise DataError(
                f"{where}[{k}]: expected {{label, box: [x0, y0, x1, y1], mask?}}, got {row!r}"
            ) from None
    return tuple(out)


class DataError(ValueError):
    """A bad row or file; the message names the file and line (or dataset row) and the field."""


class LazySamples(Sequence[Sample]):
    """A sequence of samples made on access (``_sample(i)``), for sets too large to hold in RAM.

    Handles negative indices and slices once, for every lazy view (mixes, memory-mapped tables).
    """

    def _sample(self, index: int) -> Sample:
        raise NotImplementedError

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self._sample(i) for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self._sample(index)
