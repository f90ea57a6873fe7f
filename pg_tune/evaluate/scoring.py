"""Per-task metrics over a list of predictions; the metric family comes from ``Sample.task``."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from pg_tune.data.sample import Sample


def _normalise(text: str) -> str:
    return " ".join(text.lower().strip().rstrip(".").split())


def exact_match(prediction: str, references: Sequence[str]) -> float:
    return float(any(_normalise(prediction) == _normalise(r) for r in references))


def score(samples: Sequence[Sample], predictions: Sequence[str]) -> dict[str, float]:
    """Metrics per task, named ``{task}/{metric}``; every task also reports exact match."""
    by_task: dict[str, list[tuple[Sample, str]]] = defaultdict(list)
    for sample, prediction in zip(samples, predictions, strict=True):
        by_task[sample.task].append((sample, prediction))
    metrics: dict[str, float] = {}
    for task, rows in sorted(by_task.items()):
        matches = [exact_match(p, s.all_references) for s, p in rows]
        metrics[f"{task}/exact_match"] = sum(matches) / len(matches)
        metrics[f"{task}/count"] = float(len(rows))
    return metrics
