"""The ``pg-tune export`` and ``pg-tune push`` subcommands (parsers and handlers).

pg-tune export RUN_DIR --out DIR [--dtype bf16|fp16|fp32] [--parity module|full]   merged weights, parity-checked
pg-tune push RUN_DIR --repo-id OWNER/NAME [--merged] [--public] [--revision R] [--dry-run]   (private by default)
"""

from __future__ import annotations

import argparse
import sys

from pg_tune.commands_eval import add_remote_code_argument


def _cmd_export(args: argparse.Namespace) -> int:
    from pg_tune.export import ExportError, export_merged

    try:
        export_merged(
            args.run_dir, args.out, dtype=args.dtype, num_samples=args.samples, device=args.device,
            trust_remote_code=args.trust_remote_code, parity=args.parity,
        )  # fmt: skip
    except ExportError as e:
        print(f"pg-tune export: error: {e}", file=sys.stderr)
        return 2
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    from huggingface_hub.errors import HfHubHTTPError

    from pg_tune.export import ExportError
    from pg_tune.hub import PublicRepoError, push

    try:
        push(
            args.run_dir,
            args.repo_id,
            merged=args.merged,
            private=not args.public,
            revision=args.revision,
            dry_run=args.dry_run,
            dtype=args.dtype,
            base_model=args.base_model,
            tags=args.tag,
            datasets=args.dataset,
            trust_remote_code=args.trust_remote_code,
        )
    except (ExportError, HfHubHTTPError, PublicRepoError) as e:
        print(f"pg-tune push: error: {e}", file=sys.stderr)
        return 2
    return 0


def add_export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="merge a run's adapter into full-precision weights (parity-checked)")
    p.add_argument("run_dir", help="a training run folder (has adapter/ and recipe.yaml)")
    p.add_argument("--out", required=True, help="new folder for the merged model")
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


def add_push_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("push", help="upload a run's adapter (or merged weights) to the Hugging Face Hub")
    p.add_argument("run_dir")
    p.add_argument("--repo-id", required=True, help="OWNER/NAME; created if missing")
    p.add_argument("--merged", action="store_true", help="push merged weights (exported first if needed)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="with --merged")
    visibility = p.add_mutually_exclusive_group()
    visibility.add_argument("--public", action="store_true", help="create the repo public (default: private)")
    visibility.add_argument("--private", action="store_true", help="the default; kept for existing scripts")
    p.add_argument("--revision", default=None, help="branch to push to (created if missing)")
    p.add_argument("--dry-run", action="store_true", help="list exactly what would be uploaded; send nothing")
    p.add_argument("--base-model", default=None, help="base model hub id for the card (local bases)")
    p.add_argument("--tag", action="append", default=[], help="extra model-card tag (repeatable)")
    p.add_argument("--dataset", action="append", default=[], help="hub dataset id for the card (repeatable)")
    add_remote_code_argument(p)
    p.set_defaults(func=_cmd_push)
