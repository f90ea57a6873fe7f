"""Preparing the base for training: k-bit preparation, checkpointing, then the recipe's method —
LoRA adapters with peft (``lora`` section, DoRA / rsLoRA switches included), or ``full`` /
``partial`` fine-tuning of base weights (``pg_tune.train.methods``)."""

from __future__ import annotations

import peft
import torch
from torch import nn

from pg_tune.config.recipe import LoraConfig, Recipe
from pg_tune.models.family import ModelFamily
from pg_tune.train.lora_fused import fuse_lora_layers, lora_compute_dtype


def apply_lora(model: nn.Module, lora: LoraConfig, base_name: str, family: ModelFamily) -> peft.PeftModel:
    """Freeze the base and add LoRA adapters on the recipe's target preset (the family's module names)."""
    config = peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=family.lora_target_regex(lora),
        modules_to_save=list(lora.modules_to_save) or None,
        bias="none",
        task_type="CAUSAL_LM",
        use_dora=lora.use_dora,
        use_rslora=lora.use_rslora,
    )
    # autocast_adapter_dtype (peft's default) keeps the trainable LoRA weights in fp32 even on a
    # bf16 or 4-bit base, so the optimizer never updates low-precision copies.
    peft_model = peft.get_peft_model(model, config, autocast_adapter_dtype=True)
    keep_lora_inputs_in_model_dtype(peft_model)
    fuse_lora_layers(peft_model)  # one autograd node per adapted layer (pg_tune.train.lora_fused)
    # Recorded in adapter_config.json so `PeftModel.from_pretrained` users know the base.
    peft_model.peft_config["default"].base_model_name_or_path = base_name
    return peft_model


class _UpcastLinear(torch.autograd.Function):
    """``x.to(w.dtype) @ w.T`` that keeps ``x`` itself for backward, not its upcast copy.

    peft casts a bf16 (or 4-bit-computed) input to the fp32 LoRA weight's dtype in every adapted
    module, and ``lora_A`` then saves that fp32 copy: seven copies a decoder layer (q, k, v read the
    same input, so do gate and up), twice the input's bytes each. Here the cast happens inside the
    product and only the original input is saved, shared with whatever else keeps it; backward
    upcasts it again for the weight gradient. Forward and gradients are the same computation.

    Under autocast the product runs in autocast's dtype, as ``nn.Linear`` would there (the fp32
    weight cast down, the weight gradient computed in that dtype and returned in fp32): no detour
    of the bf16 input through fp32 and back.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        dtype = lora_compute_dtype(x, weight)
        ctx.compute_dtype = dtype
        ctx.save_for_backward(x, weight)
        with torch.autocast(x.device.type, enabled=False):
            return torch.nn.functional.linear(x.to(dtype), weight.to(dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        dtype = ctx.compute_dtype
        grad = grad.to(dtype)
        grad_x = (grad @ weight.to(dtype)).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = grad.reshape(-1, grad.shape[-1]).T @ x.reshape(-1, x.shape[-1]).to(dtype)
            grad_w = grad_w.to(weight.dtype)
        return grad_x, grad_w


class UpcastLoraA(nn.Linear):
    """peft's ``lora_A`` linear, upcasting its input inside the product (``_UpcastLinear``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _UpcastLinear.apply(x, self.weight)


def keep_lora_inputs_in_model_dtype(peft_model: nn.Module) -> int:
    """Make every plain LoRA layer save its input in the model's dtype (``_UpcastLinear``) instead of
    an fp32 copy per module; DoRA layers keep peft's path. Returns the layers changed.

    On a bf16 or 4-bit base this removes the largest part of a decoder layer's saved activations
    (``pg-tune plan`` counts it; docs/performance.md, "Real shapes"); on an fp32 base nothing is cast."""
    from peft.tuners.lora import LoraLayer

    changed = 0
    for module in peft_model.modules():
        if not isinstance(module, LoraLayer) or module.lora_variant:
            continue
        for lora_a in module.lora_A.values():
            if type(lora_a) is nn.Linear and lora_a.bias is None:
                lora_a.__class__ = UpcastLoraA  # same parameters and state dict, another forward
        if all(isinstance(a, UpcastLoraA) for a in module.lora_A.values()):
            module.cast_input_dtype_enabled = False
            changed += 1
    return changed


def trainable_summary(model: nn.Module) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)"


def is_quantized(model: nn.Module) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def prepare_for_kbit_training(model: nn.Module) -> None:
    """Freeze every base weight of a bitsandbytes-loaded model.

    peft's ``prepare_model_for_kbit_training`` also casts every non-4-bit weight to fp32: on
    PaliGemma that is the 257,216-row embedding table and the SigLIP tower, several GB for no
    gain (they are frozen, their values are bf16 already, and the norms compute in fp32 anyway;
    see pg_tune/models/quantize.py). So pg_tune freezes only, and enables checkpointing itself.
    """
    for param in model.parameters():
        param.requires_grad_(False)


def enable_checkpointing(model: nn.Module) -> None:
    """Non-reentrant gradient checkpointing, with the embeddings' output requiring grad.

    The reentrant form is slower, and with a frozen base it trains nothing unless the inputs of
    each checkpointed block require grad; ``enable_input_require_grads`` guarantees that for either.
    """
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()


def apply_method(model: nn.Module, recipe: Recipe, family: ModelFamily) -> nn.Module:
    """The recipe's ``method``: a peft model with adapters (``lora``), or ``model`` itself with the
    chosen base weights unfrozen (``full`` / ``partial``). Warns when it cannot fit in memory."""
    from pg_tune.train.methods import method_groups, unfreeze_groups, warn_if_too_large

    if recipe.method == "lora":
        model = apply_lora(model, recipe.lora, recipe.model.name_or_path, family)
    else:
        model = unfreeze_groups(model, method_groups(recipe), family)
    warn_if_too_large(model, recipe)
    return model


def compile_decoder(model: nn.Module, family: ModelFamily) -> int:
    """``torch.compile`` each decoder layer in place (``train.compile``), adapters inside; dynamic
    shapes, since batches vary in length. Returns the layers compiled."""
    layers = family.decoder_layers(family.unwrap(model))
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def prepare_model(model: nn.Module, recipe: Recipe, family: ModelFamily) -> nn.Module:
    """Everything between loading the base and training it: k-bit prep, checkpointing, the method,
    and ``train.compile``."""
    if is_quantized(model):
        prepare_for_kbit_training(model)
    if recipe.train.gradient_checkpointing:
        enable_checkpointing(model)
    model = apply_method(model, recipe, family)
    if recipe.train.compile:
        compile_decoder(model, family)
    return model
