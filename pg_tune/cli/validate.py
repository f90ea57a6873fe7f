"""``pg-tune validate RECIPE [key.sub=value ...]``: check a recipe without loading anything heavy."""

from __future__ import annotations

import argparse


def _cmd_validate(args: argparse.Namespace) -> int:
    from pg_tune.config import load_recipe
    from pg_tune.data.validate import check_recipe_support
    from pg_tune.models.family import family_for

    recipe, _ = load_recipe(args.recipe, args.overrides)
    try:
        family = family_for(recipe.model.name_or_path)
    except (ValueError, OSError):
        family = None  # an unknown model is reported where it is loaded
    if family is not None:
        check_recipe_support(recipe, family)
    print(
        f"{args.recipe}: OK ({len(recipe.data.train)} train and {len(recipe.data.eval)} eval dataset entries, "
        f"model {recipe.model.name_or_path})"
    )
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="check a recipe (keys, types, dataset formats)")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=_cmd_validate)
