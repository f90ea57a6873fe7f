"""``pg-tune plan RECIPE [--memory 24GiB] [--device cpu|cuda]``: expected peak memory by part, before
anything loads, and the micro-batch that fits (``pg_tune.measure.plan``)."""

from __future__ import annotations

import argparse
import sys

import torch


def _cmd_plan(args: argparse.Namespace) -> int:
    from pg_tune.config import load_recipe
    from pg_tune.measure.plan import estimate, format_plan, parse_memory, suggest_micro_batch
    from pg_tune.models.family import load_family

    recipe, _ = load_recipe(args.recipe, args.overrides)
    try:
        memory = parse_memory(args.memory) if args.memory is not None else None
        family = load_family(recipe.model.name_or_path)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        plan = estimate(recipe, family, device)
        print(format_plan(plan))
        if memory is None:
            return 0
        fit = suggest_micro_batch(recipe, family, memory, device)
    except (ValueError, OSError) as e:  # an unknown model, no config reachable, a bad --memory
        print(f"pg-tune plan: error: {e}", file=sys.stderr)
        return 2
    global_batch = recipe.train.batch_size * recipe.train.grad_accum
    if fit is None:
        print(
            f"\ndoes not fit in {args.memory}: micro-batch 1 needs {estimate(recipe, family, device, 1).peak / 1e9:.2f} GB; "
            "try train.gradient_checkpointing=true, quantization.mode=4bit or a lower resolution"
        )
        return 1
    micro, accum, fitted = fit
    print(
        f"\nfits in {args.memory}: train.batch_size={micro} train.grad_accum={accum} (global batch {global_batch}), "
        f"expected peak {fitted.peak / 1e9:.2f} GB"
    )
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="expected peak memory of a recipe, before anything loads")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.batch_size=4")
    p.add_argument("--memory", default=None, help="memory to fit, e.g. 24GiB: suggests the micro-batch")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    p.set_defaults(func=_cmd_plan)
