"""The training loader draws rows through the weighted mix, reproducibly per (seed, epoch)."""

from collections import Counter

from pg_tune.config.recipe import parse_recipe
from pg_tune.data.bad_rows import BadRows
from pg_tune.data.build import build_samples
from pg_tune.data.loader import build_train_loader
from pg_tune.models.paligemma.tiny import PRESETS, build_processor
from tests.families import family_of


def _loader(weights, group_by_length=False):
    recipe = parse_recipe(
        {
            "output_dir": "unused",
            "data": {
                "train": [
                    {"format": "shapes", "num_samples": 6, "seed": 0, "weight": weights[0]},
                    {
                        "format": "shapes",
                        "num_samples": 4,
                        "seed": 1,
                        "prompt": "describe en",
                        "weight": weights[1],
                    },
                ],
                "group_by_length": group_by_length,
            },
            "train": {"batch_size": 4, "seed": 7},
        }
    )
    samples = build_samples(recipe.data.train, "train", BadRows())
    return build_train_loader(
        samples, build_processor(PRESETS["tiny-paligemma"]), recipe, family_of(recipe)
    ), samples


def _epoch_rows(loader, epoch):
    for sampler in (loader.batch_sampler, loader.sampler):  # what accelerate's set_epoch reaches
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
    return [int(i) for batch in loader for i in batch["sample_index"]]


def test_weights_repeat_entries_per_epoch():
    loader, samples = _loader([2.0, 0.5])
    rows = _epoch_rows(loader, 0)
    per_entry = Counter("describe" if samples[i].prefix == "describe en" else "caption" for i in rows)
    assert per_entry == {"caption": 12, "describe": 2}  # 6 x 2 and 4 x 0.5


def test_order_depends_only_on_seed_and_epoch():
    for group in (False, True):
        a, _ = _loader([1.0, 1.0], group)
        b, _ = _loader([1.0, 1.0], group)
        first = _epoch_rows(a, 0)
        second = _epoch_rows(a, 1)
        assert sorted(first) == list(range(10)) and first != second
        assert _epoch_rows(b, 1) == second  # a fresh loader (as after a resume) replays epoch 1
