"""PaliGemma 1 and 2: the worked example of ``pg_tune.models.family.ModelFamily``.

PaliGemma 1 (Gemma) and PaliGemma 2 (Gemma 2) share one class in transformers,
``PaliGemmaForConditionalGeneration``, and one processor, so one module serves both. Everything
PaliGemma-specific lives here: loading, LoRA targets, the training / generation sequence (below),
the image-feature and decoder entry points of the fused loss, ``<loc>``/``<seg>`` rendering of
structured targets (big_vision's encodings) and parsing them back (big_vision's evaluator rules).

Training rows are laid out exactly as big_vision and transformers' ``PaliGemmaProcessor`` do::

    <image> x N, <bos>, prefix, "\\n", suffix, <eos>, <pad> ...   (right padding)
    token_type_ids:  0 on the prefix side (image, bos, prefix, "\\n"), 1 on suffix + eos, 0 on pads
    labels:          -100 except on suffix + eos

``token_type_ids`` give the prefix-LM mask: the prefix side attends both ways, the suffix causally.
Only the suffix is ever truncated; image tokens and the prompt never are. Generation rows are
``<image> x N, <bos>, prefix, "\\n"`` with LEFT padding so every row ends where decoding starts.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PaliGemmaForConditionalGeneration, PaliGemmaProcessor
from transformers.modeling_outputs import BaseModelOutputWithPooling

from pg_tune.codecs.boxes import (
    MAX_LOC,
    NUM_SEG_TOKENS,
    OBJECT_SEPARATOR,
    encode_box,
    parse_detection_spans,
    parse_detections,
)
from pg_tune.config.recipe import LoraConfig, ModelConfig, QuantizationConfig
from pg_tune.data.collate import IGNORE_INDEX
from pg_tune.data.images import load_image
from pg_tune.data.sample import TASKS, DataError, Sample
from pg_tune.evaluate.metrics.detection import object_confidence
from pg_tune.model_source import require_safetensors
from pg_tune.models import tiny
from pg_tune.models.family import ModelFamily, ModulePaths, ParsedObject, resolve_dtype, unwrap_model
from pg_tune.models.layout import BOS_ID, EOS_ID, IMAGE_TOKEN, IMAGE_TOKEN_ID, PAD_ID

__all__ = [
    "PaliGemmaCollator",
    "PaliGemmaFamily",
    "base_model_of",
    "is_tiny",
    "load_model",
    "load_processor",
    "lora_target_regex",
    "resolve_dtype",
]

# Module-name patterns (peft's regex form) of each target preset: (language model, SigLIP).
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
    """The processor of a hub id, a local folder or a tiny preset."""
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

        kwargs["quantization_config"] = bnb_config(quantization, PaliGemmaFamily())
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
        print(f"quantization: {check_quantized(model, quantization, PaliGemmaFamily()).summary()}")
    return model


def base_model_of(model: nn.Module) -> PaliGemmaForConditionalGeneration:
    """The ``PaliGemmaForConditionalGeneration`` inside peft / DDP / loss wrappers."""
    return unwrap_model(model, PaliGemmaForConditionalGeneration)


# ---- the sequence --------------------------------------------------------------------------------


@dataclass
class EncodedRow:
    input_ids: list[int]
    token_type_ids: list[int]
    labels: list[int]
    truncated: bool
    untruncated_length: int


class PaliGemmaCollator:
    """Builds training (``train=True``) or generation batches from ``(index, Sample)`` pairs."""

    def __init__(self, processor, max_text_length: int, train: bool = True, mask_codec: Any | None = None):
        self.family = PaliGemmaFamily()
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        self.num_image_tokens: int = processor.image_seq_length
        self.max_text_length = max_text_length
        self.train = train
        self.mask_codec = mask_codec
        self.reserved = self.family.reserved_tokens(processor)
        self._targets: dict[str, str] = {}  # source -> rendered target (a <seg> encode runs the VQ-VAE)

    def _tokens(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _target(self, sample: Sample) -> str:
        if not sample.targets:
            return sample.suffix
        if sample.source not in self._targets:
            self._targets[sample.source] = self.family.render_target(sample, self.mask_codec)
        return self._targets[sample.source]

    def encode(self, sample: Sample) -> EncodedRow:
        """Token ids, token types and labels of one sample (no padding)."""
        self.family.check_text(sample, reserved=self.reserved)
        prompt = self.family.render_prompt(sample)
        prefix_ids = [IMAGE_TOKEN_ID] * self.num_image_tokens + [BOS_ID] + self._tokens(prompt + "\n")
        prefix_text_len = len(prefix_ids) - self.num_image_tokens
        if not self.train:
            if prefix_text_len > self.max_text_length:
                raise DataError(
                    f"{sample.source}: prompt is {prefix_text_len} tokens, over data.max_text_length="
                    f"{self.max_text_length}"
                )
            n = len(prefix_ids)
            return EncodedRow(prefix_ids, [0] * n, [IGNORE_INDEX] * n, False, prefix_text_len)
        suffix = self._target(sample)
        if not suffix.strip():
            raise DataError(f"{sample.source}: empty suffix: a training row needs a target to learn")
        suffix_ids = self._tokens(suffix) + [EOS_ID]
        room = self.max_text_length - prefix_text_len
        if room < 1:
            raise DataError(
                f"{sample.source}: prompt is {prefix_text_len} tokens, leaving no room for the suffix within "
                f"data.max_text_length={self.max_text_length}; raise it"
            )
        truncated = len(suffix_ids) > room
        full = prefix_text_len + len(suffix_ids)
        suffix_ids = suffix_ids[:room]
        return EncodedRow(
            input_ids=prefix_ids + suffix_ids,
            token_type_ids=[0] * len(prefix_ids) + [1] * len(suffix_ids),
            labels=[IGNORE_INDEX] * len(prefix_ids) + suffix_ids,
            truncated=truncated,
            untruncated_length=full,
        )

    def text_length(self, sample: Sample) -> tuple[int, int]:
        """Text tokens of the encoded row (image tokens excluded) and before any truncation."""
        row = self.encode(sample)
        return len(row.input_ids) - self.num_image_tokens, row.untruncated_length

    def __call__(self, batch: Sequence[tuple[int, Sample]]) -> dict[str, torch.Tensor]:
        out = self.text_batch(batch)
        images = [load_image(sample.image, sample.source) for _, sample in batch]
        out["pixel_values"] = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return out

    def text_batch(self, batch: Sequence[tuple[int, Sample]]) -> dict[str, torch.Tensor]:
        """Everything but ``pixel_values`` (the feature cache supplies image features instead)."""
        rows = [self.encode(sample) for _, sample in batch]
        length = max(len(r.input_ids) for r in rows)
        input_ids = torch.full((len(rows), length), PAD_ID, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        token_type_ids = torch.zeros((len(rows), length), dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row.input_ids)
            # Training pads on the right; generation on the left so every prompt ends at the same column.
            cols = slice(0, n) if self.train else slice(length - n, length)
            input_ids[i, cols] = torch.tensor(row.input_ids)
            attention_mask[i, cols] = 1
            token_type_ids[i, cols] = torch.tensor(row.token_type_ids)
            labels[i, cols] = torch.tensor(row.labels)
        out = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "token_type_ids": token_type_ids,
            "sample_index": torch.tensor([index for index, _ in batch], dtype=torch.long),
            "truncated": torch.tensor([r.truncated for r in rows], dtype=torch.bool),
        }
        if self.train:
            out["labels"] = labels
        return out


# ---- parsing: big_vision's referring rule ---------------------------------------------------------

_FIRST_FOUR_LOCS = re.compile(r"<loc(\d{4})><loc(\d{4})><loc(\d{4})><loc(\d{4})>")
_SIXTEEN_SEGS = re.compile(rf"(?:<seg\d{{3}}>){{{NUM_SEG_TOKENS}}}")
_SEG = re.compile(r"<seg(\d{3})>")


def _referring_object(
    text: str, task: str, image_size: tuple[int, int], mask_codec: Any | None
) -> list[ParsedObject]:
    """big_vision's segmentation evaluator: only the first 4 output tokens make the box.

    A non-location token among them, ``ymax <= ymin`` or ``xmax <= xmin`` is a miss (``[]``); the
    mask needs the next 16 tokens to be ``<seg>`` tokens, else the object has no mask.
    """
    match = _FIRST_FOUR_LOCS.match(text)
    if match is None:
        return []
    ymin, xmin, ymax, xmax = (int(v) for v in match.groups())
    if ymax <= ymin or xmax <= xmin:
        return []
    width, height = image_size
    box = (xmin / MAX_LOC * width, ymin / MAX_LOC * height, xmax / MAX_LOC * width, ymax / MAX_LOC * height)
    tokens: dict[str, Any] = {"loc": [ymin, xmin, ymax, xmax]}
    mask = None
    if task == "refer_segment":
        segs = _SIXTEEN_SEGS.match(text, match.end())
        if segs is not None:
            tokens["seg"] = [int(v) for v in _SEG.findall(segs.group(0))]
            if mask_codec is not None:
                mask = mask_codec.decode_mask(tokens["seg"], box, image_size)
    rest = text[match.end() :]
    label = _SEG.sub("", rest).partition(OBJECT_SEPARATOR.strip())[0]
    first = ParsedObject(label=label.strip(), box=box, mask=mask, tokens=tokens)
    # Rows with several reference objects (custom segment data) are matched over every object; the
    # ones after the first follow the lenient detection parser.
    _, separator, tail = rest.partition(OBJECT_SEPARATOR.strip())
    return [first, *(_detections(tail, image_size, mask_codec) if separator else [])]


def _detections(text: str, image_size: tuple[int, int], mask_codec: Any | None) -> list[ParsedObject]:
    return [
        ParsedObject(
            label=d.label,
            box=d.box,
            tokens={"loc": list(d.loc), **({"seg": list(d.seg)} if d.seg is not None else {})},
            mask=(
                mask_codec.decode_mask(d.seg, d.box, image_size)
                if mask_codec is not None and d.seg is not None
                else None
            ),
        )
        for d in parse_detections(text, image_size)
    ]


class PaliGemmaFamily(ModelFamily):
    """PaliGemma 1 and 2 (``PaliGemmaForConditionalGeneration``), big_vision's task encodings."""

    name = "paligemma"
    model_types = ("paligemma",)
    tiny_presets = tuple(tiny.PRESETS)
    tasks = frozenset(TASKS)
    modules = ModulePaths(
        language_model="model.language_model",
        vision="model.vision_tower",
        projector="model.multi_modal_projector",
        head="lm_head",
    )
    model_class = PaliGemmaForConditionalGeneration
    processor_class = PaliGemmaProcessor
    hub_tags = ("paligemma",)
    name_hints = ("paligemma",)

    # loading
    def load_processor(self, model: ModelConfig) -> PaliGemmaProcessor:
        return load_processor(model)

    def load_model(self, model, quantization=None, device_map=None) -> PaliGemmaForConditionalGeneration:
        return load_model(model, quantization, device_map)

    # adaptation
    def lora_target_regex(self, lora: LoraConfig) -> str:
        return lora_target_regex(lora)

    def image_features(self, core: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """SigLIP + projector output ``[batch, image_tokens, text_hidden]``; no autograd when frozen."""
        frozen = not any(p.requires_grad for m in self.vision_modules(core) for p in m.parameters())
        with torch.no_grad() if frozen else contextlib.nullcontext():
            return core.model.get_image_features(batch["pixel_values"].to(core.dtype)).pooler_output

    # sequences
    def reserved_tokens(self, processor) -> frozenset[str]:
        """Gemma's ``<bos>``/``<eos>``/``<pad>``/``<unk>`` and ``<image>``, plus the tokenizer's specials."""
        named = {"<bos>", "<eos>", "<pad>", "<unk>", IMAGE_TOKEN}
        if processor is not None:
            tokenizer = processor.tokenizer
            named |= {tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token}
            named |= set(getattr(tokenizer, "additional_special_tokens", None) or ())
        return frozenset(t for t in named if t)

    def render_prompt(self, sample: Sample) -> str:
        return sample.prefix

    def render_target(self, sample: Sample, mask_codec: Any | None = None) -> str:
        """``<loc..>x4[<seg..>x16][ label]`` per object, joined by `` ; `` (big_vision's encodings)."""
        if not sample.targets:
            return sample.suffix
        if sample.image_size is None:
            raise DataError(f"{sample.source}: structured targets need the image size")
        parts = []
        for obj in sample.targets:
            tokens = encode_box(obj.box, sample.image_size)
            if sample.task == "refer_segment":
                if mask_codec is None:
                    raise ValueError(
                        f"{sample.source}: segmentation targets need the mask VQ-VAE: set model.vae_path to "
                        "big_vision's vae-oid.npz"
                    )
                mask = obj.rasterise(sample.image_size)
                if mask is None:
                    raise DataError(f"{sample.source}: a segment object has no mask")
                codes = mask_codec.encode_mask(mask, obj.box, sample.image_size)
                tokens += "".join(f"<seg{c:03d}>" for c in codes)
            parts.append(f"{tokens} {obj.label}" if obj.label else tokens)
        return OBJECT_SEPARATOR.join(parts)

    def collator(self, processor, max_text_length: int, train: bool, mask_codec: Any | None = None):
        return PaliGemmaCollator(processor, max_text_length, train=train, mask_codec=mask_codec)

    # loss pieces
    def decoder_hidden(
        self, core: nn.Module, batch: Mapping[str, torch.Tensor], image_features: torch.Tensor
    ) -> torch.Tensor:
        outputs = core.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            token_type_ids=batch["token_type_ids"],
            mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=image_features)},
            use_cache=False,
        )
        return outputs.last_hidden_state

    def head(self, core: nn.Module) -> tuple[torch.Tensor, float | None]:
        softcap = getattr(core.config.get_text_config(), "final_logit_softcapping", None)
        return core.lm_head.weight, softcap

    # generation and parsing
    def generation_inputs(
        self, batch: Mapping[str, torch.Tensor], dtype: torch.dtype
    ) -> dict[str, torch.Tensor]:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids", "pixel_values")}
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        return inputs

    def generation_kwargs(self, processor) -> dict[str, Any]:
        return {"eos_token_id": EOS_ID, "pad_token_id": processor.tokenizer.pad_token_id}

    def decode(self, processor, token_ids: Sequence[int]) -> str:
        """Cut at ``<eos>``; ``<loc>``/``<seg>`` stay in the text (not special), other specials go."""
        ids = list(token_ids)
        if EOS_ID in ids:
            ids = ids[: ids.index(EOS_ID)]
        return processor.tokenizer.decode(ids, skip_special_tokens=True)

    def parse_output(
        self,
        text: str,
        task: str,
        image_size: tuple[int, int],
        token_logprobs: Sequence[tuple[int, int, float]] | None = None,
        mask_codec: Any | None = None,
    ) -> list[ParsedObject]:
        """Referring tasks: big_vision's first-4-tokens rule; detection: every ``<loc>x4 label`` object.

        ``token_logprobs`` (``(start, end, logprob)`` per generated token, when the caller kept them)
        give each detection a confidence: exp(mean log-probability of the tokens that wrote it, its
        loc tokens and label), so COCO mAP ranks boxes by the model's belief, not by dataset order.
        """
        if not isinstance(text, str):
            return []
        if task in ("refer_detect", "refer_segment"):
            objects = _referring_object(text, task, image_size, mask_codec)
        else:
            objects = _detections(text, image_size, mask_codec)
        if token_logprobs:
            if task in ("refer_detect", "refer_segment"):
                spans = [(0, len(text))] * len(objects)  # one answer, one object
            else:  # the same parser as _detections: same objects, same order
                spans = [span for _, span in parse_detection_spans(text, image_size)]
            objects = [
                ParsedObject(o.label, o.box, object_confidence(span, token_logprobs), o.mask, o.tokens)
                for o, span in zip(objects, spans, strict=True)
            ]
        return objects

    def load_mask_codec(self, vae_path: str | Path | None) -> Any | None:
        from pg_tune.codecs.masks import load_codec

        return load_codec(vae_path)

    # export and hub
    def usage_snippet(self, base_id: str | None, repo_or_dir: str, merged: bool) -> str:
        if merged:
            code = (
                "from transformers import PaliGemmaForConditionalGeneration, PaliGemmaProcessor\n\n"
                f'model = PaliGemmaForConditionalGeneration.from_pretrained("{repo_or_dir}")\n'
                f'processor = PaliGemmaProcessor.from_pretrained("{repo_or_dir}")\n'
            )
        else:
            code = (
                "import torch\nfrom peft import PeftModel\n"
                "from transformers import PaliGemmaForConditionalGeneration, PaliGemmaProcessor\n\n"
                f'base = PaliGemmaForConditionalGeneration.from_pretrained("{base_id or "BASE"}", dtype=torch.bfloat16)\n'
                f'model = PeftModel.from_pretrained(base, "{repo_or_dir}")\n'
                f'processor = PaliGemmaProcessor.from_pretrained("{repo_or_dir}")\n'
            )
        return (
            f"```python\n{code}```\n\n"
            "Prompts follow PaliGemma's layout: the image, then the task prefix (e.g. `caption en`) and a "
            "newline; the model writes the suffix.\n"
        )
