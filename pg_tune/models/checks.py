"""What training refuses about a recipe's model, checked before anything heavy loads.

``pg-tune validate`` and ``pg-tune data validate`` call ``check_recipe_model`` so that a recipe
they pass does not fail later for a reason they could have seen: quantization of a built-in tiny
preset (it has no checkpoint on disk to quantize) and a ``data.max_text_length`` whose longest
sequence, image tokens included, runs past the model's context (``ModelFamily.check_context``,
with the config and processor found offline). Training checks the context again on the model it
loaded (``pg_tune.train.loop``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from pg_tune.config.schema import ConfigError
from pg_tune.models.family import ModelFamily


def check_recipe_model(recipe: Any, family: ModelFamily) -> list[str]:
    """Raise ``ConfigError`` (dotted key and the fix) for what training would refuse; returns notes
    on what could not be checked here (no config or processor of the model on this machine)."""
    model = recipe.model
    if recipe.quantization.mode != "none" and family.is_tiny(model.name_or_path):
        raise ConfigError(
            f"quantization.mode: {recipe.quantization.mode!r} needs the base as a checkpoint on disk, and "
            f"{model.name_or_path!r} is a built-in tiny preset: save it first (python -m pg_tune.models.tiny "
            f"DIR --preset {model.name_or_path}) and set model.name_or_path=DIR"
        )
    not_here = [
        f"note: data.max_text_length not checked against the model's context: {model.name_or_path} is not on "
        "this machine (training checks it once the model is loaded)"
    ]
    local = _on_this_machine(model, family)
    if local is None:
        return not_here
    try:
        config = family.offline_config(local)
        processor = family.load_processor(local) if config is not None else None
    except Exception as e:  # noqa: BLE001 - anything unreadable here is refused where it is loaded
        return [
            f"note: data.max_text_length not checked against the model's context ({type(e).__name__}: {e})"
        ]
    if config is None:
        return not_here
    family.check_context(config, processor, recipe.data.max_text_length)
    return []


def _on_this_machine(model: Any, family: ModelFamily) -> Any | None:
    """``model`` as a tiny preset, a local folder or the hub cache's snapshot; None when only the
    network has it (``validate`` never downloads)."""
    if family.is_tiny(model.name_or_path) or Path(model.name_or_path).is_dir():
        return model
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(model.name_or_path, revision=model.revision, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached (or not a hub id): nothing to read offline
        return None
    return dataclasses.replace(model, name_or_path=folder)
