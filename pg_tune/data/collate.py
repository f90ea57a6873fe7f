"""What every model family's collator shares: the ``(index, Sample)`` dataset and the ignore label.

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


class SampleDataset(Dataset):
    """A list of samples, yielding ``(index, sample)`` so batches can name their rows."""

    def __init__(self, samples: Sequence[Sample]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[int, Sample]:
        return index, self.samples[index]
