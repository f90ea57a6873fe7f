"""DPO end to end: through the real CLI (LoRA), with a frozen reference copy (partial), and QLoRA on CPU."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pg_tune.cli import main
from pg_tune.config import load_recipe
from pg_tune.data.formats.shapes import write_jsonl
from pg_tune.train.loop import train
from tests.families import family_of

LN2_FP32 = float(torch.tensor(math.log(2.0), dtype=torch.float32))
PAIR_LOGS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margin",
    "rewards/accuracy",
    "logps/chosen",
    "logps/rejected",
)

RECIPE = """
output_dir: {out}
model: {{name_or_path: {model}}}
lora: {{r: 8, alpha: 16, dropout: 0.0, targets: attention_mlp}}
data:
  train: [{{format: jsonl, path: {jsonl}}}]
  eval:
    - {{format: shapes, num_samples: 6, image_size: 32, pairs: true}}
    - {{format: shapes, num_samples: 4, image_size: 32}}
  max_text_length: 16
train: {{objective: dpo, max_steps: 6, batch_size: 4, lr: 1.0e-2, log_every: 1, warmup_ratio: 0.0}}
dpo: {{beta: 0.5}}
eval: {{every: 3, batch_size: 4, max_new_tokens: 4, best_metric: preference/accuracy, before_training: true}}
"""


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_dpo_through_the_cli(tmp_path, capsys):
    jsonl = write_jsonl(tmp_path / "pairs", num_samples=16, pairs=True)
    out = tmp_path / "run"
    recipe = tmp_path / "dpo.yaml"
    recipe.write_text(RECIPE.format(out=out, model="tiny-paligemma2", jsonl=jsonl))
    assert main(["train", str(recipe)]) == 0
    assert "preference/accuracy" in capsys.readouterr().out  # the summary prints it

    steps = [r for r in _records(out) if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 7))
    assert all(set(PAIR_LOGS) <= set(r) for r in steps)
    # A fresh adapter: the policy is its reference, every reward 0 and the loss exactly ln 2.
    assert steps[0]["loss"] == LN2_FP32
    assert all(steps[0][k] == 0 for k in ("rewards/chosen", "rewards/rejected", "rewards/margin"))
    assert steps[0]["supervised_tokens"] > 0 and steps[0]["logps/chosen"] < 0
    assert sum(r["loss"] for r in steps[-2:]) / 2 < LN2_FP32  # it learns to prefer the chosen captions

    evals = [r for r in _records(out) if "eval/preference/accuracy" in r]
    assert [r["step"] for r in evals] == [0, 3, 6, 6]  # before, every 3, after
    assert evals[0]["eval/preference/accuracy"] == 0.0 and evals[0]["eval/preference/loss"] == LN2_FP32
    assert all(r["eval/preference/count"] == 6 and r["eval/caption/count"] == 4 for r in evals)
    summary = json.loads((out / "summary.json").read_text())
    assert {"preference/accuracy", "preference/logp_accuracy", "caption/exact_match"} <= set(
        summary["metrics_after"]
    )
    final = json.loads((out / "final_state.json").read_text())
    assert final["best_checkpoint"] and (out / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_partial_dpo_with_a_frozen_reference(tmp_path):
    jsonl = write_jsonl(tmp_path / "pairs", num_samples=8, pairs=True)
    recipe_path = tmp_path / "dpo.yaml"
    recipe_path.write_text(RECIPE.format(out=tmp_path / "run", model="tiny-paligemma2", jsonl=jsonl))
    overrides = ["method=partial", "partial.groups=[attention]", "train.max_steps=2", "eval.every=null"]
    overrides += ["eval.best_metric=null", "eval.before_training=false", "data.eval=[]", "train.lr=1e-4"]
    recipe, resolved = load_recipe(recipe_path, overrides)
    result = train(recipe, resolved, family_of(recipe))
    assert result.first_loss == LN2_FP32 and result.steps == 2
    assert result.last_loss != LN2_FP32  # the trained weights moved away from the frozen copy
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


@pytest.mark.slow
def test_qlora_dpo_on_cpu(tmp_path, tiny_checkpoint):
    jsonl = write_jsonl(tmp_path / "pairs", num_samples=8, pairs=True)
    recipe_path = tmp_path / "dpo.yaml"
    recipe_path.write_text(RECIPE.format(out=tmp_path / "run", model=tiny_checkpoint, jsonl=jsonl))
    overrides = ["quantization.mode=4bit", "quantization.bnb_4bit_compute_dtype=float32"]
    overrides += ["train.gradient_checkpointing=true", "train.max_steps=2", "eval.every=null"]
    overrides += ["eval.best_metric=null", "eval.before_training=false", "data.eval.1.num_samples=2"]
    recipe, resolved = load_recipe(recipe_path, overrides)
    result = train(recipe, resolved, family_of(recipe))
    assert result.first_loss == LN2_FP32 and result.steps == 2
    assert math.isfinite(result.last_loss)
    assert result.metrics_after["preference/count"] == 6
