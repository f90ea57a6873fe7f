"""`on_bad_row` on lazily read rows (hf): counted at build time and mid-training, like every format."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from pg_tune.config.recipe import parse_recipe
from pg_tune.data.bad_rows import BadRows
from pg_tune.data.build import build_samples
from pg_tune.data.loader import build_train_loader
from pg_tune.data.safe_collate import BAD_ROWS_KEY, SafeCollator
from pg_tune.data.sample import DataError
from pg_tune.models.paligemma.tiny import PRESETS, build_processor
from tests.families import family_of

DOCS = Path(__file__).resolve().parents[2] / "data_formats" / "samples" / "hf" / "docs"


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    """The shipped hf sample plus three bad rows: no answers, no image, image bytes cut short."""
    import datasets

    good = datasets.load_from_disk(str(DOCS))["train"]
    png = io.BytesIO()
    good.cast_column("image", datasets.Image(decode=True))[0]["image"].save(png, format="PNG")
    rows = good.cast_column("image", datasets.Image(decode=False)).to_dict()
    rows["image"] += [
        rows["image"][0],
        None,
        {"bytes": png.getvalue()[:60], "path": None},  # a PNG cut short: fails when decoded (collator)
        {"bytes": b"not an image", "path": None},  # fails when the row is read (__getitem__)
    ]
    rows["question"] += ["what is the date?", "what is the total?", "what is written?", "and here?"]
    rows["answers"] += [[], ["$ 42.00"], ["STOP"], ["GO"]]
    features = good.features.copy()
    features["image"] = datasets.Image(decode=False)
    path = tmp_path_factory.mktemp("hf_bad") / "docs"
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(path))
    return path


def _recipe(path, policy):
    entry = {"format": "hf", "path": str(path), "prompt": "{question}", "columns": {"suffix": "answers"}}
    return parse_recipe(
        {
            "output_dir": "unused",
            "data": {"train": [entry], "on_bad_row": policy},
            "train": {"batch_size": 2, "seed": 0},
        }
    )


def _loader(samples, recipe):
    loader = build_train_loader(
        samples, build_processor(PRESETS["tiny-paligemma"]), recipe, family_of(recipe)
    )
    loader.collate_fn = SafeCollator(loader.collate_fn, recipe.data.on_bad_row)  # as train/loop.py does
    return loader


def test_bad_text_or_missing_image_stops_the_build_under_stop(dataset_dir):
    recipe = _recipe(dataset_dir, "stop")
    with pytest.raises(DataError, match=r"docs\[2\]: empty suffix.*on_bad_row=stop"):
        build_samples(recipe.data.train, "train", BadRows("stop"))


def test_skip_counts_bad_rows_at_build_time_and_mid_training(dataset_dir):
    recipe = _recipe(dataset_dir, "skip")
    bad = BadRows("skip")
    samples = build_samples(recipe.data.train, "train", bad)
    assert dict(bad.counts) == {"empty_suffix": 1, "missing_image": 1}
    assert len(samples) == 4  # rows 0, 1 and the corrupt-bytes rows 4, 5, found only when read
    assert [samples[i].source.rsplit("[", 1)[1] for i in range(2)] == ["0]", "1]"]
    rows, rejected = 0, []
    for batch in _loader(samples, recipe):
        rejected += batch.pop(BAD_ROWS_KEY, [])
        rows += int(batch["input_ids"].shape[0])
    assert rows == 2
    assert sorted((reason, message.split(":")[0][-7:]) for reason, message in rejected) == [
        ("corrupt_image", "docs[4]"),
        ("corrupt_image", "docs[5]"),
    ]


def test_stop_names_the_row_that_fails_mid_training(dataset_dir):
    recipe = _recipe(dataset_dir, "stop")
    skip = _recipe(dataset_dir, "skip")
    samples = build_samples(skip.data.train, "train", BadRows("skip"))  # build-time rows skipped
    with pytest.raises(DataError, match=r"docs\[[45]\]: (cannot decode|the image bytes)"):
        for _ in _loader(samples, recipe):
            pass
