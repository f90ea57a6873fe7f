"""The model-family interface: everything a generic module needs to know about one kind of model.

Generic code (collation, the fused suffix-only loss, generation, scoring, the feature cache,
quantization, LoRA, export, the model card) never names a model class or a token id; it asks the
``ModelFamily`` that ``family_for`` picks from a checkpoint's ``config.model_type`` or a tiny preset
name. A new family is one module implementing this class, its tiny presets, one line in
``_REGISTRY`` below, and its recipes (docs/architecture.md, "How to add a model family";
``pg_tune/models/paligemma/`` is the worked example).

The sequence contract every family keeps, whatever its layout: a batch from ``collator(...)`` holds
``input_ids``, ``attention_mask``, ``labels`` (training: -100 everywhere but the target and its end
token), the family's own attention-rule and image inputs (PaliGemma: ``token_type_ids``,
``pixel_values``; SmolVLM: ``pixel_attention_mask``), ``sample_index`` and ``truncated``. A
preference batch (``collator.preference_batch``) holds ``B`` pairs as ``2B`` such rows, chosen
answers first, and the image inputs of the ``B`` images once.
"""

from __future__ import annotations

import abc
import importlib
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    import numpy as np
    from transformers import PreTrainedModel, ProcessorMixin

    from pg_tune.config.recipe import ImageConfig, LoraConfig, ModelConfig, QuantizationConfig
    from pg_tune.data.sample import Sample

__all__ = [
    "Collator",
    "EngineSupport",
    "ImageBudget",
    "ModelFamily",
    "ModulePaths",
    "ParsedObject",
    "family_for",
    "family_names",
    "load_family",
    "is_tiny_preset",
    "resolve_dtype",
    "unwrap_model",
]

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
ENCODER_POSITIONS = 8192
"""Patch positions a frozen image encoder runs over at once (PaliGemma 224 px: 32 images; Gemma 3
896 px: 2; SmolVLM2 512 px tiles: 8). Its largest live tensors (an MLP's two intermediate-width
outputs) then stay near 8,192 × 2 × intermediate values whatever the batch, instead of growing with
every image and tile of it (SmolVLM2-256M, 8 rows of 17 tiles: 2.1 GB in one go). The rows of each
matmul stay in the thousands: on SmolVLM2-256M (2 rows of 17 tiles, bf16, one thread) the chunked
encoder took 0.77-1.03x the CPU seconds of one call, in three alternating pairs."""


def resolve_dtype(name: str) -> torch.dtype:
    """``auto`` is bfloat16 on a GPU that supports it and float32 elsewhere (never float16)."""
    if name != "auto":
        return _DTYPES[name]
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


@dataclass(frozen=True)
class ModulePaths:
    """Full module paths from the model's root (what bitsandbytes' skip list and freezing need)."""

    language_model: str  # decoder layers live under it ("model.language_model")
    vision: str  # the image encoder ("model.vision_tower")
    projector: str  # image features -> text width ("model.multi_modal_projector")
    head: str  # the LM head ("lm_head")


@dataclass(frozen=True)
class ParsedObject:
    """One object read back from generated text, in original-image pixels.

    ``mask`` is a full-size boolean array when the family produced one (PaliGemma: decoded ``<seg>``
    codes); ``score`` a confidence for ranking (e.g. mean token log-probability); ``tokens`` the
    family's raw encoding, kept for prediction records (PaliGemma: ``{"loc": [...], "seg": [...]}``).
    """

    label: str
    box: tuple[float, float, float, float]
    score: float | None = None
    mask: np.ndarray | None = None
    tokens: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class EngineSupport:
    """What one serving engine (vLLM, SGLang, TGI) documents for a family's architecture.

    Facts from the engine's own documentation or tracker, cited in ``source``; nothing here was run.
    """

    serves: bool
    """The engine lists the architecture (a merged export loads as a plain model)."""
    lora: bool = False
    """The engine loads peft LoRA adapters on the architecture's language-model linear layers."""
    chat: bool = False
    """Its OpenAI chat endpoint can take the model's messages (with the export's chat template)."""
    source: str = ""
    """Where the facts come from (docs page at a commit, or issue numbers)."""
    note: str = ""
    """What else a user must know (versions, restrictions)."""


@dataclass(frozen=True)
class ImageBudget:
    """What one image costs a training row (``ModelFamily.image_budget``)."""

    tokens: int
    """Sequence positions the image takes, its wrapper tokens included (PaliGemma 224 px: 256;
    SmolVLM2-256M: 5 to 17 tiles of 64 image tokens plus their markers)."""
    encoder_passes: int = 1
    """Pictures the image encoder runs on for it: tiles and global view, or pan-and-scan crops."""


class Collator(Protocol):
    """Turns ``(index, Sample)`` pairs into a model batch (see the module docstring's contract)."""

    train: bool
    family: ModelFamily

    def __call__(self, batch: Sequence[tuple[int, Sample]]) -> dict[str, torch.Tensor]: ...

    def text_batch(self, batch: Sequence[tuple[int, Sample]]) -> dict[str, torch.Tensor]: ...

    def text_length(self, sample: Sample) -> tuple[int, int]:
        """Text tokens of the encoded row (image tokens excluded) and before any truncation."""
        ...

    def preference_batch(self, batch: Sequence[tuple[int, Sample]]) -> dict[str, torch.Tensor]:
        """``B`` preference pairs as ``2B`` training rows, chosen answers first then rejected ones
        (``pg_tune.data.collate.pair_rows``), with the ``B`` images' inputs once."""
        ...

    def preference_text_batch(self, batch: Sequence[tuple[int, Sample]]) -> dict[str, torch.Tensor]:
        """``preference_batch`` without the image inputs."""
        ...

    def row_length(self, sample: Sample) -> int:
        """Positions of the encoded training row, image tokens and template included (the image's
        size is read from its file header when the family's image tokens depend on it, never its
        pixels): what ``data.group_by_length`` sorts by."""
        ...

    def max_row_length(self) -> int:
        """The most positions a training row can take: the largest image this processor makes, the
        family's template and ``data.max_text_length``: what ``pg-tune plan`` budgets."""
        ...


class ModelFamily(abc.ABC):
    """What pg_tune needs of one model family.

    One instance per command: the command resolves it once at its boundary (``load_family``), with
    the family's mask tokenizer bound inside (``mask_codec``, PaliGemma's VQ-VAE; None for families
    without mask tokens or when no weights are at hand), and passes it to everything it calls.
    Behaviour the families share (loading, LoRA targets, the fused loss's pieces, generation inputs)
    is implemented here once, driven by the class attributes; a family overrides what differs.
    """

    name: ClassVar[str]
    """Short name used in messages and the registry ("paligemma")."""
    model_types: ClassVar[tuple[str, ...]]
    """``config.model_type`` values this family serves."""
    tiny_presets: ClassVar[tuple[str, ...]]
    """Preset names it builds offline (tests, demo, benchmarks); the first is the one the family
    contract (``tests/test_contract.py``) trains: the smallest with every part of the model."""
    tiny_module: ClassVar[Any]
    """The module building the tiny presets (``PRESETS``, ``build_config``, ``build_base``,
    ``build_processor``, ``save_checkpoint``)."""
    tasks: ClassVar[frozenset[str]]
    """Tasks it can render and parse (``Sample.task`` values)."""
    requires_remote_code: ClassVar[bool] = False
    """True when the model code exists only on the Hub (then a pinned revision is required)."""
    modules: ClassVar[ModulePaths]
    """Where the language model, vision encoder, projector and head sit in the model."""
    lm_layers: ClassVar[str]
    """Regex of the decoder layers' module paths (``model\\.language_model\\.layers\\.\\d+``)."""
    vision_layers: ClassVar[str]
    """Regex of the vision encoder layers' module paths."""
    projector_linears: ClassVar[str | None] = None
    """Regex of the projector's ``nn.Linear`` modules (``all_linear`` adapts them); None if it has none."""
    attention_inputs: ClassVar[tuple[str, ...]] = ()
    """Batch keys of the family's attention rule, passed to the decoder (``token_type_ids``)."""
    image_inputs: ClassVar[tuple[str, ...]] = ("pixel_values",)
    """Batch keys the image encoder reads (the first holds the pixels)."""
    cacheable_image_features: ClassVar[bool] = True
    """Whether every image gives features of one shape, so ``data.feature_cache`` can store them
    (SmolVLM2's tiles make their number vary per image: False)."""
    final_softcap: ClassVar[bool] = True
    """Whether the model class applies ``final_logit_softcapping`` to its logits when the config
    names one (Gemma 3's ``forward`` never does)."""
    model_class: ClassVar[type]
    """The transformers class of a full model (export, model card)."""
    processor_class: ClassVar[type]
    """The transformers processor class (export, model card)."""
    hub_tags: ClassVar[tuple[str, ...]] = ()
    """Extra model-card tags."""
    name_hints: ClassVar[tuple[str, ...]] = ()
    """Lower-case substrings of hub ids that name this family when no config is at hand offline."""
    refused_hints: ClassVar[dict[str, str]] = {}
    """Lower-case substrings of hub ids the name hints would send here, but which this family cannot
    load (text-only siblings, an older generation), each with the reason ``validate`` gives."""
    serving_engines: ClassVar[Mapping[str, EngineSupport]] = {}
    """Per serving engine (``vllm``, ``sglang``, ``tgi``), what it documents for this architecture
    (``pg-tune export --check serving``); an engine missing here is reported as not checked."""
    image_settings: ClassVar[tuple[str, ...]] = ()
    """``model.image`` keys (``ImageConfig``) the family's processor takes: its image-token budget."""
    image_settings_note: ClassVar[str] = ""
    """Why a family takes no (other) ``model.image`` key, for the refusal."""

    def __init__(self, mask_codec: Any | None = None):
        self.mask_codec = mask_codec
        """The family's mask tokenizer, bound once per command (``load_family``); None without one."""

    # ---- tiny presets --------------------------------------------------------------------------
    def is_tiny(self, name_or_path: str) -> bool:
        """True for one of this family's tiny preset names (and not a folder of that name)."""
        return name_or_path in self.tiny_presets and not Path(name_or_path).exists()

    def save_tiny(self, preset: str, out_dir: str | Path, seed: int = 0) -> Path:
        """Write a tiny preset as a checkpoint in the hub's layout (``python -m pg_tune.models.tiny``)."""
        return self.tiny_module.save_checkpoint(preset, out_dir, seed=seed)

    def published_config(self, name_or_path: str) -> Any | None:
        """pg_tune's own copy of a published checkpoint's config (``pg-tune plan`` offline), or None."""
        return None

    def published_processor(self, name_or_path: str) -> ProcessorMixin | None:
        """A processor with a published checkpoint's image settings (its tokenizer a tiny stand-in
        with the real control ids), built offline for ``pg-tune plan``; None if pg_tune has no copy."""
        return None

    # ---- loading -------------------------------------------------------------------------------
    def load_processor(self, model: ModelConfig) -> ProcessorMixin:
        """The processor of a hub id, a local folder or a tiny preset, with the recipe's image-token
        budget (``model.image``) applied: training, evaluation, the saved adapter and ``plan`` see
        the same settings."""
        self.check_model_config(model)
        self.check_image_settings(model.image)
        return self.configure_processor(self._processor(model), model.image)

    def _processor(self, model: ModelConfig) -> ProcessorMixin:
        """The processor as the checkpoint (or tiny preset) ships it."""
        if self.is_tiny(model.name_or_path):
            return self.tiny_module.build_processor(self.tiny_module.PRESETS[model.name_or_path])
        return self.processor_class.from_pretrained(
            model.name_or_path, revision=model.revision, trust_remote_code=model.trust_remote_code
        )

    def check_image_settings(self, image: ImageConfig, feature_cache: bool = False) -> None:
        """Refuse ``model.image`` keys the family's processor does not take (``ValueError`` naming the
        key); ``feature_cache``: whether the recipe caches image features (fixed per image)."""
        for key in image.settings():
            if key not in self.image_settings:
                takes = (
                    f"take {', '.join(self.image_settings)}"
                    if self.image_settings
                    else "take no model.image key"
                )
                note = f": {self.image_settings_note}" if self.image_settings_note else ""
                raise ValueError(f"model.image.{key}: {self.name} models {takes}{note}")

    def configure_processor(self, processor: ProcessorMixin, image: ImageConfig) -> ProcessorMixin:
        """Apply ``model.image`` to the processor's image settings (families without keys: unchanged)."""
        return processor

    def load_model(
        self,
        model: ModelConfig,
        quantization: QuantizationConfig | None = None,
        device_map: str | dict | None = None,
    ) -> PreTrainedModel:
        """The model of a hub id, a local folder or a tiny preset, in the recipe's dtype; with a
        quantization section, bitsandbytes-quantized as ``keep_unquantized`` says (and checked).

        Safetensors checkpoints are read tensor by tensor with plain reads, never memory-mapped
        (``pg_tune.models.shards``): each quantized linear's bf16 source is released as soon as it
        is quantized, the weights kept in the stored dtype own their memory, and no file stays
        mapped, so host memory holds the model as it trains plus one tensor, on CPU and (with a
        ``device_map``) while the weights go to a GPU; glibc's malloc then returns freed blocks to
        the OS as ``PG_TUNE_MALLOC`` says (``pg_tune.models.host_memory``)."""
        from pg_tune.models.source import require_safetensors

        self.check_model_config(model)
        dtype = resolve_dtype(model.dtype)
        require_safetensors(model.name_or_path)
        quantized = quantization is not None and quantization.mode != "none"
        if self.is_tiny(model.name_or_path):
            if quantized:
                from pg_tune.config.schema import ConfigError

                raise ConfigError(
                    "quantization needs a checkpoint on disk: save the tiny preset first "
                    f"(python -m pg_tune.models.tiny DIR --preset {model.name_or_path}) and point "
                    "model.name_or_path at it"
                )
            return self.tiny_module.build_base(model.name_or_path).to(dtype)
        kwargs: dict[str, Any] = {}
        if quantized:
            from pg_tune.models.quantize import bnb_config

            kwargs["quantization_config"] = bnb_config(quantization, self)
        if model.attn_implementation:
            kwargs["attn_implementation"] = model.attn_implementation
        folder = _checkpoint_folder(model)
        if folder is None:  # not a safetensors checkpoint pg_tune can read itself
            loaded = self.model_class.from_pretrained(
                model.name_or_path,
                revision=model.revision,
                dtype=dtype,
                trust_remote_code=model.trust_remote_code,
                use_safetensors=True,
                device_map=device_map,
                **kwargs,
            )
        else:
            loaded = self._load_unmapped(folder, model, dtype, device_map, kwargs)
        if quantized:
            from pg_tune.models.quantize import check_quantized

            # bitsandbytes ignores what it does not understand: assert what is really in effect.
            print(f"quantization: {check_quantized(loaded, quantization, self).summary()}")
        return loaded

    def _load_unmapped(
        self,
        folder: Path,
        model: ModelConfig,
        dtype: torch.dtype,
        device_map: str | dict | None,
        kwargs: dict[str, Any],
    ) -> PreTrainedModel:
        """``from_pretrained`` fed with the checkpoint's tensors read one by one (``shards``)."""
        from transformers import GenerationConfig

        from pg_tune.models.host_memory import fix_threshold_before_loading, release_free_memory
        from pg_tune.models.shards import lazy_state_dict

        fix_threshold_before_loading()  # freed blocks leave RSS
        # The family's own config class, as from_pretrained reads it (not AutoConfig: a family's
        # model type need not be registered with transformers' auto classes).
        config = self.model_class.config_class.from_pretrained(
            folder, trust_remote_code=model.trust_remote_code
        )
        loaded = self.model_class.from_pretrained(
            None,
            config=config,
            state_dict=lazy_state_dict(folder),
            dtype=dtype,
            trust_remote_code=model.trust_remote_code,
            device_map=device_map,
            **kwargs,
        )
        loaded.config._name_or_path = str(model.name_or_path)
        if (folder / "generation_config.json").is_file():
            loaded.generation_config = GenerationConfig.from_pretrained(folder)
        release_free_memory()  # what loading left in the heap
        return loaded

    def image_budget(self, processor: ProcessorMixin, sample: Sample | None = None) -> ImageBudget:
        """Positions and encoder passes of ``sample``'s image with this processor's settings (the
        image's size read from its header if the family's count depends on it), or of the largest
        image these settings allow when ``sample`` is None. Families with a fixed count override
        nothing else; the default is one pass of ``processor.image_seq_length`` tokens."""
        return ImageBudget(int(processor.image_seq_length))

    def image_input_bytes(self, side: int, budget: ImageBudget) -> int:
        """Bytes of one row's image inputs as the collator hands them over (``plan`` counts them for
        the whole step, the batch lives that long): fp32 pixels, 3 × ``side``² per encoder pass.
        Families with more per-pixel inputs (SmolVLM2's mask) add theirs."""
        return budget.encoder_passes * 3 * side**2 * 4

    def unwrap(self, model: nn.Module) -> PreTrainedModel:
        """The family's model class inside peft / DDP / FSDP / loss wrappers."""
        return unwrap_model(model, self.model_class)

    # ---- adaptation ----------------------------------------------------------------------------
    def lora_target_regex(self, lora: LoraConfig) -> str:
        """The peft ``target_modules`` regex for ``lora.targets`` / ``lora.vision``: the decoder's
        attention (q, k, v, o) or attention + MLP, the vision encoder's too if asked, and with
        ``all_linear`` the projector's linears."""
        lm_attention = r"self_attn\.(q_proj|k_proj|v_proj|o_proj)"
        lm_mlp = r"mlp\.(gate_proj|up_proj|down_proj)"
        vision_attention = r"self_attn\.(q_proj|k_proj|v_proj|out_proj)"
        vision_mlp = r"mlp\.(fc1|fc2)"
        with_mlp = lora.targets in ("attention_mlp", "all_linear")
        lm = f"({lm_attention}|{lm_mlp})" if with_mlp else lm_attention
        parts = [rf".*{self.lm_layers}\.{lm}"]
        if lora.vision:
            vision = f"({vision_attention}|{vision_mlp})" if with_mlp else vision_attention
            parts.append(rf".*{self.vision_layers}\.{vision}")
        if lora.targets == "all_linear" and self.projector_linears:
            parts.append(rf".*{self.projector_linears}")
        return "^(" + "|".join(parts) + ")$"

    def keep_unquantized(self, quantize_vision: bool = False) -> list[str]:
        """Full module paths bitsandbytes must leave in the model dtype (head, projector, vision)."""
        names = [self.modules.head, self.modules.projector]
        return names if quantize_vision else [*names, self.modules.vision]

    def vision_modules(self, core: nn.Module) -> list[nn.Module]:
        """The image encoder and projector (frozen-vision check, feature cache)."""
        return [core.get_submodule(self.modules.vision), core.get_submodule(self.modules.projector)]

    def vision_frozen(self, core: nn.Module) -> bool:
        """True when nothing that produces image features trains."""
        return not any(p.requires_grad for m in self.vision_modules(core) for p in m.parameters())

    def decoder_layers(self, core: nn.Module) -> list[nn.Module]:
        """The language model's decoder layers, in order (``lm_layers``): ``pg-tune plan`` reads their
        norms and attention from them."""
        import re

        pattern = re.compile(self.lm_layers)
        return [module for name, module in core.named_modules() if pattern.fullmatch(name)]

    def layer_classes(self, core: nn.Module) -> list[str]:
        """Class names of the repeated blocks FSDP wraps one by one: the modules at ``lm_layers`` and
        ``vision_layers`` (decoder and vision encoder layers).

        Not transformers' ``_no_split_modules``: it names classes a model may not build (PaliGemma's
        ``SiglipTextEmbeddings``), which accelerate refuses when named, and sub-blocks instead of
        layers (SmolVLM2's ``SmolVLMVisionAttention``).
        """
        import re

        layers = re.compile(f"({self.lm_layers})|({self.vision_layers})")
        return sorted({type(m).__name__ for name, m in core.named_modules() if layers.fullmatch(name)})

    def image_features(self, core: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Projected image features for the batch's images, as ``decoder_hidden`` consumes them
        (``get_image_features(...).pooler_output``). A frozen vision side runs without autograd and
        over ``encoder_chunk`` pictures at a time (``ENCODER_POSITIONS``); a training one in one go."""
        if not self.vision_frozen(core):
            pixels = batch[self.image_inputs[0]].to(core.dtype)
            extra = [batch[k] for k in self.image_inputs[1:]]
            return core.model.get_image_features(pixels, *extra).pooler_output
        images = len(batch[self.image_inputs[0]])
        step = self.encoder_chunk(core.config.vision_config)
        chunks = []
        with torch.no_grad():
            for start in range(0, images, step):
                pixels, *extra = (batch[k][start : start + step] for k in self.image_inputs)
                chunks.append(core.model.get_image_features(pixels.to(core.dtype), *extra).pooler_output)
        return torch.cat(chunks)

    @staticmethod
    def encoder_chunk(vision_config) -> int:
        """Pictures (images, tiles, crops) a frozen encoder runs over at once: ``ENCODER_POSITIONS``
        patches' worth, at least one. What ``plan`` counts for the encoder's transient."""
        patches = (vision_config.image_size // vision_config.patch_size) ** 2
        return max(1, ENCODER_POSITIONS // patches)

    # ---- sequences -----------------------------------------------------------------------------
    @abc.abstractmethod
    def reserved_tokens(self, processor: ProcessorMixin | None) -> frozenset[str]:
        """Control strings refused inside sample text (``<image>``, ``<bos>``...); ``None``: the fixed ones."""

    def check_text(self, sample: Sample, reserved: Collection[str]) -> None:
        """Raise ``DataError`` naming the row if its prompt or target text (a pair's rejected answer
        too) holds a reserved token."""
        from pg_tune.data.sample import DataError

        fields = [("prefix", sample.prefix), ("suffix", sample.suffix), ("rejected", sample.rejected or "")]
        for field_name, text in fields:
            found = sorted(t for t in reserved if t and t in text)
            if found:
                error = DataError(
                    f"{sample.source}: field {field_name!r} contains {', '.join(found)}, a control token of "
                    f"{self.name} models: it would be read as that token, not as text; remove it from the data"
                )
                error.reason = "reserved_token"  # type: ignore[attr-defined]
                raise error

    def check_task(self, sample: Sample) -> None:
        """Raise ``DataError`` naming the row if the family cannot do its task (reason ``unsupported_task``)."""
        from pg_tune.data.sample import DataError

        if sample.task not in self.tasks:
            error = DataError(f"{sample.source}: {unsupported_task_message(self, sample.task)}")
            error.reason = "unsupported_task"  # type: ignore[attr-defined]
            raise error

    @abc.abstractmethod
    def render_prompt(self, sample: Sample) -> str:
        """The prompt text the model sees for ``sample`` (before the family's own wrapping)."""

    @abc.abstractmethod
    def render_target(self, sample: Sample) -> str:
        """The target text: ``sample.suffix`` for raw rows, else rendered from ``sample.targets``."""

    @abc.abstractmethod
    def collator(
        self,
        processor: ProcessorMixin,
        max_text_length: int,
        train: bool = True,
        pad_to_multiple_of: int = 1,
    ) -> Collator:
        """The collator building training (``train=True``) or generation batches, each padded to its
        longest row rounded up to a multiple of ``pad_to_multiple_of`` (``data.pad_to_multiple_of``)."""

    # ---- the pieces of the fused suffix-only loss ----------------------------------------------
    def decoder_hidden(
        self, core: nn.Module, batch: Mapping[str, torch.Tensor], image_features: torch.Tensor
    ) -> torch.Tensor:
        """Last hidden states ``[batch, seq, hidden]`` of the decoder for the whole sequence, the image
        features placed at the image tokens, the family's attention-rule inputs passed."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        outputs = core.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            **{k: batch[k] for k in self.attention_inputs},
            mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=image_features)},
            use_cache=False,
        )
        return outputs.last_hidden_state

    def head(self, core: nn.Module) -> tuple[torch.Tensor, float | None]:
        """The LM head weight ``[vocab, hidden]`` and the final logit soft-cap the model applies (or None)."""
        softcap = getattr(core.config.get_text_config(), "final_logit_softcapping", None)
        return core.lm_head.weight, softcap if self.final_softcap else None

    # ---- generation and parsing ----------------------------------------------------------------
    def generation_inputs(
        self, batch: Mapping[str, torch.Tensor], dtype: torch.dtype
    ) -> dict[str, torch.Tensor]:
        """The subset of a generation batch ``model.generate`` takes, images in ``dtype``."""
        keys = ("input_ids", "attention_mask", *self.attention_inputs, *self.image_inputs)
        inputs = {k: batch[k] for k in keys}
        inputs[self.image_inputs[0]] = inputs[self.image_inputs[0]].to(dtype)
        return inputs

    @abc.abstractmethod
    def generation_kwargs(self, processor: ProcessorMixin) -> dict[str, Any]:
        """Token ids for ``generate``: ``eos_token_id``, ``pad_token_id``."""

    @abc.abstractmethod
    def decode(self, processor: ProcessorMixin, token_ids: Sequence[int]) -> str:
        """Generated ids (after the prompt) to text, cut at the end token, task tokens kept."""

    @abc.abstractmethod
    def parse_output(
        self,
        text: str,
        task: str,
        image_size: tuple[int, int],
        token_logprobs: Sequence[tuple[int, int, float]] | None = None,
    ) -> list[ParsedObject]:
        """Objects in generated text (box tasks); ``[]`` when nothing valid; never raises on text.

        ``token_logprobs`` (``(start, end, logprob)`` per generated token, when the caller kept them)
        give each object a confidence from the tokens that wrote it. Masks are decoded with the bound
        ``mask_codec`` when the family has one.
        """

    def check_model_config(self, model: ModelConfig, at_load: bool = True) -> None:
        """Refuse loading settings the family cannot use safely (remote code: a pinned commit, opt-in).

        A family whose model code lives only on the Hub (``requires_remote_code``) runs that code on
        this machine: ``model.revision`` must be a full commit hash (a branch or tag can move to new
        code) and, when loading (``at_load``), the ``--trust-remote-code`` flag must be given (a recipe
        cannot set it). Other families never need remote code. A hub id this family's name hints
        match but it cannot load (``refused_hints``) is refused by name.
        """
        import re

        lowered = str(model.name_or_path).lower()
        for hint, why in self.refused_hints.items():
            if hint in lowered and not Path(model.name_or_path).exists():
                raise ValueError(f"model.name_or_path={model.name_or_path!r}: {why}")
        if not self.requires_remote_code or is_tiny_preset(model.name_or_path):
            return
        if not (isinstance(model.revision, str) and re.fullmatch(r"[0-9a-f]{40}", model.revision)):
            raise ValueError(
                f"model.revision: {self.name} runs remote code, so pin the commit it runs: a 40-hex commit "
                f"hash from the repo's history, got {model.revision!r} (a branch or tag can move)"
            )
        if at_load and not model.trust_remote_code:
            raise ValueError(
                f"{self.name} models run code from their Hub repo: read that code at the pinned revision, "
                "then pass --trust-remote-code on the command line (it stays off unless asked)"
            )

    # ---- the context window --------------------------------------------------------------------
    @abc.abstractmethod
    def sequence_overhead(self, processor: ProcessorMixin) -> int:
        """The most positions a sample's sequence holds beyond its ``data.max_text_length`` budget:
        image tokens of the largest image the processor makes, and the template around them."""

    def context_positions(self, config: Any) -> int | None:
        """Positions the decoder can attend over (``max_position_embeddings`` of the text config)."""
        return getattr(config.get_text_config(), "max_position_embeddings", None)

    def check_context(self, config: Any, processor: ProcessorMixin, max_text_length: int) -> None:
        """Refuse a ``data.max_text_length`` whose longest sequence (image tokens included) would run
        past the model's context; ``ConfigError`` naming the key and the largest value that fits."""
        from pg_tune.config.schema import ConfigError

        positions = self.context_positions(config)
        if positions is None:
            return
        overhead = self.sequence_overhead(processor)
        if overhead + max_text_length > positions:
            raise ConfigError(
                f"data.max_text_length={max_text_length}: with up to {overhead} image and template tokens a "
                f"sequence reaches {overhead + max_text_length} positions, past the model's context of {positions} "
                f"positions (max_position_embeddings of its text config); set data.max_text_length to at most "
                f"{positions - overhead}"
            )

    def offline_config(self, model: ModelConfig) -> Any | None:
        """The model's config without the network: a tiny preset's, a local folder's, pg_tune's copy of a
        published one, or the hub cache's; None when none is at hand (``validate`` then cannot check)."""
        from transformers import AutoConfig

        name = model.name_or_path
        if self.is_tiny(name):
            return self.tiny_module.build_config(self.tiny_module.PRESETS[name])
        if Path(name).is_dir():
            return AutoConfig.from_pretrained(name, trust_remote_code=False)
        if (published := self.published_config(name)) is not None:
            return published
        try:
            return AutoConfig.from_pretrained(name, revision=model.revision, local_files_only=True)
        except (OSError, ValueError):
            return None

    def load_mask_codec(self, vae_path: str | Path | None) -> Any | None:
        """The family's mask tokenizer (PaliGemma: big_vision's VQ-VAE), or None if it has none."""
        return None

    # ---- measurement ---------------------------------------------------------------------------
    @abc.abstractmethod
    def reference_batch(
        self, processor: ProcessorMixin, samples: Sequence[Sample]
    ) -> dict[str, torch.Tensor]:
        """A training batch built as the Hugging Face examples for this model build it (with the model's
        own ``labels``): the reference side of ``pg_tune.measure.bench``, never used for training."""

    # ---- export and hub ------------------------------------------------------------------------
    def serving_chat_template(self, processor: ProcessorMixin) -> str | None:
        """A chat template that serving engines apply to OpenAI chat messages, written into exports as
        ``chat_template.jinja`` when the family's processor has none; None keeps the processor's own."""
        return None

    @abc.abstractmethod
    def usage_snippet(self, base_id: str | None, repo_or_dir: str, merged: bool) -> str:
        """Markdown for the model card: how to load the adapter (or merged model) and prompt it."""


# One line per family: model_type / preset names are read from the class, imported on first use.
_REGISTRY: dict[str, str] = {
    "paligemma": "pg_tune.models.paligemma.family:PaliGemmaFamily",
    "gemma3": "pg_tune.models.chat.gemma3:Gemma3Family",
    "smolvlm": "pg_tune.models.chat.smolvlm:SmolVLMFamily",
}


def _load(spec: str) -> type[ModelFamily]:
    module, _, cls = spec.partition(":")
    return getattr(importlib.import_module(module), cls)


def family_names() -> list[str]:
    """Registered family names."""
    return sorted(_REGISTRY)


def is_tiny_preset(name: str) -> bool:
    """True for a tiny preset name of any family (and not a folder of that name)."""
    if Path(name).exists():
        return False
    return any(name in _load(spec).tiny_presets for spec in _REGISTRY.values())


def _model_type_of(source: Any) -> str | None:
    config = getattr(source, "config", source)
    model_type = getattr(config, "model_type", None)
    if isinstance(model_type, str) and model_type:
        return model_type
    if isinstance(source, (str, Path)):
        import json

        folder = Path(source)
        if (folder / "config.json").is_file():
            return json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
        if (folder / "adapter_config.json").is_file():  # a peft adapter: the family of its base
            base = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8")).get(
                "base_model_name_or_path"
            )
            return family_for(base).model_types[0] if isinstance(base, str) and base else None
    return None


def family_for(source: Any) -> ModelFamily:
    """The family of a tiny preset name, a family name, a local checkpoint folder, a config or a model.

    Hub ids that are not on disk are resolved from a cached ``config.json`` (never the network),
    else from the family's ``name_hints`` (``google/paligemma2-3b-pt-224`` -> PaliGemma).
    """
    families = [_load(spec) for spec in _REGISTRY.values()]
    if isinstance(source, str) and not Path(source).exists():
        for family in families:
            if source in family.tiny_presets or source == family.name:
                return family()
        if Path(source).is_absolute() or source.startswith((".", "~")) or source.count("/") > 1:
            raise FileNotFoundError(f"{source}: no such folder (a hub id is OWNER/NAME)")
    model_type = _model_type_of(unwrap_model(source) if isinstance(source, nn.Module) else source)
    if model_type is None and isinstance(source, (str, Path)) and Path(source).is_dir():
        from pg_tune.models.source import require_safetensors

        require_safetensors(str(source))  # pickled weights only: the conversion hint
        raise FileNotFoundError(
            f"{source}: not a model folder in the Hugging Face layout: config.json (naming its model_type) "
            "and model.safetensors are needed, plus the processor files"
        )
    if model_type is None and isinstance(source, (str, Path)):
        try:
            from transformers import AutoConfig

            model_type = AutoConfig.from_pretrained(str(source), local_files_only=True).model_type
        except (OSError, ValueError):
            name = str(source).lower()
            for family in families:
                if any(hint in name for hint in family.name_hints):
                    return family()
    for family in families:
        if model_type in family.model_types:
            return family()
    known = {t for f in families for t in f.model_types} | {p for f in families for p in f.tiny_presets}
    raise ValueError(
        f"no model family for {source if isinstance(source, (str, Path)) else type(source).__name__!r} "
        f"(model_type={model_type!r}); supported: {', '.join(sorted(known))}. A new family is one module "
        "in pg_tune/models/ plus one line in pg_tune/models/family.py's _REGISTRY (docs/architecture.md)"
    )


def load_family(name_or_path: str, vae_path: str | Path | None = None) -> ModelFamily:
    """The family of ``name_or_path`` (``family_for``) with its mask tokenizer bound: what each command
    resolves once at its boundary and passes on. ``vae_path`` is the recipe's ``model.vae_path`` (or
    the command line's ``--vae-path``); families without mask tokens ignore it."""
    family = family_for(name_or_path)
    family.mask_codec = family.load_mask_codec(vae_path)
    return family


# ---- what each family supports -----------------------------------------------------------------


def families_supporting(task: str) -> list[str]:
    """Names of the registered families that can render and parse ``task``."""
    return [name for name in family_names() if task in family_for(name).tasks]


def unsupported_task_message(family: ModelFamily, task: str) -> str:
    """Why ``family`` cannot train or score ``task``, and which families can."""
    others = ", ".join(families_supporting(task)) or "none"
    why = " (it has no mask tokens)" if task == "refer_segment" else ""
    return f"model family {family.name!r} cannot do task {task}{why}; families that support it: {others}"


def unsupported_feature_cache_message(family: ModelFamily) -> str:
    """Why ``family``'s image features cannot be cached, and which families' can."""
    others = ", ".join(n for n in family_names() if family_for(n).cacheable_image_features) or "none"
    return (
        f"model family {family.name!r} cannot use data.feature_cache: the number of its image features "
        f"varies per image; families that support it: {others}"
    )


def _checkpoint_folder(model: ModelConfig) -> Path | None:
    """The folder holding ``model``'s safetensors files: a local folder, or a hub id's snapshot
    (downloaded as ``from_pretrained`` would); None when there is none to read tensor by tensor."""
    folder = Path(model.name_or_path)
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(
                snapshot_download(
                    model.name_or_path,
                    revision=model.revision,
                    allow_patterns=["*.safetensors", "*.json", "*.py"],
                )
            )
        except Exception:  # noqa: BLE001 (offline, gated, not found: from_pretrained says why)
            return None
    has_index = (folder / "model.safetensors.index.json").is_file()
    return folder if has_index or (folder / "model.safetensors").is_file() else None


def unwrap_model(model: nn.Module, cls: type | None = None) -> nn.Module:
    """The model inside peft / DDP / FSDP / loss wrappers (an instance of ``cls`` when given)."""
    import peft

    seen = model
    for _ in range(8):
        if cls is not None and isinstance(seen, cls):
            return seen
        if isinstance(seen, peft.PeftModel):
            seen = seen.get_base_model()
        elif isinstance(seen, torch.nn.parallel.DistributedDataParallel) or hasattr(
            seen, "_fsdp_wrapped_module"
        ):
            seen = seen.module
        elif cls is None and hasattr(seen, "config") and hasattr(seen, "generate"):
            return seen
        elif isinstance(getattr(seen, "model", None), torch.nn.Module):
            seen = seen.model
        else:
            break
    if cls is None:
        return seen
    raise TypeError(f"no {cls.__name__} inside {type(model).__name__}")
