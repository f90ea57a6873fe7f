"""Datasets in, ``Sample``s out; one collator turns samples into PaliGemma inputs."""

from pg_tune.data.bad_rows import BadRows
from pg_tune.data.collate import IGNORE_INDEX, PaliGemmaCollator, SampleDataset
from pg_tune.data.sample import DataError, Sample

__all__ = ["IGNORE_INDEX", "BadRows", "DataError", "PaliGemmaCollator", "Sample", "SampleDataset"]
