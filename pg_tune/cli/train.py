"""The ``pg-tune train`` subcommand: run ``train()``, then write ``summary.json`` and push.

pg-tune train RECIPE [key.sub=value ...]                 a new run (output_dir must be empty)
pg-tune train RECIPE --resume auto|PATH                  continue a run from its newest (or a named) checkpoint
pg-tune train RECIPE --overwrite                         start output_dir clean (says what it removes)

What happens around the loop lives here, not in it: pushing checkpoints and the final adapter to
the Hub (``hub:`` section), ``summary.json``, the summary printed at the end, and turning the
run's expected failures (a stop signal, a full disk, a refused resume or output folder, Ctrl-C
during setup) into one line and an exit status.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
from pathlib import Path
from typing import Any

from pg_tune.cli.args import add_remote_code_argument
from pg_tune.config import load_recipe


def run_summary(result) -> dict[str, Any]:
    """``summary.json``: what a run did, for people and for scripts."""
    return {
        "steps": result.steps,
        "first_loss": result.first_loss,
        "last_loss": result.last_loss,
        "metrics_before": result.metrics_before,
        "metrics_after": result.metrics_after,
        "seconds": result.seconds,
        "world_size": result.world_size,
        "dtype": result.dtype,
        "nonfinite_skipped": result.state.nonfinite_skipped,
        "bad_rows": result.bad_rows,
        "best_checkpoint": str(result.best_checkpoint) if result.best_checkpoint else None,
        "best_value": result.state.best_value,
        "stop_reason": result.stop_reason,
    }


def _strict(value: Any) -> Any:
    """NaN and infinities as null: ``summary.json`` is strict JSON (``NaN`` is not JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def write_summary(result) -> Path:
    """Write ``summary.json`` beside the adapter (atomically: it is read by scripts)."""
    from pg_tune.train.storage import disk_full_guard

    path = Path(result.output_dir) / "summary.json"
    tmp = path.with_suffix(".json.tmp")
    with disk_full_guard(path):
        tmp.write_text(json.dumps(_strict(run_summary(result)), indent=2, allow_nan=False))
    tmp.replace(path)
    return path


def run_training(recipe, resolved_recipe: dict[str, Any], resume: str | None = None, overwrite: bool = False):
    """``train()`` with what the command adds: Hub pushes and ``summary.json`` (main process)."""
    from pg_tune.data.validate import check_recipe_support
    from pg_tune.export.hub import push_from_training
    from pg_tune.models.family import load_family
    from pg_tune.train.loop import train
    from pg_tune.train.signals import kill_after_checkpoint_callback
    from pg_tune.train.storage import hold_output_dir

    family = load_family(recipe.model.name_or_path, recipe.model.vae_path)
    check_recipe_support(recipe, family)  # what pg-tune validate refuses, before anything loads
    output_dir = Path(recipe.output_dir)
    callbacks = [
        lambda step, path, accelerator: push_from_training(output_dir, recipe, accelerator, step=step)
    ]
    if (kill := kill_after_checkpoint_callback()) is not None:
        callbacks.append(kill)
    # One writer per run folder: held around training, the summary and the push (train() takes it too).
    command = "pg-tune train" + (f" --resume {resume}" if resume else " --overwrite" if overwrite else "")
    with hold_output_dir(output_dir, command):
        result = train(
            recipe, resolved_recipe, family, resume=resume, overwrite=overwrite, on_checkpoint=callbacks
        )
        if result.is_main_process and not result.already_finished:
            write_summary(result)
            push_from_training(output_dir, recipe, _MainProcess())
    return result


class _MainProcess:
    """What ``push_from_training`` needs of an accelerator, after training (main process only)."""

    is_main_process = True

    @staticmethod
    def print(*args, **kwargs) -> None:
        print(*args, **kwargs)


def summary_text(result) -> str:
    lines = [
        "",
        "=== pg_tune summary ===",
        f"steps:          {result.steps} in {result.seconds:.0f} s",
        f"loss:           {result.first_loss:.4f} (first step) -> {result.last_loss:.4f} (last step)",
    ]
    for name in sorted(set(result.metrics_before) | set(result.metrics_after)):
        if name.endswith("/count"):
            continue
        before = result.metrics_before.get(name)
        after = result.metrics_after.get(name)
        fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        lines.append(f"{name + ':':<15} {fmt(before)} (before) -> {fmt(after)} (after)")
    lines += [
        f"stopped:        {result.stop_reason}",
        f"adapter:        {result.adapter_dir}",
        *([f"best:           {result.best_checkpoint}"] if result.best_checkpoint else []),
        f"metrics log:    {result.output_dir / 'metrics.jsonl'}",
    ]
    return "\n".join(lines)


def _cmd_train(args: argparse.Namespace) -> int:
    from pg_tune.train.resume import ResumeError
    from pg_tune.train.signals import TrainingStopped
    from pg_tune.train.storage import OutputDirError

    recipe, resolved_recipe = load_recipe(args.recipe, args.overrides)
    recipe.model.trust_remote_code = args.trust_remote_code
    for warning in recipe.ignored_settings():
        print(warning, file=sys.stderr)
    try:
        result = run_training(recipe, resolved_recipe, resume=args.resume, overwrite=args.overwrite)
    except TrainingStopped as e:  # a stop signal, a non-finite step, a full disk
        print(f"pg-tune: {e}", file=sys.stderr)
        return e.exit_code
    except (ResumeError, OutputDirError) as e:
        print(f"pg-tune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C before training started (or a second one during it)
        print(
            "pg-tune: interrupted by Ctrl-C; no new checkpoint was written "
            "(checkpoints already on disk resume with --resume auto)",
            file=sys.stderr,
        )
        return 128 + signal.SIGINT
    if result.is_main_process:
        print(summary_text(result))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="fine-tune from a recipe")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.lr=1e-4")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        metavar="auto|PATH",
        help="continue the run in output_dir from its newest complete checkpoint (auto) or from PATH",
    )
    mode.add_argument(
        "--overwrite",
        action="store_true",
        help="start clean: remove pg_tune's files from a non-empty output_dir first (listed before removal)",
    )
    add_remote_code_argument(p)
    p.set_defaults(func=_cmd_train)
