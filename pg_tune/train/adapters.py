"""Attaching LoRA adapters with peft, from a recipe's ``lora`` section."""

from __future__ import annotations

import peft
from torch import nn

from pg_tune.config.recipe import LoraConfig, Recipe
from pg_tune.models.paligemma import lora_target_regex


def apply_lora(model: nn.Module, lora: LoraConfig, base_name: str) -> peft.PeftModel:
    """Freeze the base and add LoRA adapters on the recipe's target preset."""
    config = peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora_target_regex(lora),
        modules_to_save=list(lora.modules_to_save) or None,
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = peft.get_peft_model(model, config)
    # Recorded in adapter_config.json so `PeftModel.from_pretrained` users know the base.
    peft_model.peft_config["default"].base_model_name_or_path = base_name
    return peft_model


def trainable_summary(model: nn.Module) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)"


def prepare_model(model: nn.Module, recipe: Recipe) -> peft.PeftModel:
    """Everything between loading the base and training it: checkpointing, then adapters."""
    if recipe.train.gradient_checkpointing:
        # Non-reentrant: the reentrant form is slower and, with a frozen base, trains nothing
        # unless the inputs require grad.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return apply_lora(model, recipe.lora, recipe.model.name_or_path)
