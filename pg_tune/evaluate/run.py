"""Evaluating a model on samples: generate on each rank's shard, gather, score once."""

from __future__ import annotations

from collections.abc import Sequence

from accelerate import Accelerator

from pg_tune.config.recipe import Recipe
from pg_tune.data.sample import Sample
from pg_tune.evaluate.generate import generate
from pg_tune.evaluate.scoring import score


def evaluate_samples(
    accelerator: Accelerator, model, processor, samples: Sequence[Sample], recipe: Recipe
) -> dict[str, float]:
    """Metrics over ``samples`` (at most ``eval.limit``); every rank returns the same dict."""
    if recipe.eval.limit is not None:
        samples = samples[: recipe.eval.limit]
    if not samples:
        return {}
    rank, world = accelerator.process_index, accelerator.num_processes
    shard = list(range(rank, len(samples), world))
    texts = generate(
        model,
        processor,
        [samples[i] for i in shard],
        batch_size=recipe.eval.batch_size,
        max_new_tokens=recipe.eval.max_new_tokens,
        num_beams=recipe.eval.num_beams,
        max_text_length=recipe.data.max_text_length,
        progress=accelerator.is_local_main_process,
    )
    pairs = list(zip(shard, texts, strict=True))
    if world > 1:
        from accelerate.utils import gather_object

        pairs = gather_object(pairs)
    predictions = dict(pairs)  # keyed by sample index: no duplicates, whatever the sharding
    return score(samples, [predictions[i] for i in range(len(samples))])
