"""Whether this CPU multiplies bf16 (and fp16) at speed, and what to tell a CPU run that asks for it.

torch's CPU matmuls in bf16 go through oneDNN, which has fast kernels only where the CPU has
AVX-512 (BW, VL and DQ; native ``avx512_bf16`` / AMX are faster still) or Arm's BF16 extension;
elsewhere a scalar fallback runs. Measured on an AVX2-only x86 host (AMD EPYC, one thread, torch
2.13): a 1024² matmul ran at 0.9 GFLOP/s in bf16 against 79 in fp32, an ``nn.Linear`` of a
SmolVLM2 MLP at 9.7 against 71, and ``bench-mini`` trained 36-40x slower in bf16 than in fp32
(docs/performance.md, "CPUs without fast bf16"). There a recipe that sets ``model.dtype:
bfloat16``, ``train.mixed_precision: bf16`` or QLoRA's ``bnb_4bit_compute_dtype: bfloat16`` trains
on the CPU many times slower than in fp32, which ``auto`` picks there (for QLoRA's compute dtype:
``pg_tune.models.quantize.resolve_compute_dtype``). ``pg-tune plan`` and ``pg-tune train`` say so
instead of leaving the user to find out from the progress bar.
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pg_tune.config.recipe import Recipe


_HALF = {"bfloat16": "bf16", "bf16": "bf16", "float16": "fp16", "fp16": "fp16"}
"""Recipe values of a 16-bit type, by the oneDNN check that says whether it is fast here."""


@cache
def fast_on_cpu(kind: str) -> bool:
    """Whether this CPU has oneDNN's fast ``kind`` ("bf16" or "fp16") kernels: torch's own check,
    with the CPU's capability as the fallback where that private check is missing."""
    import torch

    check = getattr(torch.ops.mkldnn, f"_is_mkldnn_{kind}_supported", None)
    if check is not None and torch.backends.mkldnn.is_available():
        try:
            return bool(check())
        except RuntimeError:
            pass
    return torch.backends.cpu.get_cpu_capability() not in ("DEFAULT", "AVX2", "NO AVX")


def slow_dtype_note(uses: dict[str, str]) -> str | None:
    """A sentence for a CPU run where ``uses`` (recipe key -> its dtype value) asks for a 16-bit
    type this CPU has no fast kernels for; None where nothing is wrong."""
    import torch

    slow = {key: value for key, value in uses.items() if value in _HALF and not fast_on_cpu(_HALF[value])}
    if not slow:
        return None
    keys = ", ".join(f"{key}={value}" for key, value in slow.items())
    return (
        f"this CPU ({torch.backends.cpu.get_cpu_capability()}) has no fast 16-bit matmul kernels "
        f"(oneDNN's need AVX-512 or Arm BF16 for bf16, AVX-512-FP16 or AMX for fp16), so {keys} runs "
        "torch's slow fallback, many times slower "
        "than float32 (docs/performance.md 'CPUs without fast bf16'); float32 is what auto picks on a CPU"
    )


def recipe_note(recipe: Recipe) -> str | None:
    """``slow_dtype_note`` for the 16-bit settings a recipe asks for on a CPU run."""
    uses = {"model.dtype": recipe.model.dtype, "train.mixed_precision": recipe.train.mixed_precision}
    if recipe.quantization.mode == "4bit":
        uses["quantization.bnb_4bit_compute_dtype"] = recipe.quantization.bnb_4bit_compute_dtype
    return slow_dtype_note(uses)
