"""The training DataLoader: shuffling seeded by the recipe, collation in worker processes."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import DataLoader

from pg_tune.config.recipe import Recipe
from pg_tune.data.collate import PaliGemmaCollator, SampleDataset
from pg_tune.data.sample import Sample


def build_train_loader(samples: Sequence[Sample], processor, recipe: Recipe) -> DataLoader:
    """Batches of the recipe's micro-batch size; images decode and resize in the workers."""
    generator = torch.Generator().manual_seed(recipe.train.seed)
    return DataLoader(
        SampleDataset(samples),
        batch_size=recipe.train.batch_size,
        shuffle=True,
        generator=generator,
        collate_fn=PaliGemmaCollator(processor, recipe.data.max_text_length, train=True),
        num_workers=recipe.data.num_workers,
        pin_memory=torch.cuda.is_available(),
        drop_last=False,
    )
