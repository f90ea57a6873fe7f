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
