"""End to end through the real CLI on a tiny PaliGemma: it learns, saves, and reloads exactly."""

import json

import peft
import pytest
import torch
from accelerate.utils import set_seed
from safetensors.torch import load_file

from pg_tune.cli import main
from pg_tune.config import load_recipe
from pg_tune.data import Sample
from pg_tune.models.paligemma import PaliGemmaFamily
from pg_tune.train.adapters import prepare_model
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
train: {{max_steps: 16, batch_size: 8, lr: 3.0e-3, log_every: 1, warmup_ratio: 0.0}}
eval: {{batch_size: 8, max_new_tokens: 5}}
logging: {{trackers: [tensorboard, wandb]}}
"""


@pytest.mark.slow
@pytest.mark.parametrize("model_name", ["tiny-paligemma", "tiny-paligemma2"])
def test_train_learns_saves_and_reloads(tmp_path, shapes_jsonl, model_name, capsys):
    out = tmp_path / "run"
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(RECIPE.format(out=out, model=model_name, jsonl=shapes_jsonl))
    assert main(["train", str(recipe_path)]) == 0
    printed = capsys.readouterr().out
    assert "=== pg_tune summary ===" in printed and "caption/exact_match" in printed

    # metrics.jsonl: one object per logged step, with step, loss, lr; the loss falls.
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 17))
    assert all({"step", "loss", "lr"} <= r.keys() for r in steps)
    assert steps[-1]["loss"] < 0.85 * steps[0]["loss"]

    # The adapter folder: PEFT files, processor files, the resolved recipe.
    adapter = out / "adapter"
    names = {p.name for p in adapter.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "recipe.yaml"} <= names
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == model_name
    # Trackers wrote their files (wandb offline: no network needed).
    assert any(out.rglob("events.out.tfevents.*"))
    assert any(out.rglob("offline-run-*"))

    # Every LoRA weight moved away from its initial value.
    recipe, _ = load_recipe(recipe_path)
    base = PaliGemmaFamily().load_model(recipe.model)
    set_seed(recipe.train.seed)
    initial = {
        k: v.detach().clone()
        for k, v in prepare_model(base, recipe, family_of(recipe)).state_dict().items()
        if "lora_" in k
    }
    trained = load_file(adapter / "adapter_model.safetensors")
    assert len(trained) == len(initial) > 0
    for key, value in trained.items():
        start = initial[key.replace(".weight", ".default.weight")]
        assert not torch.equal(value, start), f"{key} did not change"

    # Reloading on a fresh base with peft reproduces the trained model's logits.
    reloaded = peft.PeftModel.from_pretrained(PaliGemmaFamily().load_model(recipe.model), adapter).eval()
    from pg_tune.models.paligemma.tiny import PRESETS, build_processor

    processor = build_processor(PRESETS[model_name])
    from PIL import Image

    sample = Sample(Image.new("RGB", (60, 60), (30, 200, 30)), "caption en", "a green square", "t")
    batch = PaliGemmaFamily().collator(processor, 16)([(0, sample)])
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids", "pixel_values")}
    trained_model = _trained_model_from_run(recipe_path)
    with torch.no_grad():
        expected = trained_model(**inputs).logits
        got = reloaded(**inputs).logits
    assert_close_to_scale(got, expected)


def _trained_model_from_run(recipe_path):
    """Train again in-process (deterministic on CPU) to hold the trained model itself."""
    from pg_tune.config import load_recipe
    from pg_tune.train.loop import train

    recipe, resolved = load_recipe(recipe_path, ["logging.trackers=[]", "eval.before_training=false"])
    recipe.output_dir = str(recipe_path.parent / "again")
    return train(recipe, resolved, family_of(recipe)).model.eval()
