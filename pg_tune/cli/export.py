"""``pg-tune export RUN_DIR --out DIR [--dtype bf16|fp16|fp32] [--parity module|full]``: merged weights,
parity-checked (``pg_tune.export.merged``), with what serving engines need (``pg_tune.export.serving``);
``pg-tune export PATH --check serving``: which engines can serve the adapter or the export, and how."""

from __future__ import annotations

import argparse
import sys

from pg_tune.cli.args import add_remote_code_argument


def _cmd_export(args: argparse.Namespace) -> int:
    from pg_tune.export.merged import ExportError, export_merged

    if args.check == "serving":
        from pg_tune.export.serving import serving_report

        try:
            print(serving_report(args.run_dir))
        except (ExportError, OSError, ValueError) as e:
            print(f"pg-tune export: error: {e}", file=sys.stderr)
            return 2
        return 0
    if args.out is None:
        print("pg-tune export: error: --out DIR is required (or --check serving)", file=sys.stderr)
        return 2
    try:
        export_merged(
            args.run_dir, args.out, dtype=args.dtype, num_samples=args.samples, device=args.device,
            trust_remote_code=args.trust_remote_code, parity=args.parity,
        )  # fmt: skip
    except ExportError as e:
        print(f"pg-tune export: error: {e}", file=sys.stderr)
        return 2
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="merge a run's adapter into full-precision weights (parity-checked)")
    p.add_argument(
        "run_dir",
        help="a training run folder (has adapter/ and recipe.yaml); with --check serving also an adapter "
        "folder or an exported model folder",
    )
    p.add_argument("--out", help="new folder for the merged model")
    p.add_argument(
        "--check",
        choices=["serving"],
        help="serving: report per engine (vLLM, SGLang, TGI) whether the adapter as trained and the merged "
        "export can be served, and the command; exports nothing",
    )
    p.add_argument(
        "--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="dtype of the saved weights"
    )
    p.add_argument(
        "--parity",
        choices=["module", "full"],
        default="module",
        help="module: stream the merge shard by shard, check each merged module on random inputs "
        "(memory: about the largest tensor); full: load the whole model, compare logits on --samples samples",
    )
    p.add_argument("--samples", type=int, default=4, help="samples in the --parity full check")
    p.add_argument("--device", default=None, help="where to merge (default: cuda if available, else cpu)")
    add_remote_code_argument(p)
    p.set_defaults(func=_cmd_export)
