"""From a recipe's dataset entries to samples: one function for training, eval, preview and validation.

``build_samples`` returns a ``ConcatSamples``: the entries' samples end to end (a view, so lazy
entries such as ``hf`` stay lazy), which keeps each entry's part for ``pg_tune.data.mix``.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from pg_tune.config.recipe import DatasetEntry
from pg_tune.data.bad_rows import BadRows
from pg_tune.data.formats import FORMATS, BuildContext
from pg_tune.data.sample import DataError, LazySamples, Sample
from pg_tune.data.stream import StreamingSamples, as_streams


class ConcatSamples(LazySamples):
    """Several entries' samples as one sequence; ``parts`` keeps them apart for weighted mixing."""

    def __init__(self, parts: Sequence[Sequence[Sample]]):
        self.parts = list(parts)
        self.offsets = [0]
        for part in self.parts:
            self.offsets.append(self.offsets[-1] + len(part))

    def __len__(self) -> int:
        return self.offsets[-1]

    def _sample(self, index: int) -> Sample:
        part = bisect.bisect_right(self.offsets, index) - 1
        return self.parts[part][index - self.offsets[part]]

    def entry_of(self, index: int) -> int:
        """Which recipe entry row ``index`` came from."""
        return bisect.bisect_right(self.offsets, index) - 1


def build_samples(
    entries: list[DatasetEntry], split: str, bad_rows: BadRows, seed: int = 0, family=None
) -> ConcatSamples | StreamingSamples:
    """All samples of one split, concatenated in recipe order.

    When a training entry streams (``hf`` with ``streaming: true``), the split is a
    ``StreamingSamples``: every entry read as a stream and mixed by weight (``pg_tune.data.stream``).

    With a model ``family``, rows of a task it cannot do (reason ``unsupported_task``) and rows whose
    text holds one of its control tokens (``<image>``, ``<eos>``, ...: reason ``reserved_token``) are
    bad rows now, under ``data.on_bad_row``; lazily read entries are checked by the family's collator
    when each row is read.
    """
    ctx = BuildContext(split=split, bad_rows=bad_rows, seed=seed)
    parts = [FORMATS[entry.format].build(entry.options, ctx) for entry in entries]
    if family is not None:
        parts = [_drop_unusable(part, family, bad_rows) for part in parts]
    if any(_is_stream(p) for p in parts):
        streams = as_streams(parts, seed, _is_stream)
        for i, stream in enumerate(streams):
            stream.entry = i
        return StreamingSamples(streams, [e.weight for e in entries], seed)
    return ConcatSamples(parts)


def _is_stream(part: object) -> bool:
    return hasattr(part, "rows") and hasattr(part, "to_sample")


def _drop_unusable(part: Sequence[Sample], family, bad_rows: BadRows) -> Sequence[Sample]:
    if not isinstance(part, list):
        return part
    reserved = family.reserved_tokens(None)
    kept = []
    for sample in part:
        try:
            family.check_task(sample)
            family.check_text(sample, reserved)
        except DataError as e:
            bad_rows.bad(e.reason, str(e))  # type: ignore[attr-defined]
            continue
        kept.append(sample)
    return kept


def train_order(
    samples: Sequence[Sample], entries: list[DatasetEntry], seed: int, epoch: int = 0
) -> list[int]:
    """The rows training visits in ``epoch``, in order (what ``MixSampler`` yields)."""
    from pg_tune.data.mix import build_train_index

    if isinstance(samples, StreamingSamples):  # a stream's order is its index
        return range(epoch * len(samples), (epoch + 1) * len(samples))  # type: ignore[return-value]
    parts = samples.parts if isinstance(samples, ConcatSamples) else [samples]
    return build_train_index([e.weight for e in entries], parts, seed, epoch)
