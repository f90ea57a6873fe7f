"""PaliGemma 1 and 2: the worked example of ``pg_tune.models.family.ModelFamily``.

PaliGemma 1 (Gemma) and PaliGemma 2 (Gemma 2) share one class in transformers,
``PaliGemmaForConditionalGeneration``, and one processor, so one module serves both. Everything
PaliGemma-specific lives in this folder: loading and LoRA targets (here), the training /
generation sequence (``collator.py``), ``<loc>``/``<seg>`` rendering of structured targets
(big_vision's encodings: ``boxes.py``, ``masks.py``) and parsing them back (big_vision's evaluator
rules, here), tiny and real-shape presets (``tiny.py``, ``shapes.py``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor

from pg_tune.data.sample import DataError, Sample
from pg_tune.evaluate.metrics.detection import object_confidence
from pg_tune.models.family import EngineSupport, ModelFamily, ModulePaths, ParsedObject
from pg_tune.models.paligemma import tiny
from pg_tune.models.paligemma.boxes import (
    MAX_LOC,
    NUM_SEG_TOKENS,
    OBJECT_SEPARATOR,
    encode_box,
    parse_detection_spans,
    parse_detections,
)
from pg_tune.models.paligemma.collator import PaliGemmaCollator
from pg_tune.models.paligemma.layout import EOS_ID, IMAGE_TOKEN
from pg_tune.tasks import TASKS

__all__ = ["PaliGemmaFamily"]

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


# A chat template that hands the user's text to the engine as the prompt. PaliGemma has none of its
# own, so OpenAI chat requests fail on engines that need one (vllm#11471, #12052). The engine's
# PaliGemma processor adds the image tokens, <bos> and the closing "\n" itself, exactly as
# transformers' PaliGemmaProcessor does; the template adds nothing, so the user text IS the prefix.
PASS_THROUGH_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] != 'user' -%}"
    "{{ raise_exception('PaliGemma takes one user message: an image and its prompt, e.g. caption en') }}"
    "{%- elif message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

_VLLM_DOCS = "vLLM docs/models/supported_models.md (commit 0046f770)"
_SGLANG_DOCS = "SGLang docs/supported_models/text_generation/multimodal_language_models.md (commit 01fd8153)"
_TGI_DOCS = "TGI docs, supported_models (huggingface.co/docs/text-generation-inference/supported_models)"


class PaliGemmaFamily(ModelFamily):
    """PaliGemma 1 and 2 (``PaliGemmaForConditionalGeneration``), big_vision's task encodings."""

    name = "paligemma"
    model_types = ("paligemma",)
    tiny_module = tiny
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
    lm_layers = r"model\.language_model\.layers\.\d+"
    vision_layers = r"model\.vision_tower\.(vision_model\.)?encoder\.layers\.\d+"
    projector_linears = r"model\.multi_modal_projector\.linear"
    attention_inputs = ("token_type_ids",)  # prefix-LM: 0 on image + prompt (both ways), 1 on the suffix
    hub_tags = ("paligemma",)
    name_hints = ("paligemma",)
    serving_engines = {
        "vllm": EngineSupport(
            serves=True, lora=True, chat=True,
            source=f"{_VLLM_DOCS}: PaliGemmaForConditionalGeneration, LoRA yes; LoRA since vllm#31656; "
            "chat template: vllm#11471, #12052",
            note="one image per prompt; LoRA needs a vLLM from January 2026 or later (vllm#31656); vLLM has "
            "dropped <loc> tokens from detection output before (vllm#7115): compare with pg-tune predict",
        ),
        "sglang": EngineSupport(serves=False, source=f"{_SGLANG_DOCS}: PaliGemma is not listed"),
        "tgi": EngineSupport(
            serves=True, chat=False, source=f"{_TGI_DOCS}: PaliGemma listed; TGI is in maintenance mode",
            note="no chat endpoint: POST /generate with the image inlined as ![](data:...) before the prompt",
        ),
    }  # fmt: skip
    image_settings_note = (
        "the image tokens are fixed by the checkpoint's resolution (224 / 448 / 896 px: 256 / 1,024 / "
        "4,096 tokens); choose the checkpoint of the resolution you want (e.g. google/paligemma2-3b-pt-448)"
    )

    def published_config(self, name_or_path: str) -> PaliGemmaConfig | None:
        """The published configs of PaliGemma 1/2 checkpoints (``shapes.py``), by hub id."""
        from pg_tune.models.paligemma.shapes import shape_config, shape_of_hub_id

        shape = shape_of_hub_id(name_or_path)
        return shape_config(shape) if shape is not None else None

    def published_processor(self, name_or_path: str) -> PaliGemmaProcessor | None:
        """``PaliGemmaProcessor`` at a published checkpoint's resolution (the tiny tokenizer)."""
        from pg_tune.models.paligemma.shapes import _SIGLIP_SO400M, SHAPES, shape_of_hub_id

        shape = shape_of_hub_id(name_or_path)
        if shape is None:
            return None
        patch = _SIGLIP_SO400M["patch_size"]
        return tiny.build_processor(tiny.TinyPreset(image_size=SHAPES[shape].image_size, patch_size=patch))

    def sequence_overhead(self, processor) -> int:
        """``<image>`` x N before the text; bos, prompt, newline, target and eos are the text budget."""
        return int(processor.image_seq_length)

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

    def render_target(self, sample: Sample) -> str:
        """``<loc..>x4[<seg..>x16][ label]`` per object, joined by `` ; `` (big_vision's encodings)."""
        if not sample.targets:
            return sample.suffix
        if sample.image_size is None:
            raise DataError(f"{sample.source}: structured targets need the image size")
        parts = []
        for obj in sample.targets:
            tokens = encode_box(obj.box, sample.image_size)
            if sample.task == "refer_segment":
                if self.mask_codec is None:
                    raise ValueError(
                        f"{sample.source}: segmentation targets need the mask VQ-VAE: set model.vae_path to "
                        "big_vision's vae-oid.npz"
                    )
                mask = obj.rasterise(sample.image_size)
                if mask is None:
                    raise DataError(f"{sample.source}: a segment object has no mask")
                codes = self.mask_codec.encode_mask(mask, obj.box, sample.image_size)
                tokens += "".join(f"<seg{c:03d}>" for c in codes)
            parts.append(f"{tokens} {obj.label}" if obj.label else tokens)
        return OBJECT_SEPARATOR.join(parts)

    def collator(
        self, processor, max_text_length: int, train: bool = True, pad_to_multiple_of: int = 1
    ) -> PaliGemmaCollator:
        return PaliGemmaCollator(
            self, processor, max_text_length, train=train, pad_to_multiple_of=pad_to_multiple_of
        )

    # generation and parsing
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
    ) -> list[ParsedObject]:
        """Referring tasks: big_vision's first-4-tokens rule; detection: every ``<loc>x4 label`` object.

        ``token_logprobs`` (``(start, end, logprob)`` per generated token, when the caller kept them)
        give each detection a confidence: exp(mean log-probability of the tokens that wrote it, its
        loc tokens and label), so COCO mAP ranks boxes by the model's belief, not by dataset order.
        """
        if not isinstance(text, str):
            return []
        if task in ("refer_detect", "refer_segment"):
            objects = _referring_object(text, task, image_size, self.mask_codec)
        else:
            objects = _detections(text, image_size, self.mask_codec)
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
        from pg_tune.models.paligemma.masks import load_codec

        return load_codec(vae_path)

    def reference_batch(self, processor, samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
        """The transformers docs' / HF posts' recipe: ``PaliGemmaProcessor(text, images, suffix=...)``."""
        from PIL import Image

        return processor(
            text=["<image>" + s.prefix for s in samples],
            images=[Image.open(s.image).convert("RGB") for s in samples],
            suffix=[s.suffix for s in samples],
            return_tensors="pt",
            padding="longest",
        )

    # export and hub
    def serving_chat_template(self, processor) -> str:
        """The pass-through template (``PASS_THROUGH_TEMPLATE``): the user's text is the task prefix."""
        return PASS_THROUGH_TEMPLATE

    def usage_snippet(self, base_id: str | None, repo_or_dir: str, merged: bool) -> str:
        model_cls, processor_cls = self.model_class.__name__, self.processor_class.__name__
        if merged:
            code = (
                f"from transformers import {model_cls}, {processor_cls}\n\n"
                f'model = {model_cls}.from_pretrained("{repo_or_dir}")\n'
                f'processor = {processor_cls}.from_pretrained("{repo_or_dir}")\n'
            )
        else:
            code = (
                "import torch\nfrom peft import PeftModel\n"
                f"from transformers import {model_cls}, {processor_cls}\n\n"
                f'base = {model_cls}.from_pretrained("{base_id or "BASE"}", dtype=torch.bfloat16)\n'
                f'model = PeftModel.from_pretrained(base, "{repo_or_dir}")\n'
                f'processor = {processor_cls}.from_pretrained("{repo_or_dir}")\n'
            )
        return (
            f"```python\n{code}```\n\n"
            "Prompts follow PaliGemma's layout: the image, then the task prefix (e.g. `caption en`) and a "
            "newline; the model writes the suffix.\n"
        )
