"""Experiment trackers (wandb, tensorboard) through Accelerate; a resumed wandb run keeps its id."""

from __future__ import annotations

from typing import Any

from accelerate import Accelerator

from pg_tune.config.recipe import Recipe


def start_trackers(
    accelerator: Accelerator, recipe: Recipe, resolved_recipe: dict[str, Any], run_ids: dict[str, str]
) -> dict[str, str]:
    """Start wandb/tensorboard; a resumed wandb run continues under its id. Returns the run ids."""
    trackers = list(recipe.logging.trackers)
    if not trackers:
        return {}
    init_kwargs: dict[str, Any] = {}
    if "wandb" in trackers:
        init_kwargs["wandb"] = {
            "name": recipe.logging.run_name,
            "dir": recipe.output_dir,
            "mode": recipe.logging.wandb_mode,
        }
        if run_id := run_ids.get("wandb"):
            init_kwargs["wandb"].update(id=run_id, resume="allow")
    accelerator.init_trackers(
        recipe.logging.project, config=flat_scalars(resolved_recipe), init_kwargs=init_kwargs
    )
    ids = {}
    if "wandb" in trackers and accelerator.is_main_process:
        wandb_run = accelerator.get_tracker("wandb", unwrap=True)
        if getattr(wandb_run, "id", None):
            ids["wandb"] = wandb_run.id
    return ids


def flat_scalars(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_scalars(value, f"{name}."))
        elif isinstance(value, (int, float, str, bool)):
            out[name] = value
        else:
            out[name] = str(value)
    return out
