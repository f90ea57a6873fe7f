"""Evaluation during training, with ``data.on_bad_row`` applied to eval images too.

Eval rows that are preference pairs are scored by ``pg_tune.train.preference.evaluate_pairs``
(``preference/accuracy`` ...), the other rows by generation and their task's metrics, as always.

Eval images are opened lazily, in the generation collator: without a check, one corrupt file stops
the run at the evaluation before training, at ``eval.every``, or after the adapter is written.
``readable_eval_samples`` opens each image the evaluations will use once, before training: under
``skip`` a bad one is dropped and counted (the next sample takes its place within ``eval.limit``),
under ``stop`` the run stops there, naming the row.
"""

from __future__ import annotations

from collections.abc import Sequence

from pg_tune.config.recipe import Recipe
from pg_tune.data.bad_rows import BadRows
from pg_tune.data.images import load_image
from pg_tune.data.sample import DataError, Sample
from pg_tune.evaluate.run import evaluate_samples
from pg_tune.train.preference import evaluate_pairs


def readable_eval_samples(samples: Sequence[Sample], limit: int | None, bad: BadRows) -> Sequence[Sample]:
    """The eval samples evaluation will use (``eval.limit`` per dataset), with every image opened
    once now: under ``data.on_bad_row=skip`` an unreadable one is dropped and counted (the next
    sample takes its place), under ``stop`` the run stops here, before training, naming the row."""
    parts = getattr(samples, "parts", None) or [samples]
    kept_parts = []
    for part in parts:
        kept: list[Sample] = []
        for sample in part:
            if limit is not None and len(kept) >= limit:
                break
            try:
                load_image(sample.image, sample.source)
            except DataError as e:
                bad.bad(getattr(e, "reason", "bad_image"), str(e))
                continue
            kept.append(sample)
        kept_parts.append(kept)
    return _EvalSamples(kept_parts)


def _split_pairs(samples: Sequence[Sample]) -> tuple[list[Sample], Sequence[Sample]]:
    """The preference pairs, and the other samples (their datasets still apart for ``eval.limit``)."""
    parts = getattr(samples, "parts", None) or [samples]
    if not any(s.is_pair for part in parts for s in part):
        return [], samples
    pairs = [s for part in parts for s in part if s.is_pair]
    return pairs, _EvalSamples([[s for s in part if not s.is_pair] for part in parts])


class _EvalSamples(list):
    """A flat list of eval samples that keeps its datasets apart (``parts``) for ``eval.limit``."""

    def __init__(self, parts: list[list[Sample]]):
        super().__init__(s for part in parts for s in part)
        self.parts = parts


def evaluate_during_training(
    accelerator, model, processor, samples, recipe: Recipe, family, bad: BadRows, pair_scorer=None
) -> dict[str, float]:
    """Evaluate; an image that became unreadable since the run started is dropped and counted under
    ``skip`` (then evaluation runs again without it), named under ``stop``. Preference pairs among the
    samples are scored by ``pair_scorer`` (a ``PreferenceLoss``)."""
    while True:
        try:
            pairs, tasks = _split_pairs(samples)
            metrics = evaluate_samples(accelerator, model, processor, tasks, recipe, family)
            if pairs and pair_scorer is not None:
                metrics.update(evaluate_pairs(accelerator, pair_scorer, processor, pairs, recipe, family))
            return metrics
        except DataError:
            if bad.policy == "stop" or accelerator.num_processes > 1:
                raise
            before = sum(bad.counts.values())
            samples = readable_eval_samples(samples, recipe.eval.limit, bad)
            if sum(bad.counts.values()) == before:
                raise
