"""LoRA on a bf16 base keeps its inputs in bf16 for backward (``UpcastLoraA``): the same loss and
gradients as peft's per-module fp32 copies, bit for bit, with fewer bytes saved."""

from __future__ import annotations

import pytest
import torch

import pg_tune.train.adapters as adapters
from pg_tune.config.recipe import parse_recipe
from pg_tune.train.loss import SuffixLoss
from tests.families import family_of


def _step(preset: str, dtype: str, upcast_inside: bool, monkeypatch, autocast: bool = False):
    from tests.measure.test_plan import _longest_batch

    recipe = parse_recipe(
        {
            "output_dir": "unused",
            "model": {"name_or_path": preset, "dtype": dtype},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "data": {"train": [{"format": "shapes"}], "max_text_length": 24},
            "train": {"batch_size": 2},
        }
    )
    family = family_of(recipe)
    if not upcast_inside:
        monkeypatch.setattr(adapters, "keep_lora_inputs_in_model_dtype", lambda model: 0)
    base = family.tiny_module.build_base(preset).to(getattr(torch, dtype))
    model = adapters.prepare_model(base, recipe, family).train()
    monkeypatch.undo()
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B = 0 at init would leave A's gradient at zero
            torch.nn.init.normal_(param, std=0.1)
    batch = _longest_batch(recipe, family, model)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in params:
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast),
    ):
        total, count = SuffixLoss(model, family)(batch)
    (total / count).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return float(total / count), grads, sum(saved.values()), model


@pytest.mark.parametrize("preset", ["tiny-paligemma2", "tiny-smolvlm2"])
def test_bf16_lora_inputs_are_saved_once_with_identical_gradients(preset, monkeypatch):
    loss, grads, saved, model = _step(preset, "bfloat16", True, monkeypatch)
    peft_loss, peft_grads, peft_saved, _ = _step(preset, "bfloat16", False, monkeypatch)
    assert any(isinstance(m, adapters.UpcastLoraA) for m in model.modules())
    assert loss == peft_loss
    assert grads.keys() == peft_grads.keys()
    for name, grad in grads.items():
        assert torch.equal(grad, peft_grads[name]), name
    assert saved < 0.8 * peft_saved, (saved, peft_saved)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_under_autocast_lora_runs_in_autocast_dtype_with_peft_gradients(dtype, monkeypatch):
    """Under bf16 autocast the LoRA product runs in bf16 as peft's nn.Linear does there (no detour
    of the input through fp32): the same loss and gradients, bit for bit, on a bf16 or fp32 base."""
    loss, grads, _, model = _step("tiny-paligemma2", dtype, True, monkeypatch, autocast=True)
    peft_loss, peft_grads, _, _ = _step("tiny-paligemma2", dtype, False, monkeypatch, autocast=True)
    assert any(isinstance(m, adapters.UpcastLoraA) for m in model.modules())
    assert loss == peft_loss
    for name, grad in grads.items():
        assert grad.dtype == torch.float32, name
        assert torch.equal(grad, peft_grads[name]), name


def test_fp32_bases_and_saved_adapters_are_unchanged(tmp_path, monkeypatch):
    loss, grads, saved, model = _step("tiny-paligemma2", "float32", True, monkeypatch)
    peft_loss, peft_grads, peft_saved, _ = _step("tiny-paligemma2", "float32", False, monkeypatch)
    assert loss == peft_loss and saved == peft_saved
    model.save_pretrained(tmp_path)  # a plain peft adapter: the class swap changes no key
    import json

    from safetensors.torch import load_file

    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert all(".lora_A.weight" in k or ".lora_B.weight" in k for k in keys)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "LORA"
