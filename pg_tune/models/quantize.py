"""QLoRA loading: the recipe's ``quantization`` section as a bitsandbytes config, and a check of it.

Which modules are quantized (and why the others are not):

- the language model's decoder linears (attention + MLP): quantized. They are most of the
  parameters (2B/9B/27B), and LoRA adapters sit on them.
- the head (PaliGemma: ``lm_head``, tied to the 257,216-row embedding table), the projector
  (``model.multi_modal_projector``) and the image encoder (SigLIP ``model.vision_tower``): kept in the model dtype (bf16 on a GPU, fp32 on CPU), never
  quantized. The head and embeddings are tied, so quantizing one breaks the tie; the projector is a
  single small layer between two models; the vision tower is ~400M parameters (an eighth of the
  3B model) and quantizing it degrades image features for every task, for a small saving. Set
  ``quantization.quantize_vision_tower: true`` to quantize it anyway (e.g. 28B on a small card).
- Norms and embeddings are not ``nn.Linear`` and are never quantized. Gemma's RMSNorm already
  computes in fp32 internally and SigLIP's LayerNorm runs in fp32 under autocast, so pg_tune does
  not upcast their frozen (bf16-valued) weights to fp32: that would cost memory and gain nothing.

transformers matches ``llm_int8_skip_modules`` entries from the *start* of a module name (or as a
suffix), so the entries must be full paths (``model.vision_tower``): a bare ``vision_tower`` is
silently ignored. ``check_quantized`` verifies after loading what is really in effect. The paths
come from the model family (``ModelFamily.modules`` / ``keep_unquantized``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import BitsAndBytesConfig

from pg_tune.config.recipe import QuantizationConfig

if TYPE_CHECKING:
    from pg_tune.models.family import ModelFamily

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def skip_modules(quantization: QuantizationConfig, family: ModelFamily) -> list[str]:
    """Module paths bitsandbytes must leave unquantized (full paths from the model's root)."""
    return family.keep_unquantized(quantize_vision=quantization.quantize_vision_tower)


def resolve_compute_dtype(quantization: QuantizationConfig) -> torch.dtype:
    """``bnb_4bit_compute_dtype`` as loading applies it: ``auto`` is bfloat16 where training runs on a
    GPU or a CPU with fast bf16 kernels, float32 on a CPU without them (``pg_tune.models.cpu_dtype``)."""
    from pg_tune.models import cpu_dtype

    name = quantization.bnb_4bit_compute_dtype
    if name == "auto":
        name = "bfloat16" if torch.cuda.is_available() or cpu_dtype.fast_on_cpu("bf16") else "float32"
    return _DTYPES[name]


def bnb_config(quantization: QuantizationConfig, family: ModelFamily) -> BitsAndBytesConfig:
    """The ``BitsAndBytesConfig`` for ``from_pretrained`` from a recipe's ``quantization`` section."""
    if quantization.mode == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quantization.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=quantization.bnb_4bit_use_double_quant,
            bnb_4bit_compute_dtype=resolve_compute_dtype(quantization),
            llm_int8_skip_modules=skip_modules(quantization, family),
        )
    if quantization.mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules(quantization, family))
    raise ValueError(f"quantization.mode={quantization.mode!r}: nothing to configure for bitsandbytes")


@dataclass
class QuantizationReport:
    """What loading really produced: counts per kind and the dtypes in effect."""

    quantized: list[str]
    kept: list[str]
    compute_dtype: torch.dtype | None
    quant_type: str | None

    def summary(self) -> str:
        what = f"{len(self.quantized)} linear layers quantized"
        if self.quant_type:
            what += f" ({self.quant_type}, compute dtype {self.compute_dtype})"
        return what + f"; kept in model dtype: {', '.join(self.kept) or 'none'}"


def check_quantized(
    model: nn.Module, quantization: QuantizationConfig, family: ModelFamily
) -> QuantizationReport:
    """Assert the loaded model is quantized as the recipe says; raise naming the recipe key if not.

    bitsandbytes and transformers ignore what they do not understand (a misspelt key, a skip entry
    that matches nothing), so this looks at the modules themselves.
    """
    import bitsandbytes as bnb

    quantized_cls = bnb.nn.Linear4bit if quantization.mode == "4bit" else bnb.nn.Linear8bitLt
    quantized, compute_dtypes, quant_types = [], set(), set()
    for name, module in model.named_modules():
        if isinstance(module, quantized_cls):
            quantized.append(name)
            if quantization.mode == "4bit":
                compute_dtypes.add(module.compute_dtype)
                quant_types.add(module.weight.quant_type)
                if bool(module.weight.compress_statistics) != quantization.bnb_4bit_use_double_quant:
                    raise RuntimeError(
                        f"quantization.bnb_4bit_use_double_quant={quantization.bnb_4bit_use_double_quant} "
                        f"but {name} has compress_statistics={module.weight.compress_statistics}"
                    )
    language_model = family.modules.language_model
    if not any(n.startswith(language_model + ".") or f".{language_model}." in n for n in quantized):
        raise RuntimeError(
            f"quantization.mode={quantization.mode!r} but no language-model layer is quantized"
        )
    expected_kept = skip_modules(quantization, family)
    for prefix in expected_kept:
        wrong = [n for n in quantized if n == prefix or n.startswith(prefix + ".")]
        if wrong:
            raise RuntimeError(f"{prefix} should stay unquantized but {wrong[0]} is {quantized_cls.__name__}")
    vision = family.modules.vision
    if quantization.quantize_vision_tower and not any(n.startswith(vision + ".") for n in quantized):
        raise RuntimeError("quantization.quantize_vision_tower=true but no vision-tower layer is quantized")
    compute_dtype = quant_type = None
    if quantization.mode == "4bit":
        want_dtype = resolve_compute_dtype(quantization)
        if compute_dtypes != {want_dtype}:
            raise RuntimeError(
                f"quantization.bnb_4bit_compute_dtype={quantization.bnb_4bit_compute_dtype} but the loaded "
                f"layers compute in {sorted(map(str, compute_dtypes))}"
            )
        if quant_types != {quantization.bnb_4bit_quant_type}:
            raise RuntimeError(
                f"quantization.bnb_4bit_quant_type={quantization.bnb_4bit_quant_type} but the loaded layers use "
                f"{sorted(quant_types)}"
            )
        compute_dtype, quant_type = want_dtype, quantization.bnb_4bit_quant_type
    return QuantizationReport(quantized, expected_kept, compute_dtype, quant_type)
