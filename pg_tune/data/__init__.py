"""Datasets in, ``Sample``s out; the model family's collator turns samples into model inputs."""

from pg_tune.data.bad_rows import BadRows
from pg_tune.data.collate import IGNORE_INDEX, SampleDataset
from pg_tune.data.sample import DataError, ObjectTarget, Sample

__all__ = ["IGNORE_INDEX", "BadRows", "DataError", "ObjectTarget", "Sample", "SampleDataset"]
