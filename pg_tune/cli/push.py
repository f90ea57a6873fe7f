"""``pg-tune push RUN_DIR --repo-id OWNER/NAME [--merged] [--public] [--revision R] [--dry-run]``: upload a
run's adapter (or merged weights) to the Hugging Face Hub, private by default (``pg_tune.export.hub``)."""

from __future__ import annotations

import argparse
import sys

from pg_tune.cli.args import add_remote_code_argument


def _cmd_push(args: argparse.Namespace) -> int:
    from huggingface_hub.errors import HfHubHTTPError

    from pg_tune.export.hub import PublicRepoError, push
    from pg_tune.export.merged import ExportError
    from pg_tune.train.lock import FolderInUse

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
    except (ExportError, FolderInUse, HfHubHTTPError, PublicRepoError) as e:
        print(f"pg-tune push: error: {e}", file=sys.stderr)
        return 2
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
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
