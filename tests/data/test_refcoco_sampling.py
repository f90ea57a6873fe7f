"""RefCOCO training rows: one object, then one of its sentences, per image per epoch (big_vision's
refcoco_seg transfer), and big_vision's combined RefCOCO/RefCOCO+/RefCOCOg training set."""

from __future__ import annotations

import pickle
from collections import Counter
from pathlib import Path

import pytest

from pg_tune.config.recipe import parse_recipe
from pg_tune.data.bad_rows import BadRows
from pg_tune.data.build import build_samples, train_order

REFCOCO = Path(__file__).resolve().parents[2] / "data_formats" / "samples" / "refcoco"


def _recipe(seed=0, **options):
    entry = {
        "format": "refcoco",
        "refs": str(REFCOCO / "refs(unc).p"),
        "instances": str(REFCOCO / "instances.json"),
        "images": str(REFCOCO / "images"),
        "split": "val",  # the sample's val split: image 139, two objects with 2 and 1 sentences
        **options,
    }
    return parse_recipe({"output_dir": "unused", "data": {"train": [entry]}, "train": {"seed": seed}})


def _picks(recipe, epochs):
    samples = build_samples(recipe.data.train, "train", BadRows())
    rows = [train_order(samples, recipe.data.train, recipe.train.seed, e) for e in range(epochs)]
    return samples, rows


def test_one_object_then_one_sentence_per_image_per_epoch():
    samples, rows = _picks(_recipe(), 300)
    assert len(samples) == 3 and {s.meta["group"] for s in samples} == {samples[0].meta["group"]}
    assert len({s.meta["object"] for s in samples}) == 2
    assert all(len(r) == 1 for r in rows)  # one row per image per epoch (per-sentence: 3)
    counts = Counter(samples[r[0]].prefix for r in rows)
    # The one-sentence object is drawn half the time (object first), not a third (uniform over
    # sentences); 300 seeded draws: binomial sd ~8.7 around 150, vs 100 for the wrong rule.
    assert 125 <= counts["detect blue dog right"] <= 175
    assert (
        counts["detect the red cat on the left"] + counts["detect left animal"]
        == 300 - counts["detect blue dog right"]
    )
    assert counts["detect left animal"] > 40 and counts["detect the red cat on the left"] > 40


def test_draws_are_a_function_of_seed_and_epoch_so_resume_replays_them():
    _, first = _picks(_recipe(seed=3), 40)
    _, again = _picks(_recipe(seed=3), 40)
    _, other = _picks(_recipe(seed=4), 40)
    assert first == again and first != other


def test_every_sentence_stays_an_option_and_eval_is_per_sentence():
    samples, rows = _picks(_recipe(train_pairs="every_sentence"), 2)
    assert all(sorted(r) == [0, 1, 2] for r in rows) and "group" not in samples[0].meta
    evals = build_samples(_recipe().data.train, "eval", BadRows())
    assert len(evals) == 3 and "group" not in evals[0].meta


def _ref(ref_id, ann_id, image_id, split, *sentences):
    return {
        "ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "category_id": 18, "split": split,
        "sentences": [{"raw": s, "sent": s, "sent_id": 100 + k, "tokens": s.split()} for k, s in enumerate(sentences)],
    }  # fmt: skip


@pytest.fixture()
def combined(tmp_path):
    """RefCOCO+ (unc) and RefCOCOg (umd) pickles over the same sample images, as the refer toolkit ships them."""
    plus = [_ref(0, 2, 139, "train", "dog facing right"), _ref(1, 3, 285, "train", "square shaped dog")]
    umd = [_ref(0, 3, 285, "train", "a blue square"), _ref(1, 1, 139, "test", "the cat")]
    paths = []
    for name, refs in (("refs(unc)+.p", plus), ("refs(umd).p", umd)):
        (tmp_path / name).write_bytes(pickle.dumps(refs, protocol=2))
        paths.append(str(tmp_path / name))
    return [str(REFCOCO / "refs(unc).p"), *paths]


def test_combined_training_set_excludes_every_eval_image_and_merges_objects(combined):
    recipe = _recipe(refs=combined, split="train")
    samples = build_samples(recipe.data.train, "train", BadRows())
    # Image 139 is val in RefCOCO and test in RefCOCOg: its RefCOCO+ train ref is left out.
    assert {s.image_size for s in samples} == {(80, 80)}
    assert sorted(s.prefix for s in samples) == [
        "detect a blue square", "detect square shaped dog", "detect the big blue square",
    ]  # fmt: skip
    assert len({s.meta["object"] for s in samples}) == 1  # ann 3 across all three sets: one object
    # A single refs file keeps its own train split (image 285 only, as before).
    single = build_samples(_recipe(split="train").data.train, "train", BadRows())
    assert [s.prefix for s in single] == ["detect the big blue square"]
    # split: test of the combined set gathers test, testA and testB.
    test = build_samples(_recipe(refs=combined, split="test").data.train, "eval", BadRows())
    assert [s.prefix for s in test] == ["detect the cat"]
