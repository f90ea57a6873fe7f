"""The image-token budget (``model.image``) per family: validated, applied exactly as each processor
expands images, counted without decoding them (``row_length``, ``image_budget``), shown by
``pg-tune data preview`` and budgeted by ``pg-tune plan``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pg_tune.config.recipe import ImageConfig, ModelConfig, parse_recipe
from pg_tune.config.schema import ConfigError
from pg_tune.data.sample import Sample
from pg_tune.models.chat.gemma3 import pan_and_scan_crops
from tests.families import family_of

SIZES = [(64, 64), (320, 240), (800, 200), (200, 900), (1200, 300), (100, 300)]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Sample]:
    root = tmp_path_factory.mktemp("budget")
    samples = []
    for width, height in SIZES:
        path = root / f"{width}x{height}.png"
        pixels = np.random.default_rng(width * height).integers(0, 255, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path)
        samples.append(Sample(image=str(path), prefix="caption en", suffix="a red circle", source=path.name))
    return samples


def _recipe(preset: str, image: dict, **data) -> dict:
    return {
        "output_dir": "unused",
        "model": {"name_or_path": preset, "image": image},
        "data": {"train": [{"format": "shapes", "num_samples": 4}], **data},
    }


@pytest.mark.parametrize(
    ("preset", "image"),
    [
        ("tiny-smolvlm2", {"longest_edge": 64}),
        ("tiny-smolvlm2", {"splitting": False}),
        ("tiny-gemma3", {"pan_and_scan": True, "max_crops": 3, "min_crop_size": 32}),
    ],
)
def test_the_budget_lays_out_images_as_the_processor_does(preset, image, images):
    """Same ids, labels, token types and pixels as the family's processor called as HF users call it
    (SmolVLM2: its image processor's size / splitting; Gemma 3: ``do_pan_and_scan=True`` per call)."""
    family = family_of(preset)
    processor = family.load_processor(ModelConfig(name_or_path=preset, image=ImageConfig(**image)))
    collator = family.collator(processor, 32)
    ours = collator(list(enumerate(images)))
    reference = family.reference_batch(processor, images)
    assert torch.equal(ours["pixel_values"], reference["pixel_values"])
    for i in range(len(images)):
        mine, theirs = ours["attention_mask"][i].bool(), reference["attention_mask"][i].bool()
        for key in ("input_ids", "labels", *family.attention_inputs):
            assert torch.equal(ours[key][i][mine], reference[key][i][theirs]), (key, images[i].source)
        assert collator.row_length(images[i]) == int(mine.sum()) <= collator.max_row_length()
    assert torch.equal(collator.text_batch(list(enumerate(images)))["input_ids"], ours["input_ids"])


def test_smolvlm2_longest_edge_and_splitting_shrink_the_image_tokens(images):
    family = family_of("tiny-smolvlm2")

    def tokens(**image) -> list[int]:
        processor = family.load_processor(
            ModelConfig(name_or_path="tiny-smolvlm2", image=ImageConfig(**image))
        )
        return [family.image_budget(processor, s).tokens for s in images]

    released, smaller, single = tokens(), tokens(longest_edge=64), tokens(splitting=False)
    assert all(a >= b >= c for a, b, c in zip(released, smaller, single, strict=True))
    assert sum(smaller) < sum(released) and len(set(single)) == 1


def test_gemma3_pan_and_scan_crops_match_the_image_processor():
    """The crop count read from an image's size equals what Gemma3ImageProcessor cuts from its pixels."""
    family = family_of("tiny-gemma3")
    image = ImageConfig(pan_and_scan=True, max_crops=4, min_crop_size=16)
    processor = family.load_processor(ModelConfig(name_or_path="tiny-gemma3", image=image))
    for width, height in [
        (64, 64),
        (70, 60),
        (300, 100),
        (100, 300),
        (1000, 100),
        (33, 20),
        (20, 33),
        (900, 17),
    ]:
        picture = Image.new("RGB", (width, height))
        crops = int(processor.image_processor(images=[picture], return_tensors="pt")["num_crops"][0])
        assert pan_and_scan_crops(processor.image_processor, width, height) == crops, (width, height)


def test_validate_refuses_what_a_family_does_not_take():
    from pg_tune.data.validate import check_recipe_support
    from tests.families import family_of

    def check(preset, image, **data):
        check_recipe_support(parse_recipe(_recipe(preset, image, **data)), family_of(preset))

    check("tiny-smolvlm2", {"longest_edge": 1024, "splitting": True})
    check("tiny-gemma3", {"pan_and_scan": True, "max_crops": 4})
    with pytest.raises(ConfigError, match=r"model\.image\.longest_edge: paligemma .*fixed by the checkpoint"):
        check("tiny-paligemma2", {"longest_edge": 512})
    with pytest.raises(
        ConfigError, match=r"model\.image\.pan_and_scan: smolvlm models take longest_edge, splitting"
    ):
        check("tiny-smolvlm2", {"pan_and_scan": True})
    with pytest.raises(ConfigError, match=r"model\.image\.pan_and_scan: .*feature_cache"):
        check("tiny-gemma3", {"pan_and_scan": True}, feature_cache="/tmp/unused-cache")
    with pytest.raises(ConfigError, match=r"model\.image\.max_crops: applies to pan and scan"):
        parse_recipe(_recipe("tiny-gemma3", {"max_crops": 3}))


def test_data_preview_shows_each_rows_image_tokens(tmp_path, capsys):
    from pg_tune.cli import main
    from pg_tune.data.formats.shapes import write_jsonl

    data = write_jsonl(tmp_path / "data", num_samples=3)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        json.dumps(
            _recipe("tiny-smolvlm2", {"longest_edge": 64})
            | {"data": {"train": [{"format": "jsonl", "path": str(data)}]}}
        )
    )
    out = tmp_path / "preview.jsonl"
    assert main(["data", "preview", str(recipe), "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    family = family_of("tiny-smolvlm2")
    processor = family.load_processor(
        ModelConfig(name_or_path="tiny-smolvlm2", image=ImageConfig(longest_edge=64))
    )
    for record in records:
        row = Sample(image=record["image"], prefix="", suffix="", source=record["source"])
        assert record["image_tokens"] == family.image_budget(processor, row).tokens > 0
    assert "image tokens per row" in capsys.readouterr().out


def test_plan_budgets_the_largest_image_the_settings_allow():
    from pg_tune.measure.plan import estimate

    def sequence(**image) -> int:
        recipe = parse_recipe(_recipe("smolvlm2-bench-mini", image))
        return estimate(recipe, family_of(recipe), device="cuda").sequence

    released, smaller, single = sequence(), sequence(longest_edge=512), sequence(splitting=False)
    # bench-mini: 512 px tiles of 64 tokens; longest edge 1024 -> 2 x 2 + 1 views, 512 -> 1 view.
    assert released > smaller == single
    recipe = parse_recipe(_recipe("tiny-gemma3", {"pan_and_scan": True, "max_crops": 3}))
    plain = parse_recipe(_recipe("tiny-gemma3", {}))
    crops = estimate(recipe, family_of(recipe), device="cuda").sequence
    assert crops > 3 * estimate(plain, family_of(plain), device="cuda").sequence // 2
