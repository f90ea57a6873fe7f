"""Recipes: YAML in, typed and validated sections out."""

from pg_tune.config.recipe import Recipe, load_recipe, parse_recipe, resolved
from pg_tune.config.schema import ConfigError

__all__ = ["ConfigError", "Recipe", "load_recipe", "parse_recipe", "resolved"]
