"""Length-grouped batching (``data.group_by_length``): batches of rows with similar lengths.

A row's length is what the model family's collator lays out: image tokens, template and text
(``Collator.row_length``). PaliGemma's image part is the same for every image at one resolution
(256 / 1024 / 4096 tokens), so there padding comes from the text alone; one SmolVLM2 image is 5 to
17 tiles (320 to 1,088 image tokens with the released settings) by its aspect ratio, so there the
image dominates. Rows are shuffled, cut into "mega-batches" of ``mega_batch_mult`` batches, sorted
by length inside each mega-batch and cut into batches;
the batch order is then shuffled, with the longest batch first so an out-of-memory shows at step
one, not hours in. Order stays random across epochs (drawn from the seed and the epoch number
alone, so resuming reproduces it) while each batch pads little.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch.utils.data import Sampler

from pg_tune.data.sample import Sample

if TYPE_CHECKING:
    from pg_tune.models.family import Collator


def row_lengths(samples: Sequence[Sample], collator: Collator) -> list[int]:
    """Sequence positions of each training row as the family's collator encodes it, image tokens
    included (``Collator.row_length``: images are not decoded, at most their header is read)."""
    return [collator.row_length(sample) for sample in samples]


class _EpochPermutation(Sampler[int]):
    """A shuffle of ``range(n)`` that depends only on (seed, epoch): resumable, same on every rank."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        self.epoch += 1
        return iter(torch.randperm(self.n, generator=generator).tolist())


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Yields lists of row indices (a ``batch_sampler`` for ``DataLoader``), grouped by length.

    Rows come from ``sampler`` (e.g. the weighted ``MixSampler``; default: a seeded shuffle), and
    every random choice depends only on (seed, epoch), so a resumed run sees the same batches.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        sampler: Sampler[int] | None = None,
        seed: int = 0,
        mega_batch_mult: int = 50,
        drop_last: bool = False,
    ):
        if batch_size < 1 or mega_batch_mult < 1:
            raise ValueError(
                f"batch_size and mega_batch_mult must be >= 1, got {batch_size}, {mega_batch_mult}"
            )
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.sampler = sampler if sampler is not None else _EpochPermutation(len(self.lengths), seed)
        self.seed = seed
        self.epoch = 0
        self.mega_batch_mult = mega_batch_mult
        self.drop_last = drop_last

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        if self.drop_last:
            return len(self.sampler) // self.batch_size
        return -(-len(self.sampler) // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        epoch = self.epoch
        self.epoch += 1
        order = list(iter(self.sampler))
        mega = self.batch_size * self.mega_batch_mult
        batches: list[list[int]] = []
        for start in range(0, len(order), mega):
            group = sorted(order[start : start + mega], key=lambda i: -self.lengths[i])
            batches.extend(group[i : i + self.batch_size] for i in range(0, len(group), self.batch_size))
        if self.drop_last:
            batches = [b for b in batches if len(b) == self.batch_size]
        if not batches:
            return iter(())
        random.Random(f"{self.seed}:batches:{epoch}").shuffle(batches)
        longest = max(range(len(batches)), key=lambda i: max(self.lengths[j] for j in batches[i]))
        batches[0], batches[longest] = batches[longest], batches[0]
        return iter(batches)


def padding_fraction(batches: Sequence[Sequence[int]], lengths: Sequence[int]) -> float:
    """Share of positions that are padding when each batch pads to its longest row."""
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    real = sum(lengths[i] for b in batches for i in b)
    return 1.0 - real / padded if padded else 0.0
