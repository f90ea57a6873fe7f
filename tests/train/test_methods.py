"""Training methods: lora (with DoRA / rsLoRA), full and partial; the memory estimate; saving."""

from __future__ import annotations

import json
import shutil

import peft
import pytest
import torch
from safetensors.torch import load_file

from pg_tune.config.recipe import LoraConfig, Recipe, load_recipe, parse_recipe
from pg_tune.config.schema import ConfigError
from pg_tune.models.paligemma.tiny import build_model
from pg_tune.train.adapters import apply_lora, apply_method
from pg_tune.train.methods import (
    TrainingMemoryWarning,
    estimate_memory,
    memory_warning,
    unfreeze_groups,
)
from tests.families import family_of  # noqa: E402

BASE = {"output_dir": "x", "data": {"train": [{"format": "shapes"}]}}


def _recipe(**sections) -> Recipe:
    return parse_recipe({**BASE, **sections})


def test_lora_rank_is_only_checked_when_lora_is_the_method():
    with pytest.raises(ConfigError, match=r"lora.r: must be >= 1, got 0"):
        _recipe(lora={"r": 0})
    assert _recipe(method="full", lora={"r": 0}).method == "full"


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"method": "freeze"}, r"method: expected one of 'lora' \| 'full' \| 'partial', got 'freeze'"),
        ({"method": "full", "quantization": {"mode": "4bit"}}, r"cannot be 4bit quantized"),
        ({"method": "partial", "partial": {"groups": []}}, r"partial.groups: name at least one"),
        ({"method": "partial", "partial": {"groups": ["attn"]}}, r"partial.groups\[0\]"),
        ({"train": {"label_smoothing": 1.0}}, r"train.label_smoothing: must be in \[0, 1\)"),
        ({"full": {"vison": True}}, r"unknown key 'full.vison'"),
        (
            {"data": {"train": [{"format": "shapes"}], "shuffle": False, "group_by_length": True}},
            r"data.shuffle: false keeps the rows in file order",
        ),
    ],
)
def test_method_config_errors_name_the_field(sections, message):
    with pytest.raises(ConfigError, match=message):
        _recipe(**sections)


def _trainable(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def test_partial_groups_select_exactly_their_weights():
    model, _ = build_model("tiny-paligemma2")
    unfreeze_groups(model, ["attention"], family_of(model))
    names = set(_trainable(model))
    assert names and all(".self_attn." in n and n.startswith("model.language_model.layers.") for n in names)
    projections = {n.split(".self_attn.")[1].split(".")[0] for n in names}
    assert projections == {"q_proj", "k_proj", "v_proj", "o_proj"}

    unfreeze_groups(model, ["projector"], family_of(model))
    assert set(_trainable(model)) == {
        n for n, _ in model.named_parameters() if n.startswith("model.multi_modal_projector.")
    }


@pytest.mark.parametrize("vision", [False, True])
def test_full_trains_language_model_embeddings_and_projector(vision):
    model, _ = build_model("tiny-paligemma")
    recipe = _recipe(method="full", full={"vision": vision})
    model = apply_method(model, recipe, family_of(model))
    assert isinstance(model, type(build_model("tiny-paligemma")[0]))  # no wrapper: a plain model
    trainable = _trainable(model)
    assert model.lm_head.weight.requires_grad  # tied to the embeddings, which train
    assert all(p.requires_grad for p in model.model.language_model.parameters())
    assert all(p.requires_grad for p in model.model.multi_modal_projector.parameters())
    assert all(p.requires_grad == vision for p in model.model.vision_tower.parameters())
    expected = sum(p.numel() for p in model.parameters()) - (
        0 if vision else sum(p.numel() for p in model.model.vision_tower.parameters())
    )
    assert sum(p.numel() for p in trainable.values()) == expected


def test_dora_and_rslora_reach_peft():
    model, _ = build_model("tiny-paligemma")
    dora = apply_lora(model, LoraConfig(r=4, alpha=8, use_dora=True), "tiny-paligemma", family_of(model))
    assert dora.peft_config["default"].use_dora
    assert any("lora_magnitude_vector" in n for n, _ in dora.named_parameters())

    model, _ = build_model("tiny-paligemma")
    rs = apply_lora(model, LoraConfig(r=4, alpha=8, use_rslora=True), "tiny-paligemma", family_of(model))
    layer = next(m for m in rs.modules() if isinstance(m, peft.tuners.lora.LoraLayer))
    assert layer.scaling["default"] == pytest.approx(8 / 4**0.5)  # alpha / sqrt(r), not alpha / r


def test_memory_estimate_counts_weights_gradients_and_adam_states():
    model, _ = build_model("tiny-paligemma")
    unfreeze_groups(model, ["attention"], family_of(model))
    n_total = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    adamw = estimate_memory(model, "adamw")  # fp32 weights: 4 bytes each, two fp32 moments
    assert (adamw.trainable_params, adamw.total_params) == (n_train, n_total)
    assert adamw.weight_bytes == 4 * n_total
    assert adamw.grad_bytes == 4 * n_train and adamw.optimizer_bytes == 8 * n_train
    assert estimate_memory(model, "adamw_8bit").optimizer_bytes == 2 * n_train

    recipe = _recipe(method="partial")
    assert memory_warning(model, recipe, capacity=(10 * adamw.total_bytes, "test")) is None
    text = memory_warning(model, recipe, capacity=(adamw.total_bytes, "test"))
    assert text and "method 'partial'" in text and "fewer partial.groups" in text


def test_apply_method_warns_when_it_cannot_fit(monkeypatch):
    from pg_tune.train import methods

    monkeypatch.setattr(methods, "device_memory_bytes", lambda: (10_000_000, "a small test device"))
    model, _ = build_model("tiny-paligemma")
    with pytest.warns(TrainingMemoryWarning, match="a small test device"):
        apply_method(model, _recipe(method="full"), family_of(model))


# --- end to end: every method trains, resumes bitwise, saves what loads -------------------------------

METHODS = {
    "full": {"method": "full", "train": {"lr": 3e-4}},
    "partial": {
        "method": "partial",
        "partial": {"groups": ["attention", "projector"]},
        "train": {"lr": 1e-3},
    },
    "dora": {"lora": {"r": 4, "alpha": 8, "use_dora": True, "dropout": 0.1}, "train": {"lr": 3e-3}},
    "rslora": {"lora": {"r": 4, "alpha": 8, "use_rslora": True}, "train": {"lr": 3e-3}},
}


@pytest.fixture
def four_rows(tmp_path):
    """Eight rows, batch 4: two steps an epoch, so the step-3 checkpoint falls mid-epoch."""
    from pg_tune.data.formats.shapes import write_jsonl

    return write_jsonl(tmp_path / "four", num_samples=8)


def _method_recipe(tmp_path, name: str, method: str, shapes_jsonl) -> tuple[Recipe, dict]:
    import yaml

    data = {
        "output_dir": str(tmp_path / name),
        "model": {"name_or_path": "tiny-paligemma2"},
        "data": {"train": [{"format": "jsonl", "path": str(shapes_jsonl)}], "max_text_length": 16},
        "train": {"max_steps": 6, "batch_size": 4, "log_every": 1, "save_every": 3, "warmup_ratio": 0.0},
        "eval": {"before_training": False},
    }
    for key, value in METHODS[method].items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_recipe(path)


def _losses(run) -> dict[int, float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def _weights(run, method: str) -> dict[str, torch.Tensor]:
    folder = run / ("adapter" if method not in ("full", "partial") else "model")
    files = sorted(folder.glob("*.safetensors"))
    assert files, f"no weights in {folder}"
    return {k: v for f in files for k, v in load_file(f).items()}


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_method_trains_and_resumes_bitwise(tmp_path, four_rows, method):
    from pg_tune.train.loop import train

    recipe, resolved = _method_recipe(tmp_path, "straight", method, four_rows)
    train(recipe, resolved, family_of(recipe))
    straight = tmp_path / "straight"
    losses = _losses(straight)
    assert list(losses) == [1, 2, 3, 4, 5, 6]
    assert losses[5] + losses[6] < losses[1] + losses[2] and losses[6] < 0.98 * losses[1], losses

    # A second run that stopped after step 3: its checkpoint is the first run's, resumed.
    recipe2, resolved2 = _method_recipe(tmp_path, "resumed", method, four_rows)
    shutil.copytree(
        straight / "checkpoints" / "step-0000003", tmp_path / "resumed" / "checkpoints" / "step-0000003"
    )
    train(recipe2, resolved2, family_of(recipe2), resume="auto")
    resumed = tmp_path / "resumed"
    assert {s: v for s, v in _losses(straight).items() if s > 3} == _losses(resumed)
    expected, got = _weights(straight, method), _weights(resumed, method)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


@pytest.mark.slow
def test_full_run_saves_a_model_folder_transformers_loads_and_push_plans_it(tmp_path, four_rows):
    from PIL import Image
    from transformers import PaliGemmaForConditionalGeneration, PaliGemmaProcessor

    from pg_tune.cli.train import run_training
    from pg_tune.data import Sample
    from pg_tune.export.hub import upload_plan
    from pg_tune.export.merged import export_merged
    from pg_tune.models.paligemma import PaliGemmaFamily

    recipe, resolved = _method_recipe(tmp_path, "run", "full", four_rows)
    recipe.train.max_steps, recipe.train.save_every = 2, None
    recipe.data.eval = recipe.data.train  # evaluation (generation) runs on the plain, unwrapped model
    recipe.eval.max_new_tokens = 3
    result = run_training(recipe, resolved)  # the command writes summary.json
    assert result.metrics_after and "caption/exact_match" in str(result.metrics_after)
    run = tmp_path / "run"
    assert result.adapter_dir == run / "model" and not (run / "adapter").exists()
    names = {p.name for p in (run / "model").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "recipe.yaml"} <= names

    # transformers alone reproduces the trained model's logits.
    model = PaliGemmaForConditionalGeneration.from_pretrained(run / "model").eval()
    processor = PaliGemmaProcessor.from_pretrained(run / "model")
    sample = Sample(Image.new("RGB", (60, 60), (30, 200, 30)), "caption en", "a green square", "t")
    batch = PaliGemmaFamily().collator(processor, 16)([(0, sample)])
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids", "pixel_values")}
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, result.model.eval()(**inputs).logits)
        base = build_model("tiny-paligemma2")[0].eval()
        assert not torch.equal(base(**inputs).logits, model(**inputs).logits)  # training moved it

    # push (adapter mode) uploads the model folder itself; export casts it.
    plan = {item.path_in_repo for item in upload_plan(run, "me/full")}
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md", "summary.json"} <= plan
    card = next(i for i in upload_plan(run, "me/full") if i.path_in_repo == "README.md").source.decode()
    assert "full fine-tuning" in card and "full-finetune" in card and "library_name: transformers" in card
    report = export_merged(run, tmp_path / "export", dtype="bf16", num_samples=2)
    assert report["method"] == "full" and report["cast"]["max_abs_diff"] > 0
    exported = PaliGemmaForConditionalGeneration.from_pretrained(tmp_path / "export")
    assert exported.dtype == torch.bfloat16
