"""Length-grouped batching: every row once per epoch, less padding, seeded, wired into the loader."""

from __future__ import annotations

import random

import pytest
import torch

from pg_tune.config.recipe import DataConfig, Recipe, TrainConfig
from pg_tune.data.loader import build_train_loader
from pg_tune.data.sample import Sample
from pg_tune.data.sampler import LengthGroupedBatchSampler, padding_fraction, row_lengths
from pg_tune.models.paligemma.tiny import PRESETS, build_processor
from tests.families import family_of


def _lengths(n: int = 403) -> list[int]:
    rng = random.Random(0)
    return [rng.randint(5, 80) for _ in range(n)]


def test_every_row_once_and_less_padding_than_random():
    lengths = _lengths()
    sampler = LengthGroupedBatchSampler(lengths, 8, seed=0, mega_batch_mult=10)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 51
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(len(b) == 8 for b in batches if b is not batches[-1]) or sum(len(b) < 8 for b in batches) == 1
    # the longest row is in the first batch (an out-of-memory shows at step one)
    assert max(lengths) == max(lengths[i] for i in batches[0])
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(0)).tolist()
    random_batches = [order[i : i + 8] for i in range(0, len(order), 8)]
    assert padding_fraction(batches, lengths) < 0.25 * padding_fraction(random_batches, lengths)


def test_seeded_and_different_each_epoch():
    lengths = _lengths(64)
    a = LengthGroupedBatchSampler(lengths, 4, seed=3)
    b = LengthGroupedBatchSampler(lengths, 4, seed=3)
    first, second = list(a), list(a)
    assert first == list(b) and second == list(b)
    assert first != second


def test_order_depends_only_on_seed_and_epoch():
    """What resuming relies on: set_epoch(e) on a fresh sampler replays epoch e exactly."""
    lengths = _lengths(64)
    running = LengthGroupedBatchSampler(lengths, 4, seed=5)
    epochs = [list(running) for _ in range(3)]
    fresh = LengthGroupedBatchSampler(lengths, 4, seed=5)
    fresh.set_epoch(2)
    assert list(fresh) == epochs[2]


def test_drop_last():
    sampler = LengthGroupedBatchSampler([3] * 10, 4, drop_last=True)
    assert len(sampler) == 2 and [len(b) for b in sampler] == [4, 4]


def test_row_lengths_and_loader_groups_batches():
    processor = build_processor(PRESETS["tiny-paligemma"])
    rng = random.Random(1)
    samples = [
        Sample(image=None, prefix="caption en", suffix=" ".join(["cat"] * rng.randint(1, 30)), source=f"r{i}")
        for i in range(40)
    ]
    recipe = Recipe(
        output_dir="unused", data=DataConfig(group_by_length=True), train=TrainConfig(batch_size=4)
    )
    collator = family_of(recipe).collator(processor, recipe.data.max_text_length)
    lengths = row_lengths(samples, collator)
    # image tokens + bos + "caption en\n" (caption, ▁en, \n) + the suffix words + eos; no image is read
    assert lengths == [processor.image_seq_length + 2 + 3 + s.suffix.count("cat") for s in samples]
    loader = build_train_loader(samples, processor, recipe, family_of(recipe))
    batches = list(loader.batch_sampler)
    assert len(loader) == 10 and padding_fraction(batches, lengths) < 0.1


@pytest.mark.parametrize("preset", ["tiny-paligemma2", "tiny-gemma3", "tiny-smolvlm2", "smolvlm2-bench-mini"])
def test_row_length_is_the_encoded_row_for_every_family_and_image_shape(preset, tmp_path):
    """Counted without decoding the image, equal to what the collator lays out, image tokens included
    (SmolVLM2's tiles follow each image's aspect ratio; the others are fixed per resolution)."""
    import numpy as np
    from PIL import Image

    from pg_tune.config.recipe import ModelConfig

    family = family_of(preset)
    processor = family.load_processor(ModelConfig(name_or_path=preset))
    collator = family.collator(processor, 32)
    lengths = []
    for width, height in [(64, 64), (320, 240), (50, 400), (1000, 90)]:
        path = tmp_path / f"{width}x{height}.png"
        Image.fromarray(np.zeros((height, width, 3), dtype=np.uint8)).save(path)
        sample = Sample(image=str(path), prefix="caption en", suffix="a red circle", source=path.name)
        batch = collator([(0, sample)])
        assert (
            collator.row_length(sample) == int(batch["attention_mask"].sum()) == batch["input_ids"].shape[1]
        )
        assert collator.row_length(sample) <= collator.max_row_length()
        lengths.append(collator.row_length(sample))
    if family.name == "smolvlm":  # a tall or wide picture takes fewer tiles than a square one
        assert lengths[2] < lengths[0] and lengths[3] < lengths[0]
    else:
        assert len(set(lengths)) == 1
