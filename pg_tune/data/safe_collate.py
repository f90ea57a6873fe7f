"""A collator wrapper that turns rows failing at training time into counted skips (or a clear stop).

Images are opened lazily, inside the collator (often in a DataLoader worker), so a file that was
deleted, truncated or corrupted after the dataset was indexed only shows up mid-training. Lazy
formats (``hf``) build a row's ``Sample`` only when the DataLoader asks for it, so a row can also
fail inside the dataset's ``__getitem__``; ``SafeSampleDataset`` catches that ``DataError`` and
hands it to the collator as a ``BadRow``, which counts it exactly like a row failing to collate. Under
``data.on_bad_row=stop`` the collator's ``DataError`` (naming the row's source) propagates. Under
``skip`` the batch is rebuilt without the bad rows and the rejects travel with the batch under
``"bad_rows"`` as ``(reason, message)`` pairs — worker processes cannot share a counter with the
main process, so the training loop pops them and counts them in its ``BadRows``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.utils.data import Dataset

from pg_tune.data.bad_rows import reason_of
from pg_tune.data.sample import DataError, Sample

BAD_ROWS_KEY = "bad_rows"


@dataclass(frozen=True)
class BadRow:
    """A row whose ``Sample`` could not be made (``skip`` policy): why, and the message naming it."""

    reason: str
    message: str


class SafeSampleDataset(Dataset):
    """``(index, sample)`` pairs; a row that fails to load is a ``BadRow`` (skip) or a named stop."""

    def __init__(self, samples: Sequence[Sample], policy: Literal["stop", "skip"]):
        self.samples = samples
        self.policy = policy

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[int, Sample | BadRow]:
        try:
            return index, self.samples[index]
        except DataError as e:
            if self.policy == "stop":
                raise DataError(
                    f"{e} (data.on_bad_row=stop; set it to 'skip' to skip and count such rows)"
                ) from None
            return index, BadRow(reason_of(e), str(e))


class SafeCollator:
    """Wraps a collator of ``(index, Sample)`` pairs (e.g. ``PaliGemmaCollator``)."""

    def __init__(
        self,
        collate: Callable[[Sequence[tuple[int, Sample]]], dict[str, Any]],
        policy: Literal["stop", "skip"],
    ):
        self.collate = collate
        self.policy = policy

    def __call__(self, batch: Sequence[tuple[int, Sample | BadRow]]) -> dict[str, Any]:
        unread = [(row.reason, row.message) for _, row in batch if isinstance(row, BadRow)]
        batch = [pair for pair in batch if not isinstance(pair[1], BadRow)]
        if self.policy == "stop":
            return self.collate(batch)
        if not unread:
            try:
                return self.collate(batch)
            except DataError:
                pass
        # Find the bad rows one by one, then collate the good ones together (padding is per batch).
        good, rejected = [], unread
        for row in batch:
            try:
                self.collate([row])
            except DataError as e:
                rejected.append((reason_of(e), str(e)))
            else:
                good.append(row)
        out = self.collate(good) if good else empty_batch()
        out[BAD_ROWS_KEY] = rejected
        return out


def empty_batch() -> dict[str, Any]:
    """A batch with no rows: the loop sees zero rows and skips it."""
    return {
        "input_ids": torch.zeros((0, 0), dtype=torch.long),
        "sample_index": torch.zeros(0, dtype=torch.long),
    }


def batch_rows(batch: dict[str, Any]) -> int:
    return int(batch["input_ids"].shape[0])
