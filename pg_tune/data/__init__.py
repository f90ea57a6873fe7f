"""Datasets in, ``Sample``s out; the model family's collator turns samples into model inputs.

The names below are imported on first use, so the pure-Python parts of the package (box geometry,
``pg_tune.data.boxes``) load without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "BadRows": "pg_tune.data.bad_rows",
    "IGNORE_INDEX": "pg_tune.data.collate",
    "SampleDataset": "pg_tune.data.collate",
    "DataError": "pg_tune.data.sample",
    "ObjectTarget": "pg_tune.data.sample",
    "Sample": "pg_tune.data.sample",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pg_tune.data' has no attribute {name!r}")
