"""From a recipe's dataset entries to samples: one function for training, eval and validation."""

from __future__ import annotations

from pg_tune.config.recipe import DatasetEntry
from pg_tune.data.bad_rows import BadRows
from pg_tune.data.formats import FORMATS, BuildContext
from pg_tune.data.sample import Sample


def build_samples(entries: list[DatasetEntry], split: str, bad_rows: BadRows, seed: int = 0) -> list[Sample]:
    """All samples of one split, concatenated in recipe order."""
    ctx = BuildContext(split=split, bad_rows=bad_rows, seed=seed)
    samples: list[Sample] = []
    for entry in entries:
        samples.extend(FORMATS[entry.format].build(entry.options, ctx))
    return samples
