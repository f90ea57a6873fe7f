"""A finished training run folder, as ``pg_tune.train.loop.train`` writes it, read for export and push.

``read_run`` checks what an export needs and names the missing file: the adapter (``RUN/adapter``)
or, for a ``full`` / ``partial`` run, the complete model (``RUN/model``), and the run's
``recipe.yaml``; a LoRA adapter's base is checked against the recipe (``adapter_config.json``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pg_tune.config.recipe import Recipe, parse_recipe
from pg_tune.models.source import adapter_base

REPORT_NAME = "export_report.json"


class ExportError(RuntimeError):
    """The run folder cannot be exported, or the merged model does not match base + adapter."""


@dataclass
class Run:
    """A training run folder as ``pg_tune.train.loop.train`` writes it."""

    run_dir: Path
    recipe: Recipe
    resolved: dict[str, Any]
    adapter_dir: Path
    """``RUN/adapter`` for a LoRA run; for a full or partial run the complete model, ``RUN/model``."""
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def is_full_model(self) -> bool:
        """A ``full`` / ``partial`` run: ``adapter_dir`` holds a complete model, not an adapter."""
        return self.recipe.method != "lora"


def read_run(run_dir: str | Path) -> Run:
    """Read a run folder's recipe, summary and adapter (or model) location; errors name the missing file."""
    run_dir = Path(run_dir)
    adapter_dir = run_dir / "adapter"
    if (run_dir / "model" / "config.json").is_file() and not adapter_dir.is_dir():
        adapter_dir = run_dir / "model"  # a full or partial run: a complete model folder
        required_files = [adapter_dir / "config.json"]
        if not any(adapter_dir.glob("*.safetensors")):
            raise ExportError(f"{run_dir}: not a finished training run (no weights in {adapter_dir})")
    else:
        required_files = [adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"]
    for required in required_files:
        if not required.is_file():
            raise ExportError(f"{run_dir}: not a finished training run ({required} is missing)")
    recipe_path = next(
        (p for p in (run_dir / "recipe.yaml", adapter_dir / "recipe.yaml") if p.is_file()), None
    )
    if recipe_path is None:
        raise ExportError(f"{run_dir}: recipe.yaml is missing (looked in the run folder and adapter/)")
    resolved = yaml.safe_load(recipe_path.read_text(encoding="utf-8"))
    recipe = parse_recipe(resolved)
    # The base comes from the recipe, which must name the one the adapter was trained on (a full or
    # partial run's folder is the whole model: no base to check).
    if recipe.method == "lora":
        adapter_base(adapter_dir, recipe.model.name_or_path, f"{recipe_path} (model.name_or_path)")
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else {}
    return Run(run_dir, recipe, resolved, adapter_dir, summary)


def run_family(run: Run):
    """The model family of a run's base (``load_family``), its mask codec bound from the recipe."""
    from pg_tune.models.family import load_family

    return load_family(run.recipe.model.name_or_path, run.recipe.model.vae_path)
