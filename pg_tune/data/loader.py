"""The training DataLoader: shuffling seeded by the recipe, collation in worker processes.

Options from the recipe's ``data`` section: ``num_workers`` (image decode and resize happen in the
collator, i.e. in the workers), ``group_by_length`` (``pg_tune.data.sampler``) and, through
``feature_cache``, a ``FeatureCache`` that replaces images by precomputed features
(``pg_tune.data.feature_cache``). Pinned memory when a GPU is present.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader

from pg_tune.config.recipe import Recipe
from pg_tune.data.feature_cache import CachedFeatureCollator, FeatureCache
from pg_tune.data.mix import MixSampler
from pg_tune.data.safe_collate import SafeSampleDataset
from pg_tune.data.sample import DataError, Sample
from pg_tune.data.sampler import LengthGroupedBatchSampler, row_lengths
from pg_tune.data.stream import EpochSampler, StreamingSamples

if TYPE_CHECKING:
    from pg_tune.models.family import ModelFamily


def build_train_loader(
    samples: Sequence[Sample],
    processor,
    recipe: Recipe,
    family: ModelFamily,
    feature_cache: FeatureCache | None = None,
) -> DataLoader:
    """Batches of the recipe's micro-batch size, each padded to a multiple of
    ``data.pad_to_multiple_of`` positions; images decode and resize in the workers.

    Rows are drawn by ``MixSampler`` (datasets mixed by ``weight``, one caption/answer per group
    per epoch; a plain seeded shuffle when every weight is 1), optionally grouped by length. The
    order depends only on ``train.seed`` and the epoch, so resumed and multi-process runs agree.
    The collator is the model ``family``'s (its mask codec renders segmentation targets); under
    ``train.objective: dpo`` its preference batches (chosen and rejected rows, each image once).
    """
    collator = family.collator(
        processor, recipe.data.max_text_length, train=True, pad_to_multiple_of=recipe.data.pad_to_multiple_of
    )
    pairs = recipe.train.objective == "dpo"
    collate = collator.preference_batch if pairs else collator
    if isinstance(samples, StreamingSamples):
        return _streaming_loader(samples, collate, recipe, feature_cache)
    parts = getattr(samples, "parts", None) or [samples]
    weights = [e.weight for e in recipe.data.train] if len(parts) == len(recipe.data.train) else [1.0]
    sampler = MixSampler(parts, weights, seed=recipe.train.seed, shuffle=recipe.data.shuffle)
    # Lazy rows (hf) that fail while being read are counted by SafeCollator, not raised here.
    dataset = SafeSampleDataset(samples, recipe.data.on_bad_row)
    workers = recipe.data.num_workers
    common = dict(
        collate_fn=CachedFeatureCollator(collator, feature_cache, pairs)
        if feature_cache is not None
        else collate,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
    )
    if recipe.data.group_by_length:
        batch_sampler = LengthGroupedBatchSampler(
            row_lengths(samples, collator),
            recipe.train.batch_size,
            sampler=sampler,
            seed=recipe.train.seed,
        )
        return DataLoader(dataset, batch_sampler=batch_sampler, **common)
    return DataLoader(dataset, batch_size=recipe.train.batch_size, sampler=sampler, drop_last=False, **common)


def _streaming_loader(
    samples: StreamingSamples, collator, recipe: Recipe, feature_cache: FeatureCache | None
) -> DataLoader:
    """Streamed entries: rows in the stream's own order (shuffled by its buffer), read sequentially.

    The sampler yields positions ``epoch * len + j`` in order, so a resumed run's skipped batches
    (``accelerate.skip_first_batches``) are never read: the first position it asks for makes the
    stream fast-forward there without decoding a row. Each DataLoader worker (and each rank) reads
    the stream too and skips the rows of the others, so workers multiply the reading, not the decoding.
    """
    for flag, name in ((recipe.data.group_by_length, "group_by_length"), (feature_cache, "feature_cache")):
        if flag:
            raise DataError(
                f"data.{name}: not available with a streamed training entry (it needs every row up "
                "front); turn it off or drop streaming: true"
            )
    samples.shuffle = recipe.data.shuffle
    workers = recipe.data.num_workers
    return DataLoader(
        SafeSampleDataset(samples, recipe.data.on_bad_row),
        batch_size=recipe.train.batch_size,
        sampler=EpochSampler(len(samples)),
        drop_last=False,
        collate_fn=collator,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
    )


def prepare_feature_cache(
    samples: Sequence[Sample], model, processor, recipe: Recipe, family: ModelFamily
) -> FeatureCache | None:
    """The recipe's feature cache, built (or completed) for ``samples``; None when not configured."""
    if not recipe.data.feature_cache:
        return None
    return FeatureCache.build(
        recipe.data.feature_cache,
        samples,
        model,
        processor.image_processor,
        family,
        batch_size=recipe.train.batch_size,
    )
