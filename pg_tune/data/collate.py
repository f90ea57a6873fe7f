"""What every model family's collator shares: the ``(index, Sample)`` dataset, the ignore label and
the row order of a preference batch.

The collators themselves are per family (``ModelFamily.collator``; PaliGemma's is
``pg_tune.models.paligemma.PaliGemmaCollator``): the sequence layout and attention rule are the
model's, not the data's.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch.utils.data import Dataset

from pg_tune.data.sample import Sample

IGNORE_INDEX = -100
"""Label of every position the loss skips (prompt, image tokens, padding)."""


def padded_length(longest: int, multiple: int = 1) -> int:
    """A batch's sequence length: its longest row rounded up to a multiple of ``multiple``
    (``data.pad_to_multiple_of``). Fewer distinct lengths mean fewer distinct matmul shapes, and the
    CPU backend keeps kernels per shape for the life of the process (docs/performance.md, "Batch
    lengths")."""
    return -(-longest // multiple) * multiple


class SampleDataset(Dataset):
    """A list of samples, yielding ``(index, sample)`` so batches can name their rows."""

    def __init__(self, samples: Sequence[Sample]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[int, Sample]:
        return index, self.samples[index]


def pair_rows(batch: Sequence[tuple[int, Sample]]) -> list[tuple[int, Sample]]:
    """The rows of a preference batch of ``B`` pairs: the ``B`` chosen answers, then the ``B``
    rejected ones in the same order (row ``i`` and row ``B + i`` share their image and prompt). A
    sample without a rejected answer raises ``DataError`` (reason ``not_a_pair``)."""
    return list(batch) + [(index, sample.rejected_view()) for index, sample in batch]


def one_index_per_pair(batch: dict, pairs: int) -> dict:
    """A preference batch names each pair once: ``sample_index`` keeps the chosen rows' ``pairs``
    entries (the rejected rows repeat them), so rows counted and rows named are pairs."""
    batch["sample_index"] = batch["sample_index"][:pairs]
    return batch
