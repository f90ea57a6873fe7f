"""``pg-tune validate RECIPE [key.sub=value ...]``: check a recipe without loading anything heavy.

Everything training would refuse before its first step is refused here, with the dotted key and
the fix: keys, types and values (``pg_tune.config``), the tasks the model family can do, the
model (quantizing a tiny preset, the text budget against the model's context:
``pg_tune.models.checks``). Settings the chosen method ignores are named in warnings.
"""

from __future__ import annotations

import argparse


def _cmd_validate(args: argparse.Namespace) -> int:
    from pg_tune.config import load_recipe
    from pg_tune.data.validate import check_recipe_support
    from pg_tune.models.checks import check_recipe_model
    from pg_tune.models.family import family_for

    recipe, _ = load_recipe(args.recipe, args.overrides)
    try:
        family = family_for(recipe.model.name_or_path)
    except (ValueError, OSError) as e:
        family, notes = None, [f"note: model not checked ({e})"]
    if family is not None:
        check_recipe_support(recipe, family)
        notes = check_recipe_model(recipe, family)
    for line in [*recipe.ignored_settings(), *notes]:
        print(line)
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
