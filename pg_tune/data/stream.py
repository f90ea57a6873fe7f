"""Streamed training data: entries read as passes of rows, shuffled through a buffer, mixed by weight.

Used when a ``data.train`` entry sets ``streaming: true`` (``pg_tune.data.formats.hf``): rows come
from shards read in order (nothing is materialised on disk or in RAM), so a pass over an entry is:

1. its shards in a seeded order (file order with ``data.shuffle: false``), read row after row;
2. through a shuffle buffer of ``shuffle_buffer`` rows (the classic reservoir: each new row takes
   the place of a randomly drawn one, which is emitted; the rest is flushed shuffled at the end).

An epoch draws ``round(weight * rows)`` rows from each entry, like ``pg_tune.data.mix`` does for
in-memory entries (which, in a mix with a stream, become passes of a seeded permutation), in an
interleaving drawn from ``(seed, epoch)``. Every choice is a pure function of
``(seed, entry, pass)`` or ``(seed, epoch)``, so the whole sequence is fixed by the seed.

``StreamingSamples`` presents that endless sequence as an indexable view: index ``k`` is the
``k % len``-th row of epoch ``k // len``. Reading in order is a plain stream; a jump forward (a
resumed run starting at its checkpoint's position, or a DataLoader worker skipping the batches of
the others) replays the entries' streams up to that position *without decoding a single image*
(rows stay encoded until the collator), which is what makes resuming exact: the same rows, in the
same order, as the uninterrupted run. Replaying reads the skipped rows again (for a Hub stream:
downloads them again); it never needs the checkpoint to hold the buffer.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np
from torch.utils.data import Sampler

from pg_tune.data.sample import DataError, LazySamples, Sample


class EntryStream(Protocol):
    """One dataset entry as endless passes of rows (a streamed ``hf`` entry, or a wrapped list)."""

    where: str

    @property
    def num_rows(self) -> int:
        """Rows in one pass."""

    def rows(self, pass_no: int, shuffle: bool) -> Iterator[Any]:
        """Pass ``pass_no`` in its order: raw rows, cheap to produce and to skip (nothing decoded)."""

    def to_sample(self, row: Any, position: int) -> Sample:
        """The sample of one raw row (``position``: its place in the entry's endless stream)."""


def buffer_shuffled(rows: Iterator[Any], buffer_size: int, rng: random.Random) -> Iterator[Any]:
    """Shuffle a stream through a buffer of ``buffer_size`` rows (1 or less: unchanged order)."""
    if buffer_size <= 1:
        yield from rows
        return
    buffer: list[Any] = []
    for row in rows:
        if len(buffer) < buffer_size:
            buffer.append(row)
            continue
        slot = rng.randrange(buffer_size)
        yield buffer[slot]
        buffer[slot] = row
    rng.shuffle(buffer)
    yield from buffer


class SequenceStream:
    """An in-memory entry (a list of samples) as passes of a seeded permutation, one row per group."""

    def __init__(self, samples: Sequence[Sample], entry: int, seed: int, where: str = ""):
        from pg_tune.data.mix import _units

        self.samples = samples
        self.entry = entry
        self.seed = seed
        self.where = where or f"data.train[{entry}]"
        self.units = _units(samples)

    @property
    def num_rows(self) -> int:
        return len(self.units)

    def rows(self, pass_no: int, shuffle: bool) -> Iterator[int]:
        from pg_tune.data.mix import _pass_order, _pick

        order = _pass_order(self.seed, self.entry, pass_no, len(self.units)) if shuffle else None
        for k in range(len(self.units)):
            unit = self.units[order[k] if order is not None else k]
            yield _pick(unit, f"{self.seed}:{self.entry}:{pass_no}:{k}")

    def to_sample(self, row: int, position: int) -> Sample:
        return self.samples[row]


class _Cursor:
    """Where one entry's stream is: pass, offset in the pass, and the live iterator."""

    def __init__(self, stream: EntryStream, pass_no: int, shuffle: bool):
        self.pass_no = pass_no
        self.offset = 0
        self.rows = stream.rows(pass_no, shuffle)


class StreamingSamples(LazySamples):
    """Training entries, at least one streamed, as one indexable sequence of ``len`` rows an epoch.

    Index ``k >= len`` is valid too: row ``k % len`` of epoch ``k // len`` (what
    ``EpochSampler`` yields). ``parts`` are the entries' streams, ``weights`` their recipe weights.
    """

    def __init__(
        self, streams: Sequence[EntryStream], weights: Sequence[float], seed: int, shuffle: bool = True
    ):
        if len(streams) != len(weights):
            raise ValueError(f"{len(weights)} weights for {len(streams)} entries")
        self.parts = list(streams)
        self.weights = list(weights)
        self.seed = seed
        self.shuffle = shuffle
        self.counts = [round(w * s.num_rows) for w, s in zip(self.weights, self.parts, strict=True)]
        self._labels: tuple[int, np.ndarray, np.ndarray] | None = None
        self._cursors: dict[int, _Cursor] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return sum(self.counts)

    # Live iterators do not travel to DataLoader workers: each worker opens its own.
    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cursors": {}, "_labels": None}

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, int) and index >= len(self):
            return self._sample(index)
        return super().__getitem__(index)

    def _epoch_labels(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Which entry each position of ``epoch`` draws from, and that row's rank within its entry."""
        if self._labels is None or self._labels[0] != epoch:
            labels = np.repeat(np.arange(len(self.parts), dtype=np.int32), self.counts)
            if self.shuffle:
                labels = np.random.default_rng([self.seed, epoch]).permutation(labels)
            rank = np.empty(len(labels), dtype=np.int64)  # 12 bytes a row of the epoch in all
            for entry in range(len(self.parts)):
                where = np.flatnonzero(labels == entry)
                rank[where] = np.arange(len(where))
            self._labels = (epoch, labels, rank)
        return self._labels[1], self._labels[2]

    def locate(self, index: int) -> tuple[int, int]:
        """(entry, position in that entry's endless stream) of global row ``index``."""
        epoch, j = divmod(index, len(self))
        labels, rank = self._epoch_labels(epoch)
        entry = int(labels[j])
        return entry, epoch * self.counts[entry] + int(rank[j])

    def entry_of(self, index: int) -> int:
        """Which recipe entry row ``index`` comes from (as ``ConcatSamples.entry_of``)."""
        return self.locate(index)[0]

    def _sample(self, index: int) -> Sample:
        if index < 0:
            raise IndexError(index)
        entry, position = self.locate(index)
        stream = self.parts[entry]
        pass_no, offset = divmod(position, stream.num_rows)
        if self._pid != os.getpid():  # a forked DataLoader worker: open its own readers
            self._cursors, self._pid = {}, os.getpid()
        cursor = self._cursors.get(entry)
        if cursor is None or cursor.pass_no != pass_no or cursor.offset > offset:
            cursor = self._cursors[entry] = _Cursor(stream, pass_no, self.shuffle)
        try:
            while cursor.offset < offset:  # skip: raw rows only, no image decoded
                next(cursor.rows)
                cursor.offset += 1
            row = next(cursor.rows)
        except StopIteration:
            raise DataError(
                f"{stream.where}: pass {pass_no} ended after {cursor.offset} rows, but the entry was sized "
                f"at {stream.num_rows}; correct num_rows (or the dataset changed while training)"
            ) from None
        cursor.offset += 1
        return stream.to_sample(row, position)


class EpochSampler(Sampler[int]):
    """``k`` for ``k`` in ``[epoch * n, (epoch + 1) * n)``: in order, the epoch set by the loader."""

    def __init__(self, n: int):
        self.n, self.epoch = n, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        start = self.epoch * self.n
        self.epoch += 1
        return iter(range(start, start + self.n))


def as_streams(parts: Sequence[Any], seed: int, is_stream: Callable[[Any], bool]) -> list[EntryStream]:
    """Every entry as an ``EntryStream``: streamed ones as they are, lists wrapped."""
    return [p if is_stream(p) else SequenceStream(p, i, seed) for i, p in enumerate(parts)]
