"""What an exact resume needs besides weights: RNG states, a run fingerprint, the checkpoint to use.

``pg-tune train RECIPE --resume auto`` picks the newest complete checkpoint under
``<output_dir>/checkpoints`` (or starts fresh when there is none); ``--resume PATH`` names one
checkpoint folder (or a ``checkpoints`` folder, meaning its newest). The fingerprint stored in each
checkpoint refuses a resume into a different model or LoRA setup, which would otherwise load
mismatched weights or silently train a different adapter.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pg_tune.config.recipe import Recipe
from pg_tune.train.checkpoint import COMPLETE_MARKER, checkpoint_problem, list_checkpoints


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


@contextlib.contextmanager
def rng_isolated() -> Iterator[None]:
    """Run a block without moving any RNG the training uses.

    Fetching batches draws from the global torch RNG at each new DataLoader iterator (its workers'
    base seed), so an uninterrupted run and a resumed one would draw at different moments around an
    epoch boundary and their dropout masks would part ways. The loop fetches every window inside
    this block: data loading never touches the training's random stream, wherever a resume starts.
    """
    state = capture_rng()
    try:
        yield
    finally:
        restore_rng(state)


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


def find_resume_checkpoint(spec: str, output_dir: Path, notes: list[str] | None = None) -> Path | None:
    """``auto``: newest loadable checkpoint of ``output_dir`` or None; a path: that checkpoint.

    With ``auto``, a checkpoint marked complete whose files are cut short or damaged is passed over
    for the previous one, and ``notes`` gets a line saying so; if every one is damaged the resume is
    refused. A named checkpoint that is damaged is refused.
    """
    if spec == "auto":
        found = list_checkpoints(output_dir / "checkpoints")
        for checkpoint in reversed(found):
            problem = checkpoint_problem(checkpoint)
            if problem is None:
                return checkpoint
            if notes is not None:
                notes.append(
                    f"warning: {checkpoint} is damaged ({problem}); falling back to the previous checkpoint"
                )
        if found:
            raise ResumeError(
                f"--resume auto: every checkpoint under {output_dir / 'checkpoints'} is damaged "
                "(see above); start the run again with --overwrite"
            )
        return None
    path = Path(spec)
    if not path.exists():
        raise ResumeError(f"--resume {spec}: no such checkpoint folder")
    if (path / COMPLETE_MARKER).is_file():
        if problem := checkpoint_problem(path):
            raise ResumeError(
                f"--resume {spec}: damaged checkpoint: {problem}; name an older one or use --resume auto"
            )
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


# --- changed hyper-parameters ----------------------------------------------------------------------

# Recipe keys a resume may change: they do not change what is trained. Anything else that differs
# from the checkpoint's recipe refuses the resume (the run would otherwise write one value into
# recipe.yaml and keep training with another, e.g. a new train.lr under the old LR schedule).
RESUME_MAY_CHANGE = (
    "output_dir",
    "logging.",
    "hub.",
    "data.eval",
    "data.num_workers",
    "train.log_every",
    "train.save_every",
    "train.keep_last",
    "train.on_nonfinite",
    "eval.every",
    "eval.before_training",
    "eval.batch_size",
    "eval.max_new_tokens",
    "eval.num_beams",
    "eval.limit",
    "eval.patience",
)
# Applied, and said: a longer or shorter run (the LR schedule is recomputed over the new length).
RESUME_APPLIES = ("train.max_steps", "train.epochs")


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict):
        return {prefix.rstrip("."): data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(
            _flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value}
        )
    return out


def _may_change(key: str) -> bool:
    return any(
        key.startswith(p) if p.endswith(".") else key == p or key.startswith(p + ".")
        for p in RESUME_MAY_CHANGE
    )


def check_recipe_changes(
    checkpoint: Path, stored: dict[str, Any] | None, current: dict[str, Any]
) -> list[str]:
    """Refuse a resume whose recipe changes what is trained; return notes for the changes applied."""
    if stored is None:
        return [
            f"note: {checkpoint} holds no recipe.json (older pg_tune): changed settings cannot be checked"
        ]
    old, new = _flatten(stored), _flatten(current)
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    refused = [k for k in changed if not _may_change(k) and k not in RESUME_APPLIES]
    if refused:
        raise ResumeError(
            f"{checkpoint}: the recipe changed since this checkpoint was written, refusing to resume:\n  "
            + "\n  ".join(f"{k}: checkpoint has {old.get(k)!r}, this run has {new.get(k)!r}" for k in refused)
            + "\nResume with the checkpoint's settings (its recipe.json), or start a new run (--overwrite or "
            "another output_dir)"
        )
    return [
        f"note: {k} changed since the checkpoint ({old.get(k)!r} -> {new.get(k)!r}); applied"
        + ("; the LR schedule follows the new run length" if k in RESUME_APPLIES else "")
        for k in changed
    ]


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
