"""Gemma 3 and SmolVLM2 end to end through the real CLI: they learn, save, and reload exactly."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from pg_tune.cli import main
from pg_tune.config import load_recipe
from pg_tune.data import Sample
from pg_tune.models.family import family_for
from tests.families import family_of
from tests.numerics import assert_close_to_scale

RECIPE = """
output_dir: {out}
model:
  name_or_path: {model}
lora: {{r: 8, alpha: 16, dropout: 0.0, targets: all_linear, vision: true}}
data:
  train: [{{format: jsonl, path: {jsonl}}}]
  eval: [{{format: shapes, num_samples: 8}}]
  max_text_length: 16
train: {{max_steps: 12, batch_size: 8, lr: 3.0e-3, log_every: 1, warmup_ratio: 0.0}}
eval: {{batch_size: 8, max_new_tokens: 6}}
logging: {{trackers: []}}
"""


@pytest.mark.slow
@pytest.mark.parametrize("model_name", ["tiny-gemma3", "tiny-smolvlm2"])
def test_train_learns_saves_and_reloads(tmp_path, shapes_jsonl, model_name, capsys):
    out = tmp_path / "run"
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(RECIPE.format(out=out, model=model_name, jsonl=shapes_jsonl))
    assert main(["train", str(recipe_path)]) == 0
    assert "=== pg_tune summary ===" in capsys.readouterr().out

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 12 and losses[-1] < 0.85 * losses[0]

    adapter = out / "adapter"
    names = {p.name for p in adapter.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "recipe.yaml"} <= names
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == model_name
    trained_weights = load_file(adapter / "adapter_model.safetensors")
    family = family_for(model_name)
    assert any(family.modules.vision in k for k in trained_weights)  # lora.vision reached the encoder

    # Reloading on a fresh base with peft reproduces the trained model's logits.
    recipe, resolved = load_recipe(recipe_path, ["eval.before_training=false"])
    reloaded = peft.PeftModel.from_pretrained(family.load_model(recipe.model), adapter).eval()
    recipe.output_dir = str(tmp_path / "again")
    from pg_tune.train.loop import train

    trained = train(recipe, resolved, family_of(recipe)).model.eval()
    again = load_file(tmp_path / "again" / "adapter" / "adapter_model.safetensors")
    assert again.keys() == trained_weights.keys()
    for key, value in trained_weights.items():  # CPU training is deterministic
        assert torch.equal(value, again[key]), key
    processor = family.load_processor(recipe.model)
    sample = Sample(Image.new("RGB", (60, 40), (30, 200, 30)), "caption en", "a green square", "t")
    batch = family.collator(processor, 16, train=False)([(0, sample)])
    inputs = family.generation_inputs(batch, torch.float32)
    with torch.no_grad():
        expected = trained(**inputs).logits
        got = reloaded(**inputs).logits
    assert_close_to_scale(got, expected)
