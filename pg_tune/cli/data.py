"""``pg-tune data``: see and check what a recipe's datasets give the trainer.

pg-tune data preview RECIPE [--split train|eval] [--limit N] [--out FILE.jsonl] [--draw DIR]
pg-tune data validate RECIPE [--processor NAME_OR_PATH]
"""

from __future__ import annotations

import argparse
import json


def _cmd_preview(args: argparse.Namespace) -> int:
    from pg_tune.config import ConfigError, load_recipe
    from pg_tune.data.preview import write_preview
    from pg_tune.models.family import load_family

    recipe, _ = load_recipe(args.recipe, args.overrides)
    family = load_family(recipe.model.name_or_path, recipe.model.vae_path)
    try:  # with the processor (the recipe's model.image applied), each row's image tokens are shown
        processor = family.load_processor(recipe.model)
    except ValueError as e:  # a model.image key the family does not take
        raise ConfigError(str(e)) from None
    except OSError as e:
        print(f"note: image tokens not shown: cannot load the processor of {recipe.model.name_or_path} ({e})")
        processor = None
    records, bad_rows = write_preview(recipe, family, args.split, args.limit, args.out, args.draw, processor)
    if args.out is None:
        for record in records:
            print(json.dumps(record, ensure_ascii=False))
    else:
        print(f"wrote {len(records)} {args.split} rows to {args.out}")
    if args.draw:
        print(f"drew {len(records)} images into {args.draw}")
    tokens = [r["image_tokens"] for r in records if "image_tokens" in r]
    if tokens:
        print(
            f"image tokens per row: {min(tokens)} to {max(tokens)} (mean {sum(tokens) / len(tokens):.0f}; model.image sets the budget)"
        )
    print(bad_rows.report())
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from pg_tune.config import load_recipe
    from pg_tune.data.validate import validate_recipe
    from pg_tune.models.checks import check_recipe_model
    from pg_tune.models.family import load_family

    recipe, _ = load_recipe(args.recipe, args.overrides)
    model = replace(recipe.model, name_or_path=args.processor) if args.processor else recipe.model
    processor, note = None, ""
    family = load_family(recipe.model.name_or_path, recipe.model.vae_path)
    try:
        processor = family.load_processor(model)
    except Exception as e:  # noqa: BLE001 - any failure to load only skips the length check
        note = (
            f"length budget NOT checked: cannot load the processor of {model.name_or_path} ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); pass --processor with a local copy"
        )
    if processor is not None:  # training refuses a text budget past the model's context
        check_recipe_model(recipe, family)
    report = validate_recipe(recipe, family, processor, note)
    print(report.render(recipe.data.max_text_length, recipe.data.on_bad_row))
    return 1 if report.num_bad else 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``pg-tune data {preview,validate}``."""
    data = sub.add_parser("data", help="preview or validate a recipe's datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True)

    p = data_sub.add_parser("preview", help="write the exact prefix/suffix pairs the trainer will see")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.add_argument("--split", choices=("train", "eval"), default="train")
    p.add_argument("--limit", type=int, default=20, help="rows to show (default 20)")
    p.add_argument("--out", help="write JSONL here instead of printing it")
    p.add_argument("--draw", metavar="DIR", help="also draw each row's decoded boxes/masks as PNGs here")
    p.set_defaults(func=_cmd_preview)

    p = data_sub.add_parser("validate", help="scan every row and report every bad one (exit 1 if any)")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.add_argument(
        "--processor", help="model whose tokenizer counts the length budget (default: the recipe's model)"
    )
    p.set_defaults(func=_cmd_validate)
