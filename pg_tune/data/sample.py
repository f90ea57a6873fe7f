"""The one data contract: every dataset adapter yields ``Sample``s, nothing else.

Adapters never tokenize; the collator (``pg_tune.data.collate``) is the only place that turns a
sample into model inputs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

# Metric families: captioning (CIDEr), VQA accuracy, DocVQA (ANLS), OCR, COCO detection (mAP),
# referring detection (acc@IoU) and referring segmentation (mask mIoU).
TASKS = ("caption", "vqa", "docvqa", "ocr", "detect", "refer_detect", "refer_segment")


@dataclass(frozen=True)
class Sample:
    """One image with its prompt (``prefix``) and target (``suffix``).

    ``source`` says where the row came from (``file:line`` or ``dataset[row]``) so every error can
    name it. ``task`` and ``references`` are what evaluation needs: the metric family and every
    ground truth (all captions of an image, all answers of a question).

    ``task`` is one of ``TASKS``. ``meta`` carries what a metric needs beyond text, e.g.
    ``image_size`` (width, height) for box and mask tasks.
    """

    image: str | Path | Image.Image
    prefix: str
    suffix: str
    source: str
    task: str = "caption"
    references: tuple[str, ...] = ()
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def all_references(self) -> tuple[str, ...]:
        return self.references or (self.suffix,)


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
