"""QLoRA on CPU: bitsandbytes 0.50 quantizes on the CPU, so the whole path runs on the tiny model."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pg_tune.config.recipe import ModelConfig, QuantizationConfig, parse_recipe
from pg_tune.config.schema import ConfigError, from_dict
from pg_tune.data.formats.shapes import ShapesOptions, build
from pg_tune.models.paligemma import PaliGemmaFamily
from pg_tune.models.quantize import bnb_config, check_quantized, skip_modules
from pg_tune.train.adapters import prepare_model
from pg_tune.train.loss import SuffixLoss
from tests.families import family_of

PG = PaliGemmaFamily()
bnb = pytest.importorskip("bitsandbytes")


def _recipe(checkpoint, quantization: dict, **train):
    return parse_recipe(
        {
            "output_dir": "unused",
            "model": {"name_or_path": str(checkpoint), "dtype": "float32"},
            "quantization": quantization,
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "data": {"train": [{"format": "shapes", "num_samples": 2}]},
            "train": train,
        }
    )


def test_compute_type_typo_is_rejected_by_name():
    with pytest.raises(
        ConfigError, match=r"quantization\.bnb_4bit_compute_type.*did you mean 'bnb_4bit_compute_dtype'"
    ):
        parse_recipe(
            {
                "output_dir": "x",
                "quantization": {"mode": "4bit", "bnb_4bit_compute_type": "bfloat16"},
                "data": {"train": [{"format": "shapes"}]},
            }
        )


def test_bad_values_are_rejected():
    with pytest.raises(
        ConfigError, match=r"quantization\.bnb_4bit_quant_type: expected one of 'nf4' \| 'fp4'"
    ):
        from_dict(QuantizationConfig, {"bnb_4bit_quant_type": "int4"}, "quantization")
    with pytest.raises(ConfigError, match=r"quantization\.mode"):
        from_dict(QuantizationConfig, {"mode": "4-bit"}, "quantization")


def test_bnb_config_maps_every_key():
    q = QuantizationConfig(
        mode="4bit",
        bnb_4bit_quant_type="fp4",
        bnb_4bit_use_double_quant=False,
        bnb_4bit_compute_dtype="float32",
    )
    cfg = bnb_config(q, PG)
    assert cfg.load_in_4bit and not cfg.load_in_8bit
    assert (cfg.bnb_4bit_quant_type, cfg.bnb_4bit_use_double_quant, cfg.bnb_4bit_compute_dtype) == (
        "fp4",
        False,
        torch.float32,
    )
    assert cfg.llm_int8_skip_modules == ["lm_head", "model.multi_modal_projector", "model.vision_tower"]
    assert "model.vision_tower" not in skip_modules(dataclasses.replace(q, quantize_vision_tower=True), PG)
    assert bnb_config(QuantizationConfig(mode="8bit"), PG).load_in_8bit


def test_auto_compute_dtype_is_float32_on_a_cpu_without_fast_bf16(monkeypatch):
    from pg_tune.models import cpu_dtype
    from pg_tune.models.quantize import resolve_compute_dtype

    auto = QuantizationConfig(mode="4bit")
    assert auto.bnb_4bit_compute_dtype == "auto"  # the default
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(cpu_dtype, "fast_on_cpu", lambda kind: False)
    assert resolve_compute_dtype(auto) == torch.float32 == bnb_config(auto, PG).bnb_4bit_compute_dtype
    monkeypatch.setattr(cpu_dtype, "fast_on_cpu", lambda kind: True)
    assert resolve_compute_dtype(auto) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cpu_dtype, "fast_on_cpu", lambda kind: False)
    assert resolve_compute_dtype(auto) == torch.bfloat16  # a GPU run computes in bf16
    # An explicit value is kept as written.
    assert resolve_compute_dtype(dataclasses.replace(auto, bnb_4bit_compute_dtype="float16")) == torch.float16


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_load_has_the_recipe_dtypes(tiny_checkpoint, quant_type):
    q = QuantizationConfig(mode="4bit", bnb_4bit_quant_type=quant_type, bnb_4bit_compute_dtype="float32")
    model = PaliGemmaFamily().load_model(ModelConfig(name_or_path=str(tiny_checkpoint), dtype="float32"), q)
    report = check_quantized(model, q, PG)
    assert report.compute_dtype == torch.float32 and report.quant_type == quant_type
    # 2 layers x 7 linears in the language model; vision tower, projector and head are not quantized.
    assert len(report.quantized) == 14 and all(".language_model." in n for n in report.quantized)
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight.dtype == torch.float32
    assert type(model.model.multi_modal_projector.linear) is torch.nn.Linear
    assert type(model.model.vision_tower.encoder.layers[0].mlp.fc1) is torch.nn.Linear
    # A recipe that disagrees with what was loaded is caught, naming the key.
    with pytest.raises(RuntimeError, match="bnb_4bit_compute_dtype=bfloat16"):
        check_quantized(model, dataclasses.replace(q, bnb_4bit_compute_dtype="bfloat16"), PG)
    with pytest.raises(RuntimeError, match="bnb_4bit_use_double_quant=False"):
        check_quantized(model, dataclasses.replace(q, bnb_4bit_use_double_quant=False), PG)
    with pytest.raises(RuntimeError, match="quantize_vision_tower=true"):
        check_quantized(model, dataclasses.replace(q, quantize_vision_tower=True), PG)


def test_8bit_load(tiny_checkpoint):
    q = QuantizationConfig(mode="8bit")
    model = PaliGemmaFamily().load_model(ModelConfig(name_or_path=str(tiny_checkpoint), dtype="float32"), q)
    report = check_quantized(model, q, PG)
    assert len(report.quantized) == 14
    assert isinstance(model.model.language_model.layers[0].mlp.up_proj, bnb.nn.Linear8bitLt)


def _lora_grads(recipe) -> dict[str, float]:
    processor = PaliGemmaFamily().load_processor(recipe.model)
    model = PaliGemmaFamily().load_model(recipe.model, recipe.quantization)
    torch.manual_seed(0)
    model = prepare_model(model, recipe, family_of(recipe))
    # LoRA B starts at zero, so A gets no gradient on the first step: give B a value first.
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    samples = build(ShapesOptions(num_samples=2), _ctx())
    batch = PaliGemmaFamily().collator(processor, max_text_length=16)([(i, s) for i, s in enumerate(samples)])
    model.train()
    loss, count = SuffixLoss(model, family_of(model))(batch)
    (loss / count).backward()
    grads = {n: float(p.grad.abs().sum()) for n, p in model.named_parameters() if p.requires_grad}
    frozen_with_grad = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    assert not frozen_with_grad
    return grads


def _ctx():
    from pg_tune.data.bad_rows import BadRows
    from pg_tune.data.formats import BuildContext

    return BuildContext(split="train", bad_rows=BadRows("stop"))


@pytest.mark.parametrize("mode", ["none", "4bit"])
def test_lora_weights_get_gradients_with_checkpointing(tiny_checkpoint, mode):
    recipe = _recipe(
        tiny_checkpoint, {"mode": mode, "bnb_4bit_compute_dtype": "float32"}, gradient_checkpointing=True
    )
    grads = _lora_grads(recipe)
    assert grads and all("lora_" in n for n in grads)
    assert all(g > 0 for g in grads.values()), [n for n, g in grads.items() if g == 0]


def test_checkpointing_is_non_reentrant_with_input_grads(tiny_checkpoint):
    recipe = _recipe(
        tiny_checkpoint, {"mode": "4bit", "bnb_4bit_compute_dtype": "float32"}, gradient_checkpointing=True
    )
    model = prepare_model(
        PaliGemmaFamily().load_model(recipe.model, recipe.quantization), recipe, family_of(recipe)
    )
    base = model.get_base_model()
    assert base.is_activation_checkpointing
    layer = base.model.language_model.layers[0]
    assert layer.gradient_checkpointing
    # transformers stores the kwargs it was enabled with on the checkpointing partial.
    assert layer._gradient_checkpointing_func.keywords.get("use_reentrant") is False
    embeds = base.get_input_embeddings()(torch.tensor([[2, 108]]))
    assert embeds.requires_grad
