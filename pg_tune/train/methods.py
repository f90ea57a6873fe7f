"""Training methods besides LoRA: ``full`` and ``partial`` fine-tuning, and what each costs in memory.

A recipe's ``method`` picks what trains; everything else (loop, loss, checkpoints, resume) is the
same for all three::

    method: lora                       # adapters (section lora; DoRA / rsLoRA switches there)
    method: full                       # the language model + projector; full.vision adds SigLIP
    method: partial                    # only partial.groups, e.g. [attention] (big_vision's T4 notebook)

``full`` and ``partial`` unfreeze base weights in place (no wrapper), so the trained model is a plain
``PaliGemmaForConditionalGeneration`` and the run saves a complete model folder (``RUN/model``).

The memory estimate is deliberately simple, from parameter counts: weights + gradients + optimizer
state of the trainable weights, activations not included. It only serves a warning before a run
that cannot fit starts (``pg-tune plan``, where present, gives the detailed budget).
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from pg_tune.config.recipe import Recipe
from pg_tune.models.family import ModelFamily


class TrainingMemoryWarning(UserWarning):
    """The chosen method's weights, gradients and optimizer state alone exceed the device memory."""


def _lm_submodules(language_model: nn.Module, name: str) -> list[nn.Module]:
    """The language model's modules called ``name`` in its layers (``self_attn``, ``mlp``)."""
    return [m for n, m in language_model.named_modules() if n.rsplit(".", 1)[-1] == name]


def parameter_groups(model: nn.Module, family: ModelFamily) -> dict[str, list[nn.Parameter]]:
    """The named groups ``partial.groups`` chooses from, as parameter lists of ``model``.

    ``llm`` holds every language-model weight: embeddings (tied to the output head in PaliGemma),
    layers and final norm, plus the head when it is not tied. Where each part sits in the model
    comes from the ``family`` (``ModelFamily.modules``).
    """
    core = family.unwrap(model)
    paths = family.modules
    language_model = core.get_submodule(paths.language_model)

    def params(modules: list[nn.Module]) -> list[nn.Parameter]:
        seen: dict[int, nn.Parameter] = {}
        for module in modules:
            for p in module.parameters():
                seen.setdefault(id(p), p)
        return list(seen.values())

    return {
        "attention": params(_lm_submodules(language_model, "self_attn")),
        "mlp": params(_lm_submodules(language_model, "mlp")),
        "llm": params([language_model, core.get_submodule(paths.head)]),
        "projector": params([core.get_submodule(paths.projector)]),
        "vision": params([core.get_submodule(paths.vision)]),
    }


def method_groups(recipe: Recipe) -> list[str]:
    """The parameter groups a ``full`` or ``partial`` recipe trains."""
    if recipe.method == "full":
        return ["llm", "projector"] + (["vision"] if recipe.full.vision else [])
    if recipe.method == "partial":
        return list(recipe.partial.groups)
    raise ValueError(f"method {recipe.method!r} trains adapters, not parameter groups")


def unfreeze_groups(model: nn.Module, groups: list[str], family: ModelFamily) -> nn.Module:
    """Freeze everything, then let the named groups train (in place); returns ``model``."""
    available = parameter_groups(model, family)
    unknown = sorted(set(groups) - set(available))
    if unknown:
        raise ValueError(f"unknown parameter groups {unknown} (known: {', '.join(available)})")
    for p in model.parameters():
        p.requires_grad_(False)
    for group in groups:
        if not available[group]:
            raise ValueError(f"parameter group {group!r} is empty in {type(model).__name__}")
        for p in available[group]:
            p.requires_grad_(True)
    return model


# --- memory -----------------------------------------------------------------------------------------

_OPTIMIZER_STATE_BYTES = {"adamw": None, "adamw_8bit": 2, "paged_adamw_8bit": 2}
"""Bytes of optimizer state per trainable weight; None: two moments in the weight's own dtype
(torch AdamW keeps ``exp_avg`` and ``exp_avg_sq`` as ``zeros_like(param)``)."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a training run holds before any activation: weights, gradients, optimizer state."""

    trainable_params: int
    total_params: int
    weight_bytes: int
    grad_bytes: int
    optimizer_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.grad_bytes + self.optimizer_bytes

    def describe(self) -> str:
        gb = 1e9
        return (
            f"{self.total_bytes / gb:.2f} GB = weights {self.weight_bytes / gb:.2f} + gradients "
            f"{self.grad_bytes / gb:.2f} + optimizer state {self.optimizer_bytes / gb:.2f} "
            f"({self.trainable_params:,} of {self.total_params:,} parameters train; activations not included)"
        )


def _param_bytes(p: torch.Tensor) -> int:
    # bitsandbytes 4-bit weights are packed uint8 tensors: numel already counts the stored bytes.
    return p.numel() * p.element_size()


def estimate_memory(model: nn.Module, optimizer: str = "adamw") -> MemoryEstimate:
    """Weights + gradients + optimizer state of ``model`` as it will train (shared weights once)."""
    params = list(model.parameters())  # deduplicated: a tied embedding / head counts once
    trainable = [p for p in params if p.requires_grad]
    per_state = _OPTIMIZER_STATE_BYTES.get(optimizer)
    return MemoryEstimate(
        trainable_params=sum(p.numel() for p in trainable),
        total_params=sum(p.numel() for p in params),
        weight_bytes=sum(_param_bytes(p) for p in params),
        grad_bytes=sum(_param_bytes(p) for p in trainable),
        optimizer_bytes=sum(
            2 * _param_bytes(p) if per_state is None else per_state * p.numel() for p in trainable
        ),
    )


def device_memory_bytes() -> tuple[int, str]:
    """Memory of the device training will use: the current GPU, else the machine's RAM."""
    if torch.cuda.is_available():
        index = torch.cuda.current_device()
        return torch.cuda.get_device_properties(index).total_memory, f"cuda:{index}"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "cpu RAM"


def memory_warning(model: nn.Module, recipe: Recipe, capacity: tuple[int, str] | None = None) -> str | None:
    """A warning text when the method's weights + gradients + optimizer state exceed 90% of the device."""
    estimate = estimate_memory(model, recipe.train.optimizer)
    available, where = capacity or device_memory_bytes()
    if estimate.total_bytes <= 0.9 * available:
        return None
    hints = {
        "full": "method: partial (e.g. partial.groups=[attention]) or lora",
        "partial": "fewer partial.groups, or method: lora",
        "lora": "quantization.mode=4bit (QLoRA) or a smaller lora.r",
    }[recipe.method]
    plan = (
        " `pg-tune plan RECIPE` gives the detailed budget."
        if importlib.util.find_spec("pg_tune.measure.plan")
        else ""
    )
    return (
        f"method {recipe.method!r} needs about {estimate.describe()}, more than the {available / 1e9:.1f} GB "
        f"of {where}. It will likely run out of memory: try {hints}, train.optimizer=adamw_8bit, "
        "or shard the states (recipes/accelerate/deepspeed_zero2.yaml / fsdp.yaml; this estimate is "
        f"before sharding).{plan}"
    )


def warn_if_too_large(model: nn.Module, recipe: Recipe) -> None:
    message = memory_warning(model, recipe)
    if message:
        warnings.warn(message, TrainingMemoryWarning, stacklevel=2)
