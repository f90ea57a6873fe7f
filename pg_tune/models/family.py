"""The model-family interface: everything a generic module needs to know about one kind of model.

Generic code (collation, the fused suffix-only loss, generation, scoring, the feature cache,
quantization, LoRA, export, the model card) never names a model class or a token id; it asks the
``ModelFamily`` that ``family_for`` picks from a checkpoint's ``config.model_type`` or a tiny preset
name. A new family is one module implementing this class, its tiny presets, one line in
``_REGISTRY`` below, and its recipes (docs/architecture.md, "How to add a model family";
``pg_tune/models/paligemma.py`` is the worked example).

The sequence contract every family keeps, whatever its layout: a batch from ``collator(...)`` holds
``input_ids``, ``attention_mask``, ``labels`` (training: -100 everywhere but the target and its end
token), the family's own attention-rule and image inputs (PaliGemma: ``token_type_ids``,
``pixel_values``; SmolVLM: ``pixel_attention_mask``), ``sample_index`` and ``truncated``.
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

    from pg_tune.config.recipe import LoraConfig, ModelConfig, QuantizationConfig
    from pg_tune.data.sample import Sample

__all__ = [
    "Collator",
    "ModelFamily",
    "ModulePaths",
    "ParsedObject",
    "family_for",
    "family_names",
    "is_tiny_preset",
    "resolve_dtype",
    "unwrap_model",
]

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


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


class Collator(Protocol):
    """Turns ``(index, Sample)`` pairs into a model batch (see the module docstring's contract)."""

    train: bool
    family: ModelFamily

    def __call__(self, batch: Sequence[tuple[int, Sample]]) -> dict[str, torch.Tensor]: ...

    def text_batch(self, batch: Sequence[tuple[int, Sample]]) -> dict[str, torch.Tensor]: ...

    def text_length(self, sample: Sample) -> tuple[int, int]:
        """Text tokens of the encoded row (image tokens excluded) and before any truncation."""
        ...


class ModelFamily(abc.ABC):
    """What pg_tune needs of one model family; one instance per run, no per-run state inside."""

    name: ClassVar[str]
    """Short name used in messages and the registry ("paligemma")."""
    model_types: ClassVar[tuple[str, ...]]
    """``config.model_type`` values this family serves."""
    tiny_presets: ClassVar[tuple[str, ...]]
    """Preset names it builds offline (tests, demo, benchmarks)."""
    tasks: ClassVar[frozenset[str]]
    """Tasks it can render and parse (``Sample.task`` values)."""
    requires_remote_code: ClassVar[bool] = False
    """True when the model code exists only on the Hub (then a pinned revision is required)."""
    modules: ClassVar[ModulePaths]
    """Where the language model, vision encoder, projector and head sit in the model."""
    model_class: ClassVar[type]
    """The transformers class of a full model (export, model card)."""
    processor_class: ClassVar[type]
    """The transformers processor class (export, model card)."""
    hub_tags: ClassVar[tuple[str, ...]] = ()
    """Extra model-card tags."""
    name_hints: ClassVar[tuple[str, ...]] = ()
    """Lower-case substrings of hub ids that name this family when no config is at hand offline."""

    # ---- loading -------------------------------------------------------------------------------
    @abc.abstractmethod
    def load_processor(self, model: ModelConfig) -> ProcessorMixin:
        """The processor of a hub id, a local folder or a tiny preset."""

    @abc.abstractmethod
    def load_model(
        self,
        model: ModelConfig,
        quantization: QuantizationConfig | None = None,
        device_map: str | dict | None = None,
    ) -> PreTrainedModel:
        """The model of a hub id, a local folder or a tiny preset, in the recipe's dtype."""

    def unwrap(self, model: nn.Module) -> PreTrainedModel:
        """The family's model class inside peft / DDP / FSDP / loss wrappers."""
        return unwrap_model(model, self.model_class)

    # ---- adaptation ----------------------------------------------------------------------------
    @abc.abstractmethod
    def lora_target_regex(self, lora: LoraConfig) -> str:
        """The peft ``target_modules`` regex for the recipe's ``lora.targets`` / ``lora.vision``."""

    def keep_unquantized(self, quantize_vision: bool = False) -> list[str]:
        """Full module paths bitsandbytes must leave in the model dtype (head, projector, vision)."""
        names = [self.modules.head, self.modules.projector]
        return names if quantize_vision else [*names, self.modules.vision]

    def vision_modules(self, core: nn.Module) -> list[nn.Module]:
        """The image encoder and projector (frozen-vision check, feature cache)."""
        return [core.get_submodule(self.modules.vision), core.get_submodule(self.modules.projector)]

    @abc.abstractmethod
    def image_features(self, core: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Projected image features for the batch's images, as ``decoder_hidden`` consumes them."""

    # ---- sequences -----------------------------------------------------------------------------
    @abc.abstractmethod
    def reserved_tokens(self, processor: ProcessorMixin | None) -> frozenset[str]:
        """Control strings refused inside sample text (``<image>``, ``<bos>``...); ``None``: the fixed ones."""

    def check_text(self, sample: Sample, reserved: Collection[str]) -> None:
        """Raise ``DataError`` naming the row if its prompt or target text holds a reserved token."""
        from pg_tune.data.sample import DataError

        for field_name, text in (("prefix", sample.prefix), ("suffix", sample.suffix)):
            found = sorted(t for t in reserved if t and t in text)
            if found:
                error = DataError(
                    f"{sample.source}: field {field_name!r} contains {', '.join(found)}, a control token of "
                    f"{self.name} models: it would be read as that token, not as text; remove it from the data"
                )
                error.reason = "reserved_token"  # type: ignore[attr-defined]
                raise error

    @abc.abstractmethod
    def render_prompt(self, sample: Sample) -> str:
        """The prompt text the model sees for ``sample`` (before the family's own wrapping)."""

    @abc.abstractmethod
    def render_target(self, sample: Sample, mask_codec: Any | None = None) -> str:
        """The target text: ``sample.suffix`` for raw rows, else rendered from ``sample.targets``."""

    @abc.abstractmethod
    def collator(
        self, processor: ProcessorMixin, max_text_length: int, train: bool, mask_codec: Any | None = None
    ) -> Collator:
        """The collator building training (``train=True``) or generation batches."""

    # ---- the pieces of the fused suffix-only loss ----------------------------------------------
    @abc.abstractmethod
    def decoder_hidden(
        self, core: nn.Module, batch: Mapping[str, torch.Tensor], image_features: torch.Tensor
    ) -> torch.Tensor:
        """Last hidden states ``[batch, seq, hidden]`` of the decoder for the whole sequence."""

    @abc.abstractmethod
    def head(self, core: nn.Module) -> tuple[torch.Tensor, float | None]:
        """The LM head weight ``[vocab, hidden]`` and the final logit soft-cap (or None)."""

    # ---- generation and parsing ----------------------------------------------------------------
    @abc.abstractmethod
    def generation_inputs(
        self, batch: Mapping[str, torch.Tensor], dtype: torch.dtype
    ) -> dict[str, torch.Tensor]:
        """The subset of a generation batch ``model.generate`` takes, images in ``dtype``."""

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
        mask_codec: Any | None = None,
    ) -> list[ParsedObject]:
        """Objects in generated text (box tasks); ``[]`` when nothing valid; never raises on text."""

    def check_model_config(self, model: ModelConfig, at_load: bool = True) -> None:
        """Refuse loading settings the family cannot use safely (remote code: a pinned commit, opt-in).

        A family whose model code lives only on the Hub (``requires_remote_code``) runs that code on
        this machine: ``model.revision`` must be a full commit hash (a branch or tag can move to new
        code) and, when loading (``at_load``), the ``--trust-remote-code`` flag must be given (a recipe
        cannot set it). Other families never need remote code.
        """
        import re

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

    def load_mask_codec(self, vae_path: str | Path | None) -> Any | None:
        """The family's mask tokenizer (PaliGemma: big_vision's VQ-VAE), or None if it has none."""
        return None

    # ---- export and hub ------------------------------------------------------------------------
    @abc.abstractmethod
    def usage_snippet(self, base_id: str | None, repo_or_dir: str, merged: bool) -> str:
        """Markdown for the model card: how to load the adapter (or merged model) and prompt it."""


# One line per family: model_type / preset names are read from the class, imported on first use.
_REGISTRY: dict[str, str] = {
    "paligemma": "pg_tune.models.paligemma:PaliGemmaFamily",
    "gemma3": "pg_tune.models.gemma3:Gemma3Family",
    "smolvlm": "pg_tune.models.smolvlm:SmolVLMFamily",
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
    model_type = _model_type_of(unwrap_model(source) if isinstance(source, nn.Module) else source)
    if model_type is None and isinstance(source, (str, Path)) and Path(source).is_dir():
        from pg_tune.model_source import require_safetensors

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
