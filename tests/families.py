"""The model family of what a test holds (a recipe, a model, a preset name), as a command resolves it."""

from __future__ import annotations

from typing import Any

from pg_tune.config.recipe import Recipe
from pg_tune.models.family import ModelFamily, family_for, load_family


def family_of(thing: Any) -> ModelFamily:
    """A recipe's family with its mask codec bound (``load_family``), or the family of a model / name."""
    if isinstance(thing, Recipe):
        return load_family(thing.model.name_or_path, thing.model.vae_path)
    return family_for(thing)
