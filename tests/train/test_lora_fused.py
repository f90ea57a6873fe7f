"""pg_tune's LoRA layers (``pg_tune.train.lora_fused.LoraDelta`` forward, ``UpcastLoraA`` in peft's
fallback path) against peft's own: the same loss and gradients to rounding, the input saved once in
the model's dtype, and adapters that are plain peft adapters."""

from __future__ import annotations

import json

import pytest
import torch

import pg_tune.train.adapters as adapters
from pg_tune.config.recipe import parse_recipe
from pg_tune.train.lora_fused import FusedLoraForward
from pg_tune.train.loss import SuffixLoss
from tests.families import family_of
from tests.numerics import FP32_EPS, assert_close_to_scale

# Rounding bounds from the size of what is compared. Fusing changes one product-plus-sum per adapted
# layer from three roundings to one, so fp32 results move by a few ulps per layer; through the
# decoder, its backward and the 257,216-wide head that stays far inside the vocabulary-sum bound.
FP32_REL = 16 * (257_216**0.5) * FP32_EPS  # ~9.7e-4 of the largest element
BF16_REL = 0.05  # bf16 keeps 8 bits (eps 7.8e-3): one rounding more or less in a layer is ~1 %


def _recipe(preset: str, dtype: str, **lora):
    return parse_recipe(
        {
            "output_dir": "unused",
            "model": {"name_or_path": preset, "dtype": dtype},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0, **lora},
            "data": {"train": [{"format": "shapes"}], "max_text_length": 24},
            "train": {"batch_size": 2},
        }
    )


def _model(recipe, family, *, pg_tune_layers: bool, monkeypatch, base=None):
    """A LoRA model of the recipe; ``pg_tune_layers=False`` leaves peft's layers as peft makes them."""
    if not pg_tune_layers:
        monkeypatch.setattr(adapters, "keep_lora_inputs_in_model_dtype", lambda model: 0)
        monkeypatch.setattr(adapters, "fuse_lora_layers", lambda model: 0)
    if base is None:
        base = family.tiny_module.build_base(recipe.model.name_or_path).to(getattr(torch, recipe.model.dtype))
    torch.manual_seed(0)  # the same LoRA A on both sides
    model = adapters.prepare_model(base, recipe, family).train()
    monkeypatch.undo()
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B = 0 at init would leave A's gradient at zero
            torch.nn.init.normal_(param, std=0.1)
    return model


def _step(model, recipe, family, autocast: bool = False, seed: int = 0):
    """Loss, LoRA gradients and the bytes autograd saved (parameters excluded) for one batch."""
    from tests.measure.test_plan import _longest_batch

    batch = _longest_batch(recipe, family, model)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in params:
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    torch.manual_seed(seed)  # the same dropout masks on both sides
    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast),
    ):
        total, count = SuffixLoss(model, family)(batch)
    (total / count).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return float(total / count), grads, sum(saved.values())


def _both(preset, dtype, monkeypatch, autocast=False, **lora):
    recipe = _recipe(preset, dtype, **lora)
    family = family_of(recipe)
    ours = _model(recipe, family, pg_tune_layers=True, monkeypatch=monkeypatch)
    peft_own = _model(recipe, family, pg_tune_layers=False, monkeypatch=monkeypatch)
    return ours, peft_own, _step(ours, recipe, family, autocast), _step(peft_own, recipe, family, autocast)


def _assert_same_training(ours, peft_own, rel):
    loss, grads, _ = ours
    peft_loss, peft_grads, _ = peft_own
    assert loss == pytest.approx(peft_loss, rel=rel)
    assert grads.keys() == peft_grads.keys()
    for name, grad in grads.items():
        assert grad.dtype == torch.float32, name  # the optimizer updates fp32 adapters
        assert_close_to_scale(grad, peft_grads[name], rel, msg=name)


@pytest.mark.parametrize("preset", ["tiny-paligemma2", "tiny-gemma3", "tiny-smolvlm2"])
def test_fused_layers_train_as_peft_does_on_an_fp32_base(preset, monkeypatch):
    ours, peft_own, step, peft_step = _both(preset, "float32", monkeypatch)
    fused = [m for m in ours.modules() if isinstance(m, FusedLoraForward)]
    lora_layers = [m for m in peft_own.modules() if hasattr(m, "lora_A")]
    assert fused and len(fused) == len(lora_layers)
    _assert_same_training(step, peft_step, FP32_REL)
    # The lora_A output replaces lora_B's input, nothing else: no more bytes saved than peft.
    assert step[2] <= peft_step[2], (step[2], peft_step[2])


@pytest.mark.parametrize("preset", ["tiny-paligemma2", "tiny-smolvlm2"])
def test_on_a_bf16_base_the_input_is_saved_once_in_bf16(preset, monkeypatch):
    """peft casts a bf16 input to the fp32 adapter's dtype in every adapted module and saves that
    copy; pg_tune casts inside the product and saves the input itself."""
    _, _, step, peft_step = _both(preset, "bfloat16", monkeypatch)
    _assert_same_training(step, peft_step, BF16_REL)
    assert step[2] < 0.8 * peft_step[2], (step[2], peft_step[2])


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_under_autocast_the_adapter_runs_in_autocast_dtype(dtype, monkeypatch):
    """Under bf16 autocast the product runs in bf16 as peft's ``nn.Linear`` does there; fp32 grads."""
    _, _, step, peft_step = _both("tiny-paligemma2", dtype, monkeypatch, autocast=True)
    _assert_same_training(step, peft_step, BF16_REL)


def test_dropout_draws_the_same_masks_as_peft(monkeypatch):
    _, _, step, peft_step = _both("tiny-paligemma2", "float32", monkeypatch, dropout=0.3)
    _assert_same_training(step, peft_step, FP32_REL)


def test_dora_keeps_peft_s_own_path_bit_for_bit(monkeypatch):
    """A variant (DoRA) is not fused: the layer falls back to peft's forward, unchanged."""
    _, _, step, peft_step = _both("tiny-paligemma2", "float32", monkeypatch, use_dora=True)
    assert step[0] == peft_step[0]
    for name, grad in step[1].items():
        assert torch.equal(grad, peft_step[1][name]), name


def test_merged_disabled_and_generating_layers_agree_with_the_fused_forward(monkeypatch):
    recipe = _recipe("tiny-paligemma2", "float32")
    family = family_of(recipe)
    model = _model(recipe, family, pg_tune_layers=True, monkeypatch=monkeypatch).eval()
    layer = next(m for m in model.modules() if isinstance(m, FusedLoraForward))
    x = torch.randn(2, 5, layer.in_features)
    with torch.no_grad():
        fused = layer(x)
        base = layer.base_layer(x)
        with model.disable_adapter():
            assert torch.equal(layer(x), base)
        layer.merge()
        merged = layer(x)
        layer.unmerge()
        peft_path = super(FusedLoraForward, layer).forward(x)
    assert not torch.equal(fused, base)  # the adapter does something
    assert_close_to_scale(fused, peft_path, FP32_REL)
    assert_close_to_scale(merged, peft_path, FP32_REL)


def test_qlora_layers_train_as_peft_does(tiny_checkpoint, monkeypatch):
    """On a bitsandbytes 4-bit base (quantized on the CPU) the fused layer adds out of place."""
    pytest.importorskip("bitsandbytes")
    recipe = parse_recipe(
        {
            "output_dir": "unused",
            "model": {"name_or_path": str(tiny_checkpoint), "dtype": "float32"},
            "quantization": {"mode": "4bit", "bnb_4bit_compute_dtype": "float32"},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "data": {"train": [{"format": "shapes"}], "max_text_length": 24},
            "train": {"batch_size": 2},
        }
    )
    family = family_of(recipe)

    def model(pg_tune_layers):
        base = family.load_model(recipe.model, recipe.quantization)
        return _model(recipe, family, pg_tune_layers=pg_tune_layers, monkeypatch=monkeypatch, base=base)

    ours, peft_own = model(True), model(False)
    assert any(type(m).__name__ == "FusedLinear4bit" for m in ours.modules())
    _assert_same_training(_step(ours, recipe, family), _step(peft_own, recipe, family), FP32_REL)


def test_saved_adapters_are_plain_peft_adapters(tmp_path, monkeypatch):
    """The class swap changes no key: the adapter loads into plain peft and gives the same output."""
    import peft
    from safetensors.torch import load_file

    recipe = _recipe("tiny-paligemma2", "float32")
    family = family_of(recipe)
    model = _model(recipe, family, pg_tune_layers=True, monkeypatch=monkeypatch).eval()
    model.save_pretrained(tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert keys and all(".lora_A.weight" in k or ".lora_B.weight" in k for k in keys)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "LORA"

    torch.manual_seed(0)
    plain = peft.PeftModel.from_pretrained(family.tiny_module.build_base(recipe.model.name_or_path), tmp_path)
    assert not any(isinstance(m, FusedLoraForward) for m in plain.modules())
    ids = torch.tensor([[2, 5, 9, 11, 40]])
    with torch.no_grad():
        ours = family.unwrap(model).model.language_model(input_ids=ids).last_hidden_state
        theirs = family.unwrap(plain).model.language_model(input_ids=ids).last_hidden_state
    assert_close_to_scale(ours, theirs, FP32_REL)
