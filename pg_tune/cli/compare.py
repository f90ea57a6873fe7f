"""``pg-tune compare RECIPE --models A,B,C [--steps N] [--out DIR]``: the same fine-tune on several
models, side by side (``pg_tune.measure.compare``)."""

from __future__ import annotations

import argparse
import signal
import sys

from pg_tune.cli.args import add_remote_code_argument


def _cmd_compare(args: argparse.Namespace) -> int:
    from pg_tune.measure.compare import Interrupted, compare, markdown_table

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if len(models) < 1:
        print("pg-tune: error: --models: give one or more models, comma-separated", file=sys.stderr)
        return 2
    try:
        runs = compare(
            args.recipe,
            models,
            steps=args.steps,
            out_dir=args.out,
            overrides=args.overrides,
            trust_remote_code=args.trust_remote_code,
        )
    except Interrupted as e:
        print(
            f"pg-tune compare: interrupted by Ctrl-C during {e.model}; the models that finished are in "
            "results.json and table.md; run the same command again to continue (finished models are kept, "
            f"{e.model} resumes from its newest checkpoint)",
            file=sys.stderr,
        )
        return 128 + signal.SIGINT
    except KeyboardInterrupt:  # between two models' runs
        print(
            "pg-tune compare: interrupted by Ctrl-C; run the same command again to continue (finished models "
            "are kept)",
            file=sys.stderr,
        )
        return 128 + signal.SIGINT
    print("\n" + markdown_table(runs))
    return 1 if any(r.error for r in runs) else 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="fine-tune several models alike and compare metrics, speed and memory")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides applied to every model")
    p.add_argument(
        "--models", required=True, help="comma-separated: tiny presets, hub ids or local checkpoints"
    )
    p.add_argument(
        "--steps", type=int, default=None, help="optimizer steps for every model (train.max_steps)"
    )
    p.add_argument("--out", default=None, help="report folder (default: <output_dir>/compare)")
    add_remote_code_argument(p)
    p.set_defaults(func=_cmd_compare)
