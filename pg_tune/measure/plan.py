"""``pg-tune plan RECIPE [--memory 24GiB]``: the peak memory of a training run, before anything loads.

Works for every registered model family through its interface: reads the model's ``config.json``
only (a local folder, the hub cache, a tiny preset, or, when the hub is unreachable, pg_tune's copy
of a published config: ``ModelFamily.published_config``) and builds the family's model class on
the meta device to count parameters exactly and read its decoder layers; the longest training row
comes from the family's collator (``Collator.max_row_length``: the largest image the processor's
settings make, the chat template, ``data.max_text_length``). Then, per micro-batch:

====================  =====================================================================
part                  how it is counted
====================  =====================================================================
base weights          exact: parameters × bytes of their dtype; 4-bit NF4 0.5 B + block
                      absmax (64-blocks; 8-bit absmax with double quantisation), by module
LoRA weights          exact: r × (in + out) per adapted linear, fp32 (peft's adapter dtype)
gradients             exact: one fp32 value per trainable parameter
optimizer states      exact: AdamW 2 × fp32 per trainable parameter (8-bit: 2 × 1 B)
activations           estimate: the tensors autograd saves in each decoder layer (below), at
                      the longest row the family's collator can make
loss head chunk       estimate: pg_tune's fused head, one chunk of supervised rows × vocabulary
batch image inputs    exact: the collator's pixels (fp32) and per-pixel masks, every encoder pass
image encoder         estimate, only where it exceeds the two above: a frozen encoder's largest
(transient)           live tensors while it runs over ``encoder_chunk`` tiles / crops at a time
runtime (CPU)         measured in this process: Python, torch, transformers, peft imports
====================  =====================================================================

Nothing of the checkpoint is counted as mapped: ``ModelFamily.load_model`` reads each tensor into
its own memory (``pg_tune.models.shards``), so RSS holds the weights as they train.

Saved activations per decoder layer and token (frozen base, LoRA, no dropout), from what autograd
keeps in transformers' decoder layers under peft, read from the family's model (its norms over the
hidden width and per head, its attention implementation), checked against
``torch.autograd.graph.saved_tensors_hooks`` for every family in ``tests/measure/test_plan.py``:

- each distinct input of the adapted linears, once, in the model dtype (pg_tune's LoRA upcasts a
  bf16 input inside the product instead of saving an fp32 copy per module:
  ``pg_tune.train.lora_fused.LoraDelta``, and ``pg_tune.train.adapters.UpcastLoraA`` where a layer
  falls back to peft's forward; under SDPA o_proj's input is the attention output SDPA
  keeps), and each module's rank-r ``A x`` (fp32);
- each RMSNorm's fp32 input and 1/rms (2 norms a layer in Gemma and Llama, 4 in Gemma 2 and 3),
  and per-head q/k norms' (Gemma 3) on every query and key/value head;
- the MLP's gate, activation and up outputs (3 × intermediate, model dtype: GELU or SiLU alike);
- attention: eager (Gemma 2) keeps q and the head-expanded k, v plus the scores, softmax and its
  cast (8 B × heads × T² per layer); SDPA keeps q, k, v (expanded to every head once a batch is
  padded), out and the log-sum-exp.

With ``train.gradient_checkpointing`` only each layer's input is kept, plus one layer's worth while
it is recomputed. A frozen vision tower runs without autograd (``pg_tune.train.loss``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pg_tune.config.recipe import Recipe
from pg_tune.data.collate import padded_length
from pg_tune.models import cpu_dtype
from pg_tune.models.family import ModelFamily

GiB = 2**30
NF4_BLOCK = 64
"""bitsandbytes' 4-bit block size: one absmax per 64 weights."""
NF4_NESTED_BLOCK = 256
"""Double quantisation: the absmaxes are 8-bit, with one fp32 scale per 256 of them."""
MAX_MEMORY = 2**60
"""The largest ``--memory`` taken (1 EiB): anything above is a typo, not a machine."""
MAX_GLOBAL_BATCH = 2**31
"""The largest global batch ``suggest_micro_batch`` splits; its divisors are found by trial
division up to the square root (46,341 steps at most)."""


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
    """``24GiB``, ``24GB``, ``80G``, ``512MiB``, ``1e12`` -> bytes; a positive, finite size or ``ValueError``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)(?:e(\d+))?\s*([KMGTP]?)(i?)B?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"--memory {text!r}: expected a size such as 24GiB, 80GB or 512MiB")
    number = float(f"{match.group(1)}e{match.group(2) or 0}")  # 1e400 -> inf, refused below
    unit, binary = match.group(3).upper(), bool(match.group(4))
    value = number * (1024 if binary else 1000) ** (" KMGTP".index(unit) if unit else 0)
    if not 1 <= value <= MAX_MEMORY:  # also inf
        raise ValueError(f"--memory {text!r}: expected between 1 byte and {MAX_MEMORY / 2**60:.0f} EiB")
    return int(value)


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


def plan_processor(recipe: Recipe, family: ModelFamily):
    """The processor training would use (tiny preset, local folder, hub cache), else the family's
    offline copy of a published checkpoint's image settings (``ModelFamily.published_processor``)."""
    name = recipe.model.name_or_path
    published = family.published_processor(name)
    if published is not None and not Path(name).is_dir():
        return published
    try:
        return family.load_processor(recipe.model)
    except (OSError, ValueError) as e:
        raise ValueError(f"model.name_or_path={name!r}: no processor files reachable ({e})") from None


@dataclass(frozen=True)
class _DecoderLayer:
    """What one decoder layer keeps for backward, read from the family's model (meta device)."""

    norms: int
    """RMSNorms over the hidden width (Gemma, Llama: 2; Gemma 2 and 3: 4)."""
    head_norm_rows: int
    """Per-head norms' rows per token (Gemma 3's q_norm and k_norm: query + key/value heads)."""
    eager: bool
    """Eager attention, which keeps the T x T scores (Gemma 2's default: it soft-caps them)."""


def _decoder_layer(model, family: ModelFamily, recipe: Recipe) -> tuple[str, _DecoderLayer]:
    text = model.config.get_text_config()
    layers = [name for name, _ in model.named_modules() if re.fullmatch(family.lm_layers, name)]
    if not layers:
        raise ValueError(f"{family.name}: no decoder layer matches {family.lm_layers!r}")
    layer = model.get_submodule(layers[0])
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    norms = head_rows = 0
    for name, module in layer.named_modules():
        weight = getattr(module, "weight", None)
        if "norm" not in type(module).__name__.lower() or weight is None:
            continue
        if weight.shape[-1] == text.hidden_size:
            norms += 1
        elif weight.shape[-1] == head_dim:
            key_side = name.rsplit(".", 1)[-1].startswith("k")
            head_rows += text.num_key_value_heads if key_side else text.num_attention_heads
    attention = recipe.model.attn_implementation or getattr(text, "_attn_implementation", None)
    return layers[0], _DecoderLayer(norms, head_rows, attention == "eager")


def estimate(
    recipe: Recipe,
    family: ModelFamily,
    device: str = "cpu",
    batch_size: int | None = None,
    runtime: float | None = None,
    config_and_source: tuple[Any, str] | None = None,
    processor: Any | None = None,
) -> MemoryPlan:
    """The memory plan of ``recipe`` at micro-batch ``batch_size`` (default: the recipe's)."""
    from torch import nn

    from pg_tune.models.quantize import skip_modules
    from pg_tune.train.loss import DEFAULT_CHUNK_ROWS

    config, source = config_and_source or load_config(recipe, family)
    processor = processor if processor is not None else plan_processor(recipe, family)
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
    text, vision = config.get_text_config(), config.vision_config
    image = family.image_budget(processor)
    seq = padded_length(
        family.collator(processor, recipe.data.max_text_length).max_row_length(),
        recipe.data.pad_to_multiple_of,
    )
    H, inter = text.hidden_size, text.intermediate_size
    heads = text.num_attention_heads
    hd = getattr(text, "head_dim", None) or H // heads
    first_layer, layer = _decoder_layer(model, family, recipe)
    per_layer_adapted: dict[str, int] = {}
    for name, module in adapted:
        if name.startswith(first_layer + "."):
            per_layer_adapted[name.rsplit(".", 1)[-1]] = module.in_features
    layers = text.num_hidden_layers
    # Each distinct input of the adapted linears is saved once, in the model dtype (fp32 bases need no
    # cast; on bf16 / 4-bit bases pg_tune's LoRA upcasts inside the product, ``LoraDelta``): q/k/v
    # share one, gate/up another; under SDPA o_proj's input is the attention output SDPA keeps anyway.
    groups = [("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("down_proj",)]
    groups += [("o_proj",)] if layer.eager else []
    lora_in = 0.0
    for group in groups:
        widths = [per_layer_adapted[m] for m in group if m in per_layer_adapted]
        lora_in += size * widths[0] if widths else 0
    lora_mid = 4 * recipe.lora.r * len(per_layer_adapted)
    attn_token = (3 if layer.eager else 4) * heads * hd * size + (0 if layer.eager else 4 * heads)
    norm_token = layer.norms * (4 * H + 4) + layer.head_norm_rows * (4 * hd + 4)
    per_token = lora_in + lora_mid + norm_token + 3 * inter * size + attn_token
    per_sample_layer = seq * per_token + (8 * heads * seq * seq if layer.eager else 0)
    kinds = f"{layer.norms} norms" + (
        f" + {layer.head_norm_rows} head-norm rows" if layer.head_norm_rows else ""
    )
    kinds += ", eager attention" if layer.eager else ", SDPA"
    if recipe.train.gradient_checkpointing:
        activations = batch * (layers * seq * H * size + per_sample_layer)
        how = f"checkpointed: {layers} layer inputs + one layer recomputed; T={seq}"
    else:
        activations = batch * layers * per_sample_layer
        how = (
            f"{layers} layers ({kinds}) × T={seq} ({image.tokens} image + template + "
            f"{recipe.data.max_text_length} text) × {per_token / 1e3:.0f} kB"
        )
        if layer.eager:
            how += f" + scores 8 B × {heads} heads × T²"
    # Outside the layers: the final RMSNorm's fp32 input, and the head's supervised rows (input and
    # the gradient the fused head makes in forward).
    head_rows = batch * recipe.data.max_text_length
    activations += batch * seq * (4 * H + 4) + 2 * head_rows * H * size
    patches = (vision.image_size // vision.patch_size) ** 2  # per encoder pass
    if recipe.lora.vision:
        vision_token = (
            4 * (4 * vision.hidden_size)
            + 2 * (4 * vision.hidden_size + 4)
            + 2 * vision.intermediate_size * size
        )
        activations += (
            batch
            * image.encoder_passes
            * vision.num_hidden_layers
            * patches
            * (vision_token + 4 * vision.hidden_size * size)
        )
        how += "; + the vision tower's (rough: LoRA there)"
    parts.append(Part("activations", activations, "estimate", how))

    # --- the loss head chunk (estimate) ------------------------------------------------------
    head_weight, softcap = family.head(model)
    vocab = head_weight.shape[0]
    rows = min(DEFAULT_CHUNK_ROWS, batch * recipe.data.max_text_length)
    head_row = 4 + (4 if softcap else 0) + (4 if dtype != torch.float32 else 0)
    head_chunk = rows * vocab * head_row
    parts.append(
        Part(
            "loss head chunk",
            head_chunk,
            "estimate",
            f"{rows} rows × {vocab:,} × {head_row} B (fp32 logits"
            + (", soft-cap tanh" if softcap else "")
            + (", bf16 matmul out + grad cast" if dtype != torch.float32 else "")
            + ")",
        )
    )
    # The batch's image inputs live for the whole step (17 SmolVLM2 tiles at 512 px: 58 MB a row).
    pixels = batch * family.image_input_bytes(vision.image_size, image)
    parts.append(
        Part(
            "batch image inputs",
            pixels,
            "exact",
            f"{batch} × {image.encoder_passes} encoder pass(es) × {vision.image_size}² px as the collator makes them",
        )
    )
    if not recipe.lora.vision:
        # A frozen encoder runs without autograd before the decoder: its largest live tensors (one
        # layer's residual, norm output, q, k, v and attention output, or its MLP's two
        # intermediate-width outputs) over every tile of the batch, and the pixels cast to the
        # model dtype. It counts only where it exceeds what the decoder then holds.
        widths = max(6 * vision.hidden_size, 2 * vision.hidden_size + 2 * vision.intermediate_size)
        cast = 3 * vision.image_size**2 * size if dtype != torch.float32 else 0
        at_once = min(batch * image.encoder_passes, family.encoder_chunk(vision))  # ENCODER_POSITIONS
        encoder = at_once * (patches * widths * size + cast)
        if encoder > activations + head_chunk:
            parts.append(
                Part(
                    "image encoder forward (transient)",
                    encoder - activations - head_chunk,
                    "estimate",
                    f"{at_once} of {batch * image.encoder_passes} encoder passes at once × ({patches} patches × {widths} values"
                    + (" + the pixels in the model dtype" if cast else "")
                    + ") live at once, beyond the decoder's activations",
                )
            )
    notes = [f"config: {source}"]
    if device == "cpu":
        runtime = _runtime_bytes(quantized) if runtime is None else runtime
        parts.append(
            Part("runtime (imports)", runtime, "measured", "RSS of this process after training's imports")
        )
        notes += _heap_note(not family.is_tiny(recipe.model.name_or_path))
        if slow := cpu_dtype.recipe_note(recipe):
            notes.append(slow)
    notes.append(
        f"activations assume every row is padded to the longest possible ({image.tokens} image positions, "
        f"{image.encoder_passes} encoder pass(es) per image, + data.max_text_length, rounded up to a multiple of "
        f"data.pad_to_multiple_of={recipe.data.pad_to_multiple_of}: {seq} positions); shorter batches need less"
    )
    if recipe.train.objective == "dpo":
        parts = preference_terms(parts, recipe)
    return MemoryPlan(config.name_or_path or recipe.model.name_or_path, device, batch, seq, parts, notes)


def _heap_note(from_disk: bool) -> list[str]:
    """glibc's malloc and this plan (``pg_tune.models.host_memory``): where the loader fixes the
    mmap threshold (a checkpoint read from disk, unless ``PG_TUNE_MALLOC=system``), freed step
    memory goes back to the OS and the plan holds, at some CPU time per step; elsewhere freed
    memory can stay in glibc's heap, which the plan does not model."""
    import platform

    from pg_tune.models import host_memory

    if platform.libc_ver()[0] != "glibc":
        return []
    if from_disk and host_memory.fixes_threshold():
        return [
            f"PG_TUNE_MALLOC={host_memory.policy()} fixes glibc's mmap threshold for this base, so freed "
            "step memory goes back to the OS and this plan holds; each step pays page faults for it, which "
            "the huge pages pg-tune asks for make cheaper at 3B (0.99x the CPU seconds per step of glibc's "
            "default in LoRA, 1.14x in QLoRA) but not on small, activation-heavy models (1.2-1.3x on the SmolVLM2-256M shape; "
            "docs/performance.md 'Huge pages for the fixed threshold'). With host memory to spare, "
            "PG_TUNE_MALLOC=system trains faster there and peaks higher (1.4-1.5x this plan on that shape)"
        ]
    what = "this in-process preset" if not from_disk else "this base"
    return [
        f"PG_TUNE_MALLOC={host_memory.policy()} leaves glibc's mmap threshold dynamic for {what}: memory "
        "freed within a step can stay in the heap, so the peak RSS may exceed this plan (1.4-1.5x on the "
        "SmolVLM2-256M shape, docs/performance.md 'Huge pages for the fixed threshold')"
        + ("; PG_TUNE_MALLOC=auto returns it" if from_disk else "")
    ]


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


def _divisors(n: int) -> list[int]:
    """Every divisor of ``n`` (trial division up to its square root), ascending."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small) | {n // d for d in small})


def suggest_micro_batch(
    recipe: Recipe, family: ModelFamily, memory: float, device: str = "cpu"
) -> tuple[int, int, MemoryPlan] | None:
    """The largest micro-batch dividing the recipe's global batch whose plan fits ``memory``.

    The peak grows with the micro-batch, so the divisors are searched by bisection: a few plans,
    whatever the global batch (up to ``MAX_GLOBAL_BATCH``)."""
    global_batch = recipe.train.batch_size * recipe.train.grad_accum
    if global_batch > MAX_GLOBAL_BATCH:
        raise ValueError(
            f"train.batch_size × train.grad_accum = {global_batch:,}: too large to split into micro-batches "
            f"(at most {MAX_GLOBAL_BATCH:,} rows a step)"
        )
    runtime = _runtime_bytes(recipe.quantization.mode != "none") if device == "cpu" else None
    config = load_config(recipe, family)
    processor = plan_processor(recipe, family)

    def plan(micro: int) -> MemoryPlan:
        return estimate(recipe, family, device, micro, runtime, config, processor)

    divisors = _divisors(global_batch)
    low, high, best = 0, len(divisors) - 1, None
    while low <= high:
        middle = (low + high) // 2
        fitted = plan(divisors[middle])
        if fitted.peak <= memory:
            best, low = (divisors[middle], global_batch // divisors[middle], fitted), middle + 1
        else:
            high = middle - 1
    return best


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
