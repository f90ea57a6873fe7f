"""``TrainState``: everything about a run's progress that a checkpoint saves and a resume restores.

One dataclass, one ``to_dict`` / ``from_dict``: a field added here is saved into ``state.json`` and
read back on resume without being listed anywhere else. Weights, optimizer, scheduler and RNG
states are not here: they have their own files (``pg_tune.train.checkpoint``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainState:
    step: int = 0
    """Optimizer steps taken (skipped non-finite steps count: the data and schedule moved on)."""
    epoch: int = 0
    epoch_batches: int = 0
    """Micro-batches of ``epoch`` already consumed on each rank (where a resume picks up)."""
    total_steps: int = 0
    tokens_seen: int = 0
    """Supervised tokens over all ranks."""
    truncated: int = 0
    """Training rows whose suffix was cut to ``data.max_text_length``."""
    nonfinite_skipped: int = 0
    first_loss: float = math.nan
    last_loss: float = math.nan
    metrics_before: dict[str, float] = field(default_factory=dict)
    eval_metrics: dict[str, float] = field(default_factory=dict)
    """Metrics of the evaluation at ``step`` (empty when none ran at that step)."""
    best_value: float | None = None
    """Best ``eval.best_metric`` value so far."""
    best_step: int | None = None
    evals_without_improvement: int = 0
    """Evaluations in a row that did not improve the best value by more than ``eval.min_delta``."""
    tracker_run_ids: dict[str, str] = field(default_factory=dict)
    bad_rows_in_training: dict[str, int] = field(default_factory=dict)
    data_layout: list[int] = field(default_factory=list)
    """(processes, batch_size, grad_accum): what ``epoch_batches`` counts in."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainState:
        """Read ``state.json``; keys this version does not know are ignored, missing ones take defaults."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
