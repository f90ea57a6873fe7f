"""PaliGemma 1 and 2: the family's folder (its interface is ``PaliGemmaFamily``).

Generic code reaches PaliGemma only through ``pg_tune.models.family.family_for``; the modules here
are imported on first use, so ``pg_tune.models.paligemma.boxes`` (pure Python) loads no torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"PaliGemmaFamily": "family", "PaliGemmaCollator": "collator"}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"pg_tune.models.paligemma.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'pg_tune.models.paligemma' has no attribute {name!r}")
