"""Everything specific to the PaliGemma family: loading, dtypes, LoRA target presets.

PaliGemma 1 (Gemma) and PaliGemma 2 (Gemma 2) share one class in transformers,
``PaliGemmaForConditionalGeneration``, and one processor, so one module serves both.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PaliGemmaForConditionalGeneration, PaliGemmaProcessor

from pg_tune.config.recipe import LoraConfig, ModelConfig, QuantizationConfig
from pg_tune.model_source import require_safetensors
from pg_tune.models import tiny

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}

# Module-name patterns (peft's regex form) of each target preset.
_LM = r"model\.language_model\.layers\.\d+"
_VISION = r"model\.vision_tower\.(vision_model\.)?encoder\.layers\.\d+"
_TARGETS = {
    "attention": (r"self_attn\.(q_proj|k_proj|v_proj|o_proj)", r"self_attn\.(q_proj|k_proj|v_proj|out_proj)"),
    "attention_mlp": (
        r"(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))",
        r"(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))",
    ),
}
_TARGETS["all_linear"] = _TARGETS["attention_mlp"]


def resolve_dtype(name: str) -> torch.dtype:
    """``auto`` is bfloat16 on a GPU that supports it and float32 elsewhere (never float16)."""
    if name != "auto":
        return _DTYPES[name]
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def lora_target_regex(lora: LoraConfig) -> str:
    """The peft ``target_modules`` regex for a recipe's ``lora.targets`` and ``lora.vision``."""
    lm, vision = _TARGETS[lora.targets]
    parts = [rf".*{_LM}\.{lm}"]
    if lora.vision:
        parts.append(rf".*{_VISION}\.{vision}")
    if lora.targets == "all_linear":
        parts.append(r".*model\.multi_modal_projector\.linear")
    return "^(" + "|".join(parts) + ")$"


def is_tiny(name_or_path: str) -> bool:
    return name_or_path in tiny.PRESETS and not Path(name_or_path).exists()


def load_processor(model_config: ModelConfig) -> PaliGemmaProcessor:
    if is_tiny(model_config.name_or_path):
        return tiny.build_processor(tiny.PRESETS[model_config.name_or_path])
    return PaliGemmaProcessor.from_pretrained(
        model_config.name_or_path,
        revision=model_config.revision,
        trust_remote_code=model_config.trust_remote_code,
    )


def load_model(
    model_config: ModelConfig,
    quantization: QuantizationConfig | None = None,
    device_map: str | dict | None = None,
) -> PaliGemmaForConditionalGeneration:
    """Load a PT checkpoint (hub id or local dir) or build a tiny preset, in the recipe's dtype."""
    dtype = resolve_dtype(model_config.dtype)
    require_safetensors(model_config.name_or_path)
    if is_tiny(model_config.name_or_path):
        if quantization is not None and quantization.mode != "none":
            raise ValueError(
                "quantization needs a checkpoint on disk: save the tiny preset first "
                "(python -m pg_tune.models.tiny DIR) and point model.name_or_path at it"
            )
        return tiny.build_base(model_config.name_or_path).to(dtype)
    kwargs = {}
    if quantization is not None and quantization.mode != "none":
        from pg_tune.models.quantize import bnb_config

        kwargs["quantization_config"] = bnb_config(quantization)
    if model_config.attn_implementation:
        kwargs["attn_implementation"] = model_config.attn_implementation
    model = PaliGemmaForConditionalGeneration.from_pretrained(
        model_config.name_or_path,
        revision=model_config.revision,
        dtype=dtype,
        trust_remote_code=model_config.trust_remote_code,
        use_safetensors=True,
        device_map=device_map,
        **kwargs,
    )
    if quantization is not None and quantization.mode != "none":
        from pg_tune.models.quantize import check_quantized

        # bitsandbytes ignores what it does not understand: assert what is really in effect.
        print(f"quantization: {check_quantized(model, quantization).summary()}")
    return model


def base_model_of(model: torch.nn.Module) -> PaliGemmaForConditionalGeneration:
    """The ``PaliGemmaForConditionalGeneration`` inside peft / DDP / loss wrappers."""
    import peft

    seen = model
    for _ in range(8):
        if isinstance(seen, PaliGemmaForConditionalGeneration):
            return seen
        if isinstance(seen, peft.PeftModel):
            seen = seen.get_base_model()
        elif isinstance(seen, torch.nn.parallel.DistributedDataParallel) or hasattr(
            seen, "_fsdp_wrapped_module"
        ):
            seen = seen.module
        elif isinstance(getattr(seen, "model", None), torch.nn.Module):
            seen = seen.model
        else:
            break
    raise TypeError(f"no PaliGemmaForConditionalGeneration inside {type(model).__name__}")
