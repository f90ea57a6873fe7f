"""What ``train()`` returns, and how a finished run is recorded so that ``--resume`` leaves it alone."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from accelerate import Accelerator

from pg_tune.train.state import TrainState
from pg_tune.train.storage import final_folder

FINAL_STATE_FILE = "final_state.json"
"""Written into ``output_dir`` after the adapter: the final ``TrainState``, how ``--resume`` knows a
run is finished (kept out of ``adapter/``, which is shared, as it names local paths)."""


@dataclass
class TrainResult:
    output_dir: Path
    adapter_dir: Path
    state: TrainState
    metrics_after: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    is_main_process: bool = True
    best_checkpoint: Path | None = None
    stop_reason: str = ""
    """Why training ended: the planned steps ran, or early stopping (and why)."""
    bad_rows: dict[str, dict[str, int]] = field(default_factory=dict)
    world_size: int = 1
    dtype: str = ""
    already_finished: bool = False
    """``--resume`` found the run finished: nothing was trained or evaluated this time."""
    model: Any = field(default=None, repr=False)
    """The trained peft model, for callers using pg_tune as a library."""

    @property
    def steps(self) -> int:
        return self.state.step

    @property
    def first_loss(self) -> float:
        return self.state.first_loss

    @property
    def last_loss(self) -> float:
        return self.state.last_loss

    @property
    def metrics_before(self) -> dict[str, float]:
        return self.state.metrics_before


def finished_run(
    output_dir: Path, accelerator: Accelerator, resolved_recipe: dict[str, Any]
) -> TrainResult | None:
    """A run whose adapter was saved at its end, for the same length: ``--resume`` has nothing left
    to do (with a larger ``train.max_steps``/``epochs`` it continues from the newest checkpoint)."""
    path = output_dir / FINAL_STATE_FILE
    result_dir = final_folder(output_dir, str(resolved_recipe.get("method", "lora")))
    if not path.is_file() or not result_dir.is_dir():
        return None
    saved_recipe = result_dir / "recipe.yaml"
    finished_recipe = (
        yaml.safe_load(saved_recipe.read_text()) or {} if saved_recipe.is_file() else resolved_recipe
    )
    length = lambda r: {k: r.get("train", {}).get(k) for k in ("max_steps", "epochs")}  # noqa: E731
    if length(finished_recipe) != length(resolved_recipe):
        return None
    saved = json.loads(path.read_text())
    state = TrainState.from_dict(saved["state"])
    accelerator.print(
        f"--resume: this run already finished at step {state.step} ({saved.get('stop_reason', '')}); result: "
        f"{result_dir}. Nothing to do; use --overwrite to train it again"
    )
    best = saved.get("best_checkpoint")
    return TrainResult(
        output_dir,
        result_dir,
        state,
        saved.get("metrics_after", {}),
        is_main_process=accelerator.is_main_process,
        best_checkpoint=Path(best) if best else None,
        stop_reason=saved.get("stop_reason", ""),
        bad_rows=saved.get("bad_rows", {}),
        world_size=saved.get("world_size", 1),
        dtype=saved.get("dtype", ""),
        already_finished=True,
    )


def write_final_state(output_dir: Path, result: TrainResult) -> None:
    final = {
        "state": result.state.to_dict(),
        "metrics_after": result.metrics_after,
        "stop_reason": result.stop_reason,
        "best_checkpoint": str(result.best_checkpoint) if result.best_checkpoint else None,
        "bad_rows": result.bad_rows,
        "world_size": result.world_size,
        "dtype": result.dtype,
    }
    tmp = output_dir / f".tmp-{FINAL_STATE_FILE}"
    tmp.write_text(json.dumps(final, indent=2))
    tmp.replace(output_dir / FINAL_STATE_FILE)
