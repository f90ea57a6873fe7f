"""Recipes are validated before anything heavy loads; errors name the dotted path."""

import textwrap

import pytest

from pg_tune.cli import main
from pg_tune.config import ConfigError, load_recipe, parse_recipe

MINIMAL = {"output_dir": "runs/x", "data": {"train": [{"format": "shapes", "num_samples": 4}]}}


def _with(**sections):
    data = {**MINIMAL, **sections}
    return data


def test_minimal_recipe_gets_defaults():
    recipe = parse_recipe(MINIMAL)
    assert recipe.model.name_or_path == "tiny-paligemma2"
    assert recipe.lora.targets == "attention_mlp" and recipe.train.lr == 2e-4
    assert recipe.data.train[0].options.num_samples == 4


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_with(lora={"rank": 8}), r"unknown key 'lora.rank' — did you mean 'r'\?"),
        (_with(trian={"lr": 1}), r"unknown key 'trian' — did you mean 'train'\?"),
        (_with(train={"lr": "fast"}), r"train.lr: expected a number, got 'fast'"),
        (_with(train={"batch_size": 2.5}), r"train.batch_size: expected an integer"),
        (_with(lora={"targets": "everything"}), r"lora.targets: expected one of 'attention'"),
        (
            _with(quantization={"mode": "4bit", "bnb_4bit_compute_type": "bfloat16"}),
            r"unknown key 'quantization.bnb_4bit_compute_type' — did you mean 'bnb_4bit_compute_dtype'\?",
        ),
        (
            _with(data={"train": [{"format": "jsonl", "pth": "x.jsonl"}]}),
            r"unknown key 'data.train\[0\].pth' — did you mean 'path'\?",
        ),
        (
            _with(data={"train": [{"format": "jsnol", "path": "x"}]}),
            r"data.train\[0\].format: unknown dataset format 'jsnol' — did you mean 'jsonl'\?",
        ),
        (_with(data={"train": [{"format": "jsonl"}]}), r"data.train\[0\].path: required key is missing"),
        (_with(data={"train": []}), r"data.train: at least one dataset entry"),
        ({"data": MINIMAL["data"]}, r"output_dir: required key is missing"),
    ],
)
def test_bad_recipes_fail_naming_the_field(data, message):
    with pytest.raises(ConfigError, match=message):
        parse_recipe(data)


def test_overrides_and_file_errors(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        textwrap.dedent("""
        output_dir: runs/x
        data:
          train:
            - format: shapes
    """)
    )
    recipe, resolved = load_recipe(path, ["train.lr=1e-3", "lora.vision=true", "data.train.0.num_samples=7"])
    assert recipe.train.lr == 1e-3 and recipe.lora.vision is True
    assert recipe.data.train[0].options.num_samples == 7
    assert resolved["data"]["train"][0] == {
        "format": "shapes",
        "weight": 1.0,
        "num_samples": 7,
        "image_size": 112,
        "prompt": "caption en",
        "seed": None,
        "pairs": False,
        "limit": None,  # every format takes limit (data_formats/README.md)
    }
    with pytest.raises(ConfigError, match=r"r.yaml: train.lr: expected a number"):
        load_recipe(path, ["train.lr=abc"])
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_recipe(tmp_path / "missing.yaml")


def test_validate_command(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text("output_dir: x\nlora: {rnk: 4}\ndata: {train: [{format: shapes}]}\n")
    assert main(["validate", str(path)]) == 2
    assert "unknown key 'lora.rnk' — did you mean 'r'?" in capsys.readouterr().err
    assert main(["validate", str(path), "lora={r: 4}"]) == 0


def test_readme_recipe_example_validates():
    """The recipe shown in README.md must stay a valid recipe."""
    from pathlib import Path

    import yaml

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("### A recipe", 1)[1].split("```yaml", 1)[1].split("```", 1)[0]
    recipe = parse_recipe(yaml.safe_load(block))
    assert recipe.model.name_or_path == "google/paligemma2-3b-pt-224"
    assert recipe.logging.trackers == ["tensorboard", "wandb"]


DPO_DATA = {"train": [{"format": "shapes", "num_samples": 4, "pairs": True}]}


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"dpo": {"beta": 0.5}}, r"dpo.beta: only read with train.objective=dpo.*set train.objective=dpo"),
        ({"train": {"objective": "dpo"}, "data": MINIMAL["data"]}, r"data.train\[0\]: .*set pairs: true"),
        (
            {
                "train": {"objective": "dpo"},
                "data": {"train": [{"format": "coco_captions", "annotations": "a", "images": "b"}]},
            },
            r"data.train\[0\]: .*format 'coco_captions' has no rejected answers",
        ),
        (
            {"train": {"objective": "dpo", "label_smoothing": 0.1}},
            r"train.label_smoothing: .*dpo.label_smoothing=0.1",
        ),
        ({"train": {"objective": "dpo"}, "dpo": {"beta": 0}}, r"dpo.beta: must be a finite number > 0"),
        (
            {"train": {"objective": "dpo"}, "dpo": {"label_smoothing": 0.5}},
            r"dpo.label_smoothing: must be in \[0, 0.5\)",
        ),
        (
            {"train": {"objective": "dpo"}, "dpo": {"loss": "ipo", "label_smoothing": 0.1}},
            r"dpo.label_smoothing: conservative DPO smooths the sigmoid loss; dpo.loss is 'ipo'",
        ),
        (
            {"train": {"objective": "dpo"}, "dpo": {"sft_weight": -1}},
            r"dpo.sft_weight: must be a finite number",
        ),
        ({"train": {"objective": "dpo"}, "dpo": {"loss": "kto"}}, r"dpo.loss: expected one of 'sigmoid'"),
        ({"train": {"objective": "ppo"}}, r"train.objective: expected one of 'sft' \| 'dpo'"),
        (
            {"eval": {"best_metric": "preference/acc"}, "data": {**DPO_DATA, "eval": DPO_DATA["train"]}},
            r"did you mean 'preference/accuracy'",
        ),
    ],
)
def test_dpo_settings_refused_where_they_cannot_apply(sections, message):
    data = {**MINIMAL, "data": DPO_DATA, **sections}
    with pytest.raises(ConfigError, match=message):
        parse_recipe(data)


def test_dpo_recipe_validates(tmp_path, capsys):
    recipe = parse_recipe(
        {**MINIMAL, "data": {**DPO_DATA, "eval": DPO_DATA["train"]}, "train": {"objective": "dpo"},
         "dpo": {"beta": 0.2, "loss": "sigmoid", "label_smoothing": 0.1, "sft_weight": 1.0},
         "eval": {"best_metric": "preference/accuracy", "every": 5, "patience": 2}}
    )  # fmt: skip
    assert recipe.train.objective == "dpo" and recipe.dpo.beta == 0.2
    path = tmp_path / "r.yaml"
    path.write_text(
        "output_dir: runs/x\ndata: {train: [{format: shapes, pairs: true}]}\ntrain: {objective: dpo}\n"
    )
    assert main(["validate", str(path)]) == 0
    assert main(["validate", str(path), "train.objective=sft", "dpo.sft_weight=1"]) != 0
    assert "dpo.sft_weight: only read with train.objective=dpo" in capsys.readouterr().err
