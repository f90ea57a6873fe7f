"""The ``pg-tune`` command line (also ``python -m pg_tune``): one module per subcommand, each
registered here.

pg-tune train RECIPE [key.sub=value ...]     fine-tune as the recipe says (--resume auto|PATH continues,
                                             --overwrite starts a non-empty output_dir clean)
pg-tune validate RECIPE [key.sub=value ...]  check a recipe without loading anything heavy
pg-tune data preview|validate RECIPE         the exact rows the trainer will see; every bad row
pg-tune eval RECIPE [--model DIR]            metrics, predictions.jsonl and an HTML report
pg-tune predict --model DIR --image P --prompt "detect cat"   one image, the parsed answer
pg-tune export RUN --out DIR                 merged weights, parity-checked
pg-tune push RUN --repo-id OWNER/NAME        adapter or merged weights to the Hub (private)
pg-tune plan RECIPE [--memory 24GiB]         expected peak memory by part; the micro-batch that fits
pg-tune compare RECIPE --models A,B,C [--steps N]  the same fine-tune on several models, side by side
pg-tune serve MODEL [--port 8000]            an OpenAI-compatible API and a web playground (127.0.0.1)

Overrides (``key.sub=value``, the value read as YAML) may stand anywhere after the subcommand, on
every command that reads a recipe (train, validate, plan, data preview/validate, eval).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from pg_tune.cli import compare, data, predict, push, serve, train, validate
from pg_tune.cli import eval as eval_
from pg_tune.cli import export as export_
from pg_tune.cli import plan as plan_
from pg_tune.config import ConfigError
from pg_tune.data.sample import DataError

SUBCOMMANDS = (train, validate, data, eval_, predict, export_, push, plan_, compare, serve)
"""Every subcommand module, in ``--help`` order; each has ``add_parser(sub)``."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pg-tune", description="Fine-tune PaliGemma with LoRA/QLoRA.")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in SUBCOMMANDS:
        command.add_parser(sub)
    return parser


OVERRIDE = re.compile(r"^[A-Za-z_][\w-]*(\.[\w-]+)*=")
"""A ``key.sub=value`` override (a recipe path never matches: it has a ``/`` or no ``=`` before it)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse a command line; ``key.sub=value`` overrides may stand anywhere after the subcommand
    (argparse alone takes them only right after RECIPE), in the order given."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    takes_overrides = hasattr(args, "overrides")
    found = set(extra) if takes_overrides else set()
    if takes_overrides:
        # `--resume train.lr=1e-5`: --resume's optional value swallowed an override.
        resume = getattr(args, "resume", None)
        if resume and OVERRIDE.match(resume) and not Path(resume).exists():
            args.resume = "auto"
            found.add(resume)
        found |= set(args.overrides)
    stray = [t for t in extra if not (takes_overrides and OVERRIDE.match(t))]
    if stray:
        hint = "" if takes_overrides or not any(OVERRIDE.match(t) for t in stray) else (
            f" (pg-tune {args.command} reads no recipe, so it takes no key=value overrides)"
        )  # fmt: skip
        parser.error(f"unrecognized arguments: {' '.join(stray)}{hint}")
    if takes_overrides:
        args.overrides = [t for t in argv if t in found]
    return args


def main(argv: list[str] | None = None) -> int:
    from pg_tune.models import host_memory

    try:
        # Before torch's first CPU allocation, which reads it (pg_tune.models.host_memory).
        host_memory.ask_for_huge_pages()
    except ValueError as e:  # an unknown PG_TUNE_MALLOC
        print(f"pg-tune: error: {e}", file=sys.stderr)
        return 2
    args = parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DataError) as e:
        print(f"pg-tune: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
