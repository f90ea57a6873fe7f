"""The ``pg-tune eval`` subcommand.

pg-tune eval RECIPE [--model DIR|ID] [--out DIR] [key.sub=value ...]
    evaluate every ``data.eval`` dataset; write metrics.json, predictions.jsonl, report/index.html
pg-tune eval --predictions predictions.jsonl [--out DIR]
    recompute the metrics of a saved predictions file, without loading a model
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pg_tune.cli.args import add_model_trust_arguments
from pg_tune.config import ConfigError, load_recipe
from pg_tune.data.sample import DataError


def _print_metrics(title: str, metrics: dict[str, float]) -> None:
    from pg_tune.evaluate.report import COUNT_SUFFIXES

    print(title)
    for name, value in metrics.items():
        shown = str(int(value)) if name.endswith(COUNT_SUFFIXES) else f"{value:.4f}"
        print(f"  {name + ':':<28} {shown}")


def _cmd_eval(args: argparse.Namespace) -> int:
    from pg_tune.models.family import load_family

    try:
        if args.predictions:
            if args.recipe or args.model:
                raise ConfigError(
                    "--predictions recomputes metrics from a file: give no recipe or --model with it"
                )
            from pg_tune.evaluate.predictions import family_of_predictions, read_predictions, rescore
            from pg_tune.evaluate.report import write_report

            path = Path(args.predictions)
            family = load_family(
                family_of_predictions(read_predictions(path), path, args.family), args.vae_path
            )
            overall, per_dataset = rescore(path, family)
            out_dir = Path(args.out) if args.out else path.parent / "rescored"
            out_dir.mkdir(parents=True, exist_ok=True)
            summary = {"predictions": str(path), "metrics": overall.metrics, "datasets": per_dataset,
                       "notes": overall.notes}  # fmt: skip
            (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
            index = write_report(
                out_dir / "report",
                title=f"pg_tune evaluation (re-scored from {path.name})",
                metrics_by_dataset=per_dataset or {"all": overall.metrics},
                records=overall.records,
                notes=overall.notes,
                mask_codec=family.mask_codec,
                limit=args.report_limit,
            )
            _print_metrics(f"{path}: {len(overall.records)} predictions", overall.metrics)
            for note in overall.notes:
                print(f"note: {note}")
            print(f"metrics: {out_dir / 'metrics.json'}\nreport:  {index}")
            return 0
        if not args.recipe:
            raise ConfigError("pg-tune eval needs a RECIPE (or --predictions FILE)")
        from pg_tune.data.validate import check_recipe_support
        from pg_tune.evaluate.run import evaluate_recipe

        recipe, _ = load_recipe(args.recipe, args.overrides)
        out_dir = Path(args.out) if args.out else Path(recipe.output_dir) / "eval"
        # The model evaluated (an adapter's family is its base's) renders the prompts and parses its output.
        family = load_family(args.model or recipe.model.name_or_path, args.vae_path or recipe.model.vae_path)
        check_recipe_support(recipe, family, splits=("eval",))
        outcome = evaluate_recipe(
            recipe, family, args.model, out_dir, args.report_limit,
            trust_remote_code=args.trust_remote_code, base=args.base,
        )  # fmt: skip
    except (OSError, ValueError) as e:  # missing/unloadable model or file: one line, no traceback
        if isinstance(e, (ConfigError, DataError)):
            raise
        print(f"pg-tune: error: {e}", file=sys.stderr)
        return 2
    for name, metrics in outcome.per_dataset.items():
        _print_metrics(name, metrics)
    for note in outcome.notes:
        print(f"note: {note}")
    print(f"metrics:     {out_dir / 'metrics.json'}")
    print(f"predictions: {out_dir / 'predictions.jsonl'}")
    print(f"report:      {out_dir / 'report' / 'index.html'}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a model on a recipe's eval datasets, or re-score predictions")
    p.add_argument("recipe", nargs="?", help="recipe whose data.eval datasets are evaluated")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. eval.limit=50")
    p.add_argument("--model", help="adapter dir (RUN/adapter), merged model dir, hub id or tiny preset; "
                   "default: the recipe's model")  # fmt: skip
    p.add_argument("--predictions", help="re-score this predictions.jsonl without loading a model")
    p.add_argument("--out", help="output folder (default: OUTPUT_DIR/eval, or PREDICTIONS_DIR/rescored)")
    p.add_argument(
        "--vae-path", help="big_vision's vae-oid.npz, to score referring segmentation by mask mIoU"
    )
    p.add_argument("--report-limit", type=int, default=200, help="samples shown per dataset and task")
    p.add_argument(
        "--family",
        help="with --predictions: the model family whose parser reads a file written before lines named "
        "their family (paligemma, gemma3, smolvlm)",
    )
    add_model_trust_arguments(p)
    p.set_defaults(func=_cmd_eval)
