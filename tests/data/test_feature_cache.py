"""The image-feature cache: same features as the tower, keyed by content, refused when stale."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pg_tune.config.recipe import DataConfig, LoraConfig, Recipe, TrainConfig
from pg_tune.data.feature_cache import FeatureCache, image_key
from pg_tune.data.loader import build_train_loader, prepare_feature_cache
from pg_tune.data.sample import Sample
from pg_tune.models.paligemma import PaliGemmaFamily
from pg_tune.models.paligemma.tiny import build_model
from pg_tune.train.adapters import apply_lora
from tests.families import family_of


@pytest.fixture(scope="module")
def tiny():
    model, processor = build_model("tiny-paligemma2")
    return model.requires_grad_(False), processor  # frozen, as under LoRA


def _samples(tmp_path, n=5):
    samples = []
    for i in range(n):
        path = tmp_path / f"img{i % 3}.png"  # 3 distinct files, reused
        if not path.exists():
            rng = np.random.default_rng(i % 3)
            Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(path)
        samples.append(Sample(image=str(path), prefix="caption en", suffix="a red circle", source=f"r{i}"))
    return samples


def test_cached_features_equal_the_tower_and_skip_images(tmp_path, tiny):
    model, processor = tiny
    samples = _samples(tmp_path)
    cache = FeatureCache.build(
        tmp_path / "cache", samples, model, processor.image_processor, family_of(model), batch_size=2
    )
    assert len(cache.entries) == 3
    assert len(list(cache.directory.glob("shard-*.npy"))) == 1
    collator = PaliGemmaFamily().collator(processor, 32)
    batch = collator(list(enumerate(samples)))
    with torch.no_grad():
        expected = model.model.get_image_features(batch["pixel_values"]).pooler_output
    torch.testing.assert_close(cache.features(samples), expected)

    recipe = Recipe(output_dir="unused", data=DataConfig(feature_cache=str(tmp_path / "cache")))
    recipe.train = TrainConfig(batch_size=5)
    again = prepare_feature_cache(samples, model, processor, recipe, family_of(recipe))
    assert again.directory == cache.directory and len(list(cache.directory.glob("shard-*.npy"))) == 1
    cached_batch = next(
        iter(build_train_loader(samples, processor, recipe, family_of(recipe), feature_cache=again))
    )
    assert "pixel_values" not in cached_batch and cached_batch["image_features"].shape == expected.shape


def test_new_images_extend_and_keys_follow_content(tmp_path, tiny):
    model, processor = tiny
    samples = _samples(tmp_path, n=2)
    cache = FeatureCache.build(tmp_path / "c", samples, model, processor.image_processor, family_of(model))
    more = _samples(tmp_path, n=3)
    bigger = FeatureCache.build(tmp_path / "c", more, model, processor.image_processor, family_of(model))
    assert bigger.directory == cache.directory and len(bigger.entries) == 3
    copy = tmp_path / "copy.png"
    copy.write_bytes((tmp_path / "img0.png").read_bytes())
    assert (
        image_key(str(copy)) == image_key(str(tmp_path / "img0.png")) != image_key(str(tmp_path / "img1.png"))
    )
    with pytest.raises(KeyError, match="r9"):
        bigger.features([Sample(image=Image.new("RGB", (4, 4)), prefix="p", suffix="s", source="r9")])


def test_changed_weights_use_another_directory_and_trainable_tower_is_refused(tmp_path):
    model, processor = build_model("tiny-paligemma")
    model.requires_grad_(False)
    samples = _samples(tmp_path, n=1)
    first = FeatureCache.build(tmp_path / "c", samples, model, processor.image_processor, family_of(model))
    with torch.no_grad():
        model.model.multi_modal_projector.linear.weight.add_(0.1)
    second = FeatureCache.build(tmp_path / "c", samples, model, processor.image_processor, family_of(model))
    assert first.directory != second.directory
    peft_model = apply_lora(model, LoraConfig(r=2, vision=True), "tiny-paligemma", family_of(model))
    with pytest.raises(ValueError, match="lora.vision"):
        FeatureCache.build(
            tmp_path / "c", samples, peft_model, processor.image_processor, family_of(peft_model)
        )


def test_in_memory_images_of_a_lazy_hf_dataset_get_their_own_features(tmp_path, tiny):
    # The hf format decodes a fresh PIL image on every access; once one is freed Python reuses its
    # id for the next, so an id()-keyed memo hands a row the previous row's features.
    from pathlib import Path

    from pg_tune.data.bad_rows import BadRows
    from pg_tune.data.formats import BuildContext
    from pg_tune.data.formats.hf import HfOptions, build

    model, processor = tiny
    docs = Path(__file__).resolve().parents[2] / "data_formats" / "samples" / "hf" / "docs"
    options = HfOptions(path=str(docs), split="train", prompt="{question}", columns={"suffix": "answers"})
    view = build(options, BuildContext("train", BadRows()))
    cache = FeatureCache.build(tmp_path / "c", list(view), model, processor.image_processor, family_of(model))
    assert len(cache.entries) == 2
    collator = PaliGemmaFamily().collator(processor, 32)
    with torch.no_grad():
        pixels = collator(list(enumerate(view)))["pixel_values"]
        expected = model.model.get_image_features(pixels).pooler_output
    wrong = []
    for step in range(24):
        row = step % 2
        sample = view[row]  # a new image object, often at the address the last one freed
        if not torch.equal(cache.features([sample])[0], expected[row]):
            wrong.append(step)
        del sample
    assert wrong == []
