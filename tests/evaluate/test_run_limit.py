"""``eval.limit`` caps each eval dataset, not the total, during training."""

from pg_tune.config.recipe import parse_recipe
from pg_tune.data.bad_rows import BadRows
from pg_tune.data.build import build_samples
from pg_tune.evaluate import run
from tests.families import family_of


def test_limit_applies_per_eval_dataset(monkeypatch):
    recipe = parse_recipe(
        {
            "output_dir": "unused",
            "data": {
                "train": [{"format": "shapes", "num_samples": 2}],
                "eval": [
                    {"format": "shapes", "num_samples": 5},
                    {"format": "shapes", "num_samples": 5, "seed": 3},
                ],
            },
            "eval": {"limit": 2},
        }
    )
    samples = build_samples(recipe.data.eval, "eval", BadRows())
    seen = []

    def fake_predict(model, processor, rows, recipe, family, accelerator, progress):
        seen.extend(r.source for r in rows)
        return [r.suffix for r in rows]

    monkeypatch.setattr(run, "predict_texts", fake_predict)

    class Single:
        is_local_main_process = True

    metrics = run.evaluate_samples(Single(), None, None, samples, recipe, family_of(recipe))
    assert seen == ["shapes(seed=1)[0]", "shapes(seed=1)[1]", "shapes(seed=3)[0]", "shapes(seed=3)[1]"]
    assert metrics["caption/count"] == 4 and metrics["caption/exact_match"] == 1.0
