"""``pg-tune plan RECIPE [--memory 24GiB]``: the peak memory of a training run, before anything loads.

Reads the model's ``config.json`` only (a local folder, the hub cache, a tiny preset, or, when the
hub is unreachable, pg_tune's copy of a published config in ``pg_tune.models.paligemma.shapes``) and builds
the model on the meta device to count parameters exactly. Then, per micro-batch:

====================  =====================================================================
part                  how it is counted
====================  =====================================================================
base weights          exact: parameters × bytes of their dtype; 4-bit NF4 0.5 B + block
                      absmax (64-blocks; 8-bit absmax with double quantisation), by module
LoRA weights          exact: r × (in + out) per adapted linear, fp32 (peft's adapter dtype)
gradients             exact: one fp32 value per trainable parameter
optimizer states      exact: AdamW 2 × fp32 per trainable parameter (8-bit: 2 × 1 B)
activations           estimate: the tensors autograd saves in each decoder layer (below), at
                      the longest sequence (image tokens + ``data.max_text_length``)
loss head chunk       estimate: pg_tune's fused head, one chunk of supervised rows × vocabulary
runtime (CPU)         measured in this process: Python, torch, transformers, peft imports
mapped pages (CPU)    estimate: QLoRA from a checkpoint stored in the model dtype: the files stay
                      memory-mapped (the unquantized weights are views into them) and the pages
                      read while quantizing still count in RSS
====================  =====================================================================

Saved activations per decoder layer and token (frozen base, LoRA, no dropout), from what autograd
keeps in transformers' Gemma / Gemma 2 layers under peft, checked against
``torch.autograd.graph.saved_tensors_hooks`` in ``tests/test_plan.py``:

- each adapted linear's input cast to fp32 for the LoRA branch (shared between the modules that
  read the same input when the base is fp32 already), and its rank-r ``A x`` (fp32);
- each RMSNorm's fp32 input and 1/rms (2 norms a layer in Gemma, 4 in Gemma 2);
- the MLP's gate, GELU and up outputs (3 × intermediate, model dtype);
- attention: eager (Gemma 2) keeps q and the head-expanded k, v plus the scores, softmax and its
  cast (8 B × heads × T² per layer); SDPA (Gemma) keeps q, k, v, out and the log-sum-exp.

With ``train.gradient_checkpointing`` only each layer's input is kept, plus one layer's worth while
it is recomputed. A frozen vision tower runs without autograd (``pg_tune.train.loss``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pg_tune.config.recipe import Recipe
from pg_tune.models.family import ModelFamily

GiB = 2**30
NF4_BLOCK = 64
"""bitsandbytes' 4-bit block size: one absmax per 64 weights."""
NF4_NESTED_BLOCK = 256
"""Double quantisation: the absmaxes are 8-bit, with one fp32 scale per 256 of them."""


@dataclass
class Part:
    name: str
    bytes: float
    kind: str  # "exact", "estimate" or "measured"
    how: str


@dataclass
class MemoryPlan:
    """Expected peak memory of one training process, split by part."""

    model: str
    device: str
    batch_size: int
    sequence: int
    parts: list[Part]
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> float:
        return sum(p.bytes for p in self.parts)

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "device": self.device,
            "batch_size": self.batch_size,
            "sequence": self.sequence,
            "parts": {p.name: p.bytes / 1e9 for p in self.parts},
            "total_gb": self.peak / 1e9,
        }


def parse_memory(text: str) -> int:
    """``24GiB``, ``24GB``, ``80G``, ``512MiB`` -> bytes."""
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"--memory {text!r}: expected a size such as 24GiB or 80GB")
    number, unit, binary = float(match.group(1)), match.group(2).upper(), bool(match.group(3))
    power = " KMGT".index(unit) if unit else 0
    return int(number * (1024 if binary else 1000) ** power)


def load_config(recipe: Recipe, family: ModelFamily):
    """The model config the recipe names, without loading weights; says where it came from."""
    from transformers import AutoConfig

    name = recipe.model.name_or_path
    if family.is_tiny(name):
        tiny = family.tiny_module
        return tiny.build_config(tiny.PRESETS[name]), f"tiny preset {name}"
    published = family.published_config(name)
    try:
        # The hub cache (or a local folder) first; online only for a model pg_tune has no copy of.
        return AutoConfig.from_pretrained(
            name, revision=recipe.model.revision, local_files_only=published is not None
        ), f"{name} config.json"
    except OSError as e:
        if published is None:
            raise ValueError(f"model.name_or_path={name!r}: no config.json reachable ({e})") from None
        return published, f"pg_tune's copy of {name}'s published config (not in the hub cache)"


_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def _dtype_for(recipe: Recipe, device: str) -> torch.dtype:
    """The recipe's dtype; ``auto`` as training resolves it on ``device`` (bf16 on CUDA, fp32 on CPU)."""
    if recipe.model.dtype != "auto":
        return _DTYPES[recipe.model.dtype]
    return torch.bfloat16 if device == "cuda" else torch.float32


def _runtime_bytes(quantized: bool) -> float:
    """RSS of this process after importing what training imports (measured, not estimated)."""
    import accelerate  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401

    if quantized:
        import bitsandbytes  # noqa: F401
    with open("/proc/self/statm") as f:
        import os

        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _checkpoint_on_disk(recipe: Recipe, config) -> tuple[float, torch.dtype | None]:
    """Bytes of a local checkpoint's safetensors files and the dtype they store (from config.json)."""
    folder = Path(recipe.model.name_or_path)
    if not folder.is_dir():
        return 0.0, None
    stored = getattr(config, "dtype", None)
    stored = getattr(torch, stored) if isinstance(stored, str) else stored
    return float(sum(p.stat().st_size for p in folder.glob("*.safetensors"))), stored


def estimate(
    recipe: Recipe,
    family: ModelFamily,
    device: str = "cpu",
    batch_size: int | None = None,
    runtime: float | None = None,
    config_and_source: tuple[Any, str] | None = None,
) -> MemoryPlan:
    """The memory plan of ``recipe`` at micro-batch ``batch_size`` (default: the recipe's)."""
    from torch import nn

    from pg_tune.models.quantize import skip_modules
    from pg_tune.train.loss import DEFAULT_CHUNK_ROWS

    config, source = config_and_source or load_config(recipe, family)
    if family.name != "paligemma":  # TODO(plan per family): the activation model below is Gemma's
        raise ValueError(
            f"model.name_or_path={recipe.model.name_or_path!r} is a {family.name} model; pg-tune plan "
            "models PaliGemma's layers only so far"
        )
    batch = batch_size or recipe.train.batch_size
    dtype = _dtype_for(recipe, device)
    size = torch.finfo(dtype).bits // 8
    with torch.device("meta"):
        model = family.model_class(config)
    quant = recipe.quantization
    quantized = quant.mode != "none"
    skipped = skip_modules(quant, family) if quantized else []
    target = re.compile(family.lora_target_regex(recipe.lora))

    # --- weights (exact) ---------------------------------------------------------------------
    full_params = q_params = 0
    lora_params = 0
    adapted: list[tuple[str, nn.Linear]] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            if target.fullmatch(name):
                adapted.append((name, module))
                lora_params += recipe.lora.r * (module.in_features + module.out_features)
            if quantized and not any(name == s or name.startswith(s + ".") for s in skipped):
                q_params += module.weight.numel()
    all_params = sum(p.numel() for p in model.parameters())  # tied head counted once
    full_params = all_params - q_params
    if quant.mode == "4bit":
        per_q = 0.5 + (
            1 / NF4_BLOCK + 4 / (NF4_BLOCK * NF4_NESTED_BLOCK)
            if quant.bnb_4bit_use_double_quant
            else 4 / NF4_BLOCK
        )
        q_label = f"{quant.bnb_4bit_quant_type} 4-bit ({per_q:.3f} B/param)"
    else:
        per_q = 1.0
        q_label = "int8 (1 B/param)"
    saved_params = 0
    for module_name in recipe.lora.modules_to_save:
        for name, p in model.named_parameters():
            if re.search(rf"(^|\.){re.escape(module_name)}\.", name):
                saved_params += p.numel()
    trainable = lora_params + saved_params
    parts = [
        Part(
            f"base weights ({str(dtype).removeprefix('torch.')})",
            full_params * size,
            "exact",
            f"{full_params:,} parameters",
        ),
    ]
    if quantized:
        parts.append(
            Part(
                f"base weights ({q_label})",
                q_params * per_q,
                "exact",
                f"{q_params:,} parameters in {quant.mode}",
            )
        )
    parts += [
        Part(
            "LoRA weights (fp32)",
            lora_params * 4,
            "exact",
            f"{len(adapted)} adapted linears, r={recipe.lora.r}",
        ),
    ]
    if saved_params:
        parts.append(
            Part("modules_to_save copies", saved_params * size, "exact", f"{saved_params:,} parameters")
        )
    parts.append(
        Part("gradients", lora_params * 4 + saved_params * size, "exact", f"{trainable:,} trainable")
    )
    opt_bytes = 8 if recipe.train.optimizer == "adamw" else 2
    parts.append(
        Part(
            "optimizer states",
            trainable * opt_bytes,
            "exact",
            f"{recipe.train.optimizer}: {opt_bytes} B/param",
        )
    )

    # --- activations (estimate) --------------------------------------------------------------
    text, vision = config.text_config, config.vision_config
    image_tokens = (vision.image_size // vision.patch_size) ** 2
    seq = image_tokens + recipe.data.max_text_length
    H, inter = text.hidden_size, text.intermediate_size
    heads, hd = text.num_attention_heads, text.head_dim
    eager = text.model_type == "gemma2" or recipe.model.attn_implementation == "eager"
    norms = 4 if text.model_type == "gemma2" else 2
    per_layer_adapted: dict[str, list[int]] = {}
    for name, module in adapted:
        if ".language_model." in name:
            short = name.rsplit(".", 1)[-1]
            per_layer_adapted.setdefault(short, []).append(module.in_features)
    layers = text.num_hidden_layers
    lora_in = 0.0
    if dtype == torch.float32:
        # The fp32 input is saved once per distinct input: q/k/v share one, gate/up another.
        groups = [("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",)]
        for group in groups:
            widths = [per_layer_adapted[m][0] for m in group if m in per_layer_adapted]
            lora_in += 4 * widths[0] if widths else 0
    else:
        lora_in = 4 * sum(w[0] for w in per_layer_adapted.values())
    lora_mid = 4 * recipe.lora.r * len(per_layer_adapted)
    attn_token = (3 if eager else 4) * heads * hd * size + (0 if eager else 4 * heads)
    per_token = lora_in + lora_mid + norms * (4 * H + 4) + 3 * inter * size + attn_token
    per_sample_layer = seq * per_token + (8 * heads * seq * seq if eager else 0)
    if recipe.train.gradient_checkpointing:
        activations = batch * (layers * seq * H * size + per_sample_layer)
        how = f"checkpointed: {layers} layer inputs + one layer recomputed; T={seq}"
    else:
        activations = batch * layers * per_sample_layer
        how = f"{layers} layers × T={seq} ({image_tokens} image + {recipe.data.max_text_length} text) × {per_token / 1e3:.0f} kB"
        if eager:
            how += f" + scores 8 B × {heads} heads × T²"
    # Outside the layers: the final RMSNorm's fp32 input, and the head's supervised rows (input and
    # the gradient the fused head makes in forward).
    head_rows = batch * recipe.data.max_text_length
    activations += batch * seq * (4 * H + 4) + 2 * head_rows * H * size
    if recipe.lora.vision:
        vision_token = (
            4 * (4 * vision.hidden_size)
            + 2 * (4 * vision.hidden_size + 4)
            + 2 * vision.intermediate_size * size
        )
        activations += (
            batch * vision.num_hidden_layers * image_tokens * (vision_token + 4 * vision.hidden_size * size)
        )
        how += "; + the vision tower's (rough: LoRA there)"
    parts.append(Part("activations", activations, "estimate", how))

    # --- the loss head chunk (estimate) ------------------------------------------------------
    rows = min(DEFAULT_CHUNK_ROWS, batch * recipe.data.max_text_length)
    softcap = bool(getattr(text, "final_logit_softcapping", None))
    head_row = 4 + (4 if softcap else 0) + (4 if dtype != torch.float32 else 0)
    parts.append(
        Part(
            "loss head chunk",
            rows * text.vocab_size * head_row,
            "estimate",
            f"{rows} rows × {text.vocab_size:,} × {head_row} B (fp32 logits"
            + (", soft-cap tanh" if softcap else "")
            + (", bf16 matmul out + grad cast" if dtype != torch.float32 else "")
            + ")",
        )
    )
    notes = [f"config: {source}"]
    if device == "cpu":
        runtime = _runtime_bytes(quantized) if runtime is None else runtime
        parts.append(
            Part("runtime (imports)", runtime, "measured", "RSS of this process after training's imports")
        )
        on_disk, stored = _checkpoint_on_disk(recipe, config)
        if on_disk and quantized and stored == dtype:
            # transformers keeps the safetensors files memory-mapped while any tensor loaded in the
            # stored dtype is a view into them (the unquantized weights, counted above); the pages
            # of the quantized linears were read through the mapping while quantizing and still
            # count in RSS (RssFile in /proc/PID/status: the whole 6.06 GB at the 3B shape). With a
            # dtype conversion no view remains and the files are unmapped after loading.
            views = full_params * size
            parts.append(
                Part(
                    "checkpoint pages mapped (CPU)",
                    max(on_disk - views, 0.0),
                    "estimate",
                    f"{on_disk / 1e9:.2f} GB of safetensors mapped, {views / 1e9:.2f} GB of it the weights themselves",
                )
            )
    notes.append(
        "activations assume every row is padded to image tokens + data.max_text_length (the longest "
        "possible); shorter batches need less"
    )
    if recipe.train.objective == "dpo":
        parts = preference_terms(parts, recipe)
    return MemoryPlan(config.name_or_path or recipe.model.name_or_path, device, batch, seq, parts, notes)


# --- train.objective: dpo, a separate term (pg_tune.train.preference) ---------------------------------


def preference_terms(parts: list[Part], recipe: Recipe) -> list[Part]:
    """What DPO changes in a plan: a micro-batch of B pairs is 2B sequences in the policy's pass, so
    the saved activations double (the images are encoded once per pair: the vision share is an
    over-count); the reference pass runs under ``no_grad`` in the same step and saves nothing. LoRA
    keeps no reference copy (the adapter is switched off); ``full`` / ``partial`` keep a frozen copy
    of the base weights (no gradients, no optimizer state)."""
    out = [
        Part(p.name, 2 * p.bytes, p.kind, p.how + "; x2: DPO's chosen and rejected sequences")
        if p.name == "activations"
        else p
        for p in parts
    ]
    if recipe.method != "lora":
        weights = sum(p.bytes for p in parts if p.name.startswith("base weights"))
        out.append(Part("DPO reference (frozen copy)", weights, "exact", "the base weights once more"))
    return out


def suggest_micro_batch(
    recipe: Recipe, family: ModelFamily, memory: float, device: str = "cpu"
) -> tuple[int, int, MemoryPlan] | None:
    """The largest micro-batch dividing the recipe's global batch whose plan fits ``memory``."""
    global_batch = recipe.train.batch_size * recipe.train.grad_accum
    runtime = _runtime_bytes(recipe.quantization.mode != "none") if device == "cpu" else None
    config = load_config(recipe, family)
    for micro in sorted((d for d in range(1, global_batch + 1) if global_batch % d == 0), reverse=True):
        plan = estimate(recipe, family, device, micro, runtime, config)
        if plan.peak <= memory:
            return micro, global_batch // micro, plan
    return None


def format_plan(plan: MemoryPlan) -> str:
    lines = [
        f"memory plan: {plan.model} on {plan.device}, micro-batch {plan.batch_size}, sequence {plan.sequence}",
        f"{'part':<34} {'GB':>8}  {'kind':<9} how",
    ]
    for p in plan.parts:
        lines.append(f"{p.name:<34} {p.bytes / 1e9:8.2f}  {p.kind:<9} {p.how}")
    lines.append(f"{'expected peak':<34} {plan.peak / 1e9:8.2f}")
    lines += [f"note: {n}" for n in plan.notes]
    lines.append(
        "exact = counted from the config; estimate = a model of what is kept (see pg_tune/measure/plan.py); measured = here"
    )
    return "\n".join(lines)
