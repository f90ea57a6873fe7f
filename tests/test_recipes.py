"""Every shipped recipe validates (keys, types, formats) without its data files being present."""

from __future__ import annotations

from pathlib import Path

import pytest

from pg_tune.config import load_recipe

ROOT = Path(__file__).resolve().parents[1] / "recipes"
RECIPES = sorted(p for p in ROOT.rglob("*.yaml") if p.parent.name != "accelerate")
LAUNCH_CONFIGS = sorted((ROOT / "accelerate").glob("*.yaml"))


def test_recipes_are_shipped_for_both_generations():
    names = {f"{p.parent.name}/{p.stem}" for p in RECIPES}
    for family in ("paligemma", "paligemma2"):
        for stem in (
            "cococap_224",
            "cococap_448",
            "refcoco_seg_448",
            "docvqa_448",
            "docvqa_896",
            "jsonl_224",
        ):
            assert f"{family}/{stem}" in names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipe_validates_and_says_how_to_run_it(path):
    recipe, resolved = load_recipe(path)
    assert recipe.data.train and resolved["output_dir"]
    head = path.read_text().splitlines()[:6]
    assert any(f"pg-tune train recipes/{path.parent.name}/{path.name}" in line for line in head), head


@pytest.mark.parametrize("path", [p for p in RECIPES if p.parent.name.startswith("paligemma")], ids=str)
def test_qlora_is_an_override_not_a_copy(path):
    assert "quantization.mode=4bit" in path.read_text()
    recipe, _ = load_recipe(path, ["quantization.mode=4bit"])
    assert recipe.quantization.mode == "4bit"
    res = int(path.stem.rsplit("_", 1)[1])
    assert recipe.model.name_or_path.endswith(f"-pt-{res}")


@pytest.mark.parametrize("path", LAUNCH_CONFIGS, ids=lambda p: p.name)
def test_accelerate_launch_configs_load(path):
    """The launch configs are accelerate's own format: its loader must accept every key."""
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(path)
    assert config.num_processes >= 2
    assert "accelerate launch --config_file recipes/accelerate/" + path.name in path.read_text()


@pytest.mark.parametrize(
    ("folder", "family", "stems"),
    [
        ("gemma3", "gemma3", ("cococap_896", "docvqa_896", "refcoco_det_896", "jsonl_896")),
        ("smolvlm2", "smolvlm", ("cococap", "docvqa", "refcoco_det", "jsonl")),
    ],
)
def test_chat_family_recipes(folder, family, stems):
    """Gemma 3 / SmolVLM2 recipes: one per shipped task, their family resolves offline, QLoRA is a flag."""
    from pg_tune.data.validate import check_recipe_support
    from pg_tune.models.family import family_for

    for stem in stems:
        path = ROOT / folder / f"{stem}.yaml"
        recipe, _ = load_recipe(path, ["quantization.mode=4bit"])
        assert recipe.quantization.mode == "4bit" and "quantization.mode=4bit" in path.read_text()
        assert family_for(recipe.model.name_or_path).name == family
        check_recipe_support(recipe, family_for(family))  # no task the family cannot render
