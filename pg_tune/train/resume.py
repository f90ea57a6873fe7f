"""What an exact resume needs besides weights: RNG states, a run fingerprint, the checkpoint to use.

``pg-tune train RECIPE --resume auto`` picks the newest complete checkpoint under
``<output_dir>/checkpoints`` (or starts fresh when there is none); ``--resume PATH`` names one
checkpoint folder (or a ``checkpoints`` folder, meaning its newest). The fingerprint stored in each
checkpoint refuses a resume into a different model or LoRA setup, which would otherwise load
mismatched weights or silently train a different adapter.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pg_tune.config.recipe import Recipe
from pg_tune.train.checkpoint import COMPLETE_MARKER, list_checkpoints


class ResumeError(ValueError):
    """A ``--resume`` that cannot be honoured; the message says which checkpoint and why."""


# --- RNG states ------------------------------------------------------------------------------------


def capture_rng() -> dict[str, Any]:
    """This process's RNG states as tensors and plain lists (loadable with ``weights_only=True``)."""
    version, mt_state, gauss = random.getstate()
    np_state = np.random.get_state(legacy=True)
    out: dict[str, Any] = {
        "python": [version, list(mt_state), gauss],
        "numpy": {
            "key": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def restore_rng(state: dict[str, Any]) -> None:
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state), gauss))
    np_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np_state["key"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            torch.cuda.set_rng_state(cuda_states[0])


# --- fingerprint -----------------------------------------------------------------------------------


def run_fingerprint(recipe: Recipe, model: torch.nn.Module) -> dict[str, Any]:
    """What must be equal for a checkpoint's weights and optimizer state to mean the same thing."""
    shapes = sorted((n, list(p.shape)) for n, p in model.named_parameters() if p.requires_grad)
    digest = hashlib.sha256(json.dumps(shapes).encode()).hexdigest()[:16]
    lora = recipe.lora
    out: dict[str, Any] = {
        "model.name_or_path": recipe.model.name_or_path,
        "model.revision": recipe.model.revision,
        "quantization.mode": recipe.quantization.mode,
        "trainable_parameters": digest,
    }
    if recipe.method == "lora":
        out.update(
            {
                "lora.r": lora.r,
                "lora.alpha": lora.alpha,
                "lora.targets": lora.targets,
                "lora.vision": lora.vision,
                "lora.modules_to_save": list(lora.modules_to_save),
            }
        )
        # Only when on, so checkpoints written before these switches existed still resume.
        out.update({f"lora.{k}": True for k in ("use_dora", "use_rslora") if getattr(lora, k)})
    else:
        from pg_tune.train.methods import method_groups

        out.update({"method": recipe.method, "method.groups": method_groups(recipe)})
    return out


def check_fingerprint(checkpoint: Path, stored: dict[str, Any] | None, current: dict[str, Any]) -> None:
    """Refuse to resume a checkpoint written by a run with a different model or adapter setup."""
    if stored is None:
        raise ResumeError(
            f"{checkpoint}: no fingerprint.json — not written by this version of pg_tune; cannot check it "
            "belongs to this run, refusing to resume from it"
        )
    diffs = [
        f"{key}: checkpoint has {stored.get(key)!r}, this run has {current.get(key)!r}"
        for key in sorted(set(stored) | set(current))
        if stored.get(key) != current.get(key)
    ]
    if diffs:
        raise ResumeError(
            f"{checkpoint}: written by an incompatible run, refusing to resume:\n  "
            + "\n  ".join(diffs)
            + "\nUse the recipe that wrote it, or a fresh output_dir."
        )


# --- which checkpoint ------------------------------------------------------------------------------


def find_resume_checkpoint(spec: str, output_dir: Path) -> Path | None:
    """``auto``: newest complete checkpoint of ``output_dir`` or None; a path: that checkpoint."""
    if spec == "auto":
        found = list_checkpoints(output_dir / "checkpoints")
        return found[-1] if found else None
    path = Path(spec)
    if not path.exists():
        raise ResumeError(f"--resume {spec}: no such checkpoint folder")
    if (path / COMPLETE_MARKER).is_file():
        return path
    if path.is_dir() and (path / "state.json").is_file():
        raise ResumeError(
            f"--resume {spec}: incomplete checkpoint (no {COMPLETE_MARKER}: its write never finished)"
        )
    for folder in (path, path / "checkpoints"):
        found = list_checkpoints(folder)
        if found:
            return found[-1]
    raise ResumeError(f"--resume {spec}: no complete checkpoint (step-NNNNNNN/{COMPLETE_MARKER}) in it")


def truncate_metrics_log(path: Path, step: int) -> int:
    """Drop ``metrics.jsonl`` records after ``step`` (written after the checkpoint, then lost).

    Returns how many records were dropped. The rewrite is atomic (temporary file + rename).
    """
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            record_step = json.loads(line).get("step", 0)
        except json.JSONDecodeError:  # a line cut short by the kill
            dropped += 1
            continue
        if record_step > step:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        tmp.replace(path)
    return dropped
