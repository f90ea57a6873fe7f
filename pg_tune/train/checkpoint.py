"""Checkpoints under ``<output_dir>/checkpoints/step-NNNNNNN/``, written atomically.

A checkpoint is first written to a temporary sibling folder (``.tmp-step-...``), every file
fsynced, the ``complete.json`` marker written last, then the folder is renamed into place and the
parent fsynced. A crash mid-write leaves the previous checkpoint intact and at worst a ``.tmp-``
folder (or a folder without the marker) that ``list_checkpoints`` ignores and the next save removes
(first thing, before writing: the leftovers may be what filled the disk).

Files in a checkpoint::

    trainable.safetensors   the trainable weights only (LoRA adapter + modules_to_save), not the base
    optim.pt                optimizer, scheduler and gradient-scaler state dicts (plain tensors and
                            numbers: read back with ``torch.load(weights_only=True)``)
    rng.pt                  RNG states of every rank: python, numpy, torch, cuda (tensors and lists)
    state.json              ``TrainState``: step, epoch, position in the epoch, counters, eval metrics
    recipe.json             the resolved recipe of the run that wrote it (a resume compares it)
    fingerprint.json        what must match to resume (model, LoRA, quantization, trainable shapes)
    complete.json           written last; a folder without it is not a checkpoint

Pruning keeps the newest ``keep_last`` plus the best one by the recipe's ``eval.best_metric``.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file

from pg_tune.train.storage import atomic_folder, fsync_tree, remove_stale_temporaries, torch_save

CHECKPOINT_PREFIX = "step-"
COMPLETE_MARKER = "complete.json"
RECIPE_FILE = "recipe.json"


@dataclass(frozen=True)
class BestPolicy:
    """Which eval metric names the best checkpoint, whether higher or lower is better, and by how
    much a value must beat the best to count as better (``eval.min_delta``)."""

    metric: str
    mode: Literal["max", "min"] = "max"
    min_delta: float = 0.0


def is_better(value: float, best: float | None, policy: BestPolicy) -> bool:
    if best is None:
        return True
    return value > best + policy.min_delta if policy.mode == "max" else value < best - policy.min_delta


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(
    checkpoints_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
    keep_last: int,
    *,
    scaler: Any = None,
    rng_states: list[dict[str, Any]] | None = None,
    fingerprint: dict[str, Any] | None = None,
    recipe: dict[str, Any] | None = None,
    best: BestPolicy | None = None,
    before_rename: Any = None,
) -> Path:
    """Write one checkpoint atomically, then prune all but the newest ``keep_last`` and the best.

    A full disk raises ``DiskFullError`` naming the file and the free space.
    ``before_rename`` is a test hook called with the temporary folder once every file is written.
    """
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(checkpoints_dir)
    final = checkpoints_dir / f"{CHECKPOINT_PREFIX}{step:07d}"
    with atomic_folder(final) as tmp:
        save_file(trainable_state_dict(model), tmp / "trainable.safetensors")
        optim_state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
        if scaler is not None:
            optim_state["scaler"] = scaler.state_dict()
        torch_save(optim_state, tmp / "optim.pt")
        if rng_states is not None:
            torch_save(rng_states, tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=2, sort_keys=True))
        if fingerprint is not None:
            (tmp / "fingerprint.json").write_text(json.dumps(fingerprint, indent=2, sort_keys=True))
        if recipe is not None:
            (tmp / RECIPE_FILE).write_text(json.dumps(recipe, indent=2, sort_keys=True))
        fsync_tree(tmp)
        (tmp / COMPLETE_MARKER).write_text(json.dumps({"step": step}))
        if before_rename is not None:
            before_rename(tmp)
    prune_checkpoints(checkpoints_dir, keep_last, best)
    return final


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why a checkpoint marked complete cannot be loaded (a file cut short by a copy, a sync or a
    failing disk), or None. Reads JSON, the safetensors header and the zip indexes, not the tensors."""
    try:
        read_state(checkpoint)
    except (OSError, ValueError) as e:
        return f"state.json unreadable ({type(e).__name__}: {e})"
    weights = checkpoint / "trainable.safetensors"
    try:
        size = weights.stat().st_size
        with weights.open("rb") as f:
            header = int.from_bytes(f.read(8), "little")
            meta = json.loads(f.read(header)) if 0 < header < size else None
        if not isinstance(meta, dict):
            return f"trainable.safetensors: damaged header ({size} bytes)"
        end = max((v["data_offsets"][1] for k, v in meta.items() if k != "__metadata__"), default=0)
        if size < 8 + header + end:
            return f"trainable.safetensors is cut short ({size} of {8 + header + end} bytes)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"trainable.safetensors unreadable ({type(e).__name__}: {e})"
    for name in ("optim.pt", "rng.pt"):
        path = checkpoint / name
        if name == "optim.pt" or path.is_file():
            try:
                with zipfile.ZipFile(path) as z:
                    if (bad := z.testzip()) is not None:
                        return f"{name}: entry {bad} is damaged"
            except (OSError, zipfile.BadZipFile) as e:
                return f"{name} unreadable ({type(e).__name__}: {e})"
    return None


def read_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / "state.json").read_text())


def best_checkpoint(checkpoints_dir: Path, best: BestPolicy) -> Path | None:
    """The complete checkpoint whose recorded eval metric ``best.metric`` is best, if any has one."""
    scored = []
    for ckpt in list_checkpoints(checkpoints_dir):
        value = read_state(ckpt).get("eval_metrics", {}).get(best.metric)
        if isinstance(value, (int, float)):
            scored.append((value, ckpt))
    if not scored:
        return None
    # Oldest first, the rule the loop applies as it goes: a later checkpoint must beat the best by
    # more than min_delta to replace it (so ties go to the earliest).
    best_value, best_path = None, None
    for value, ckpt in scored:
        if is_better(value, best_value, best):
            best_value, best_path = value, ckpt
    return best_path


def prune_checkpoints(checkpoints_dir: Path, keep_last: int, best: BestPolicy | None = None) -> None:
    """Remove stale temporary folders and all complete checkpoints but the last ``keep_last`` + best."""
    remove_stale_temporaries(checkpoints_dir)
    keep = set(list_checkpoints(checkpoints_dir)[-keep_last:])
    if best is not None and (b := best_checkpoint(checkpoints_dir, best)) is not None:
        keep.add(b)
    for ckpt in list_checkpoints(checkpoints_dir):
        if ckpt not in keep:
            shutil.rmtree(ckpt, ignore_errors=True)


def list_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first; partial (temporary or unmarked) folders are ignored."""
    if not checkpoints_dir.is_dir():
        return []
    found = []
    for p in checkpoints_dir.iterdir():
        suffix = p.name[len(CHECKPOINT_PREFIX) :]
        if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit():
            if (p / COMPLETE_MARKER).is_file():
                found.append(p)
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


@dataclass
class LoadedCheckpoint:
    path: Path
    state: dict[str, Any]
    rng_states: list[dict[str, Any]] | None
    fingerprint: dict[str, Any] | None


def load_checkpoint(
    checkpoint: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: Any = None,
) -> LoadedCheckpoint:
    """Load weights and optimizer/scheduler/scaler state in place; nothing is unpickled.

    Weights come from safetensors; ``optim.pt`` and ``rng.pt`` are read with
    ``torch.load(weights_only=True)``, which only rebuilds tensors and plain containers.
    """
    if not (checkpoint / COMPLETE_MARKER).is_file():
        raise ValueError(
            f"{checkpoint}: not a complete checkpoint (no {COMPLETE_MARKER}); it was never finished"
        )
    weights = load_file(checkpoint / "trainable.safetensors")
    params = dict(model.named_parameters())
    missing = sorted(n for n, p in params.items() if p.requires_grad and n not in weights)
    unexpected = sorted(n for n in weights if n not in params)
    if missing or unexpected:
        raise ValueError(
            f"{checkpoint}: trainable weights do not match this model "
            f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''})"
        )
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))
    optim_state = torch.load(checkpoint / "optim.pt", map_location="cpu", weights_only=True)
    if optimizer is not None:
        optimizer.load_state_dict(optim_state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(optim_state["scheduler"])
    if scaler is not None and "scaler" in optim_state:
        scaler.load_state_dict(optim_state["scaler"])
    rng_path = checkpoint / "rng.pt"
    rng_states = torch.load(rng_path, map_location="cpu", weights_only=True) if rng_path.is_file() else None
    fp_path = checkpoint / "fingerprint.json"
    fingerprint = json.loads(fp_path.read_text()) if fp_path.is_file() else None
    return LoadedCheckpoint(checkpoint, read_state(checkpoint), rng_states, fingerprint)
