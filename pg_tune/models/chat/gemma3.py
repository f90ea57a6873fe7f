"""Gemma 3 (``Gemma3ForConditionalGeneration``, ``Gemma3Processor``): the 4B/12B/27B image models.

The sequence, as Gemma 3's chat template and processor render one user turn and the answer::

    <bos><start_of_turn>user\\n
    \\n\\n<start_of_image> <image_soft_token> x 256 <end_of_image>\\n\\n      (the image, expanded)
    {prompt}<end_of_turn>\\n<start_of_turn>model\\n
    {target}<end_of_turn>\\n                                                 (training only)

- ``token_type_ids`` are 1 on the image soft tokens and 0 elsewhere (``Gemma3Processor``'s
  ``mm_token_type_ids``): transformers builds from them the bidirectional attention inside each
  image; without them the image tokens attend causally, unlike pre-training.
- Labels cover the target and its ``<end_of_turn>``; the trailing newline, the prompt, the image
  and the pads are -100.
- SigLIP sees the image resized to a square (896 px for the released checkpoints), 4096 patches
  average-pooled 4 x 4 to 256 soft tokens: one image = 256 tokens. With ``model.image.pan_and_scan``
  a wide or tall picture also gets 2 to ``max_crops`` crops along its long side, each 256 more
  tokens, laid out as ``Gemma3Processor`` does ("Here is the original image ... and here are some
  crops to help you see better ...").
- No final logit soft-cap; the LM head is tied to the 262,208-row embedding table.

Box tasks are text (``pg_tune.models.chat.base``); there are no location or mask tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from transformers import Gemma3ForConditionalGeneration, Gemma3Processor

from pg_tune.data.images import image_size
from pg_tune.data.sample import Sample
from pg_tune.models.chat import gemma3_tiny
from pg_tune.models.chat.base import ChatCollator, ChatFamily
from pg_tune.models.family import EngineSupport, ModulePaths


class Gemma3Collator(ChatCollator):
    """Gemma 3 batches: one image per row, 256 soft tokens (per crop with pan and scan),
    ``token_type_ids`` on them."""

    def _images(self, samples: Sequence[Sample]) -> tuple[dict[str, torch.Tensor], list[str]]:
        images = self._load_images(samples)
        processed = self.processor.image_processor(images=images, return_tensors="pt")
        # With pan and scan, each image's crops follow it in pixel_values; num_crops says how many.
        crops = processed.get("num_crops")
        crops = [0] * len(samples) if crops is None else [int(n) for n in crops]
        texts = [image_sequence(self.processor, n) for n in crops]
        return {"pixel_values": processed["pixel_values"]}, texts

    def text_batch(self, batch):
        """Everything but ``pixel_values`` (the crops of pan and scan counted from each image's size)."""
        texts = [self.family.image_text(self.processor, sample)[0] for _, sample in batch]
        return self._text_batch(batch, texts)

    def _extra(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"token_type_ids": (input_ids == self.processor.tokenizer.image_token_id).long()}


def image_sequence(processor, crops: int) -> str:
    """The text standing for one image and its ``crops`` pan-and-scan crops, as ``Gemma3Processor``
    expands it (``replace_image_token``)."""
    whole = processor.full_image_sequence
    if not crops:
        return whole
    return f"Here is the original image {whole} and here are some crops to help you see better " + " ".join(
        [whole] * crops
    )


def pan_and_scan_crops(image_processor, width: int, height: int) -> int:
    """How many crops ``Gemma3ImageProcessor.pan_and_scan`` cuts from a ``width`` x ``height`` image
    (its arithmetic, without the pixels): 0 below the aspect ratio that activates it or when a crop
    would be under the minimum size, else 2 to ``pan_and_scan_max_num_crops`` along the long side."""
    if not image_processor.do_pan_and_scan:
        return 0
    ratio = image_processor.pan_and_scan_min_ratio_to_activate
    min_size = image_processor.pan_and_scan_min_crop_size
    most = image_processor.pan_and_scan_max_num_crops
    long, short = max(width, height), min(width, height)
    if long / short < ratio:
        return 0
    crops = min(int(math.floor(long / min_size)), int(math.floor(long / short + 0.5)))
    crops = min(most, max(2, crops))
    if min(int(math.ceil(long / crops)), short) < min_size:
        return 0
    return crops


class Gemma3Family(ChatFamily):
    """Gemma 3 with images (``model_type`` ``gemma3``)."""

    name = "gemma3"
    model_types = ("gemma3",)
    tiny_module = gemma3_tiny
    tiny_presets = tuple(gemma3_tiny.PRESETS)
    modules = ModulePaths(
        language_model="model.language_model",
        vision="model.vision_tower",
        projector="model.multi_modal_projector",
        head="lm_head",
    )
    model_class = Gemma3ForConditionalGeneration
    processor_class = Gemma3Processor
    hub_tags = ("gemma3",)
    name_hints = ("gemma-3-", "gemma3")
    refused_hints = {
        hint: "a text-only Gemma 3 (no vision tower, Gemma3ForCausalLM); the gemma3 family fine-tunes the "
        "image models: google/gemma-3-4b-pt (or -12b-pt, -27b-pt), or their -it versions"
        for hint in ("gemma-3-1b", "gemma-3-270m")
    }
    fixed_reserved = frozenset(
        {"<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>"}
        | {"<image_soft_token>"}
    )
    lm_layers = r"model\.language_model\.layers\.\d+"
    vision_layers = r"model\.vision_tower\.(vision_model\.)?encoder\.layers\.\d+"
    projector_linears = None  # a bare projection matrix (mm_input_projection_weight), no nn.Linear
    # 1 on the image soft tokens: bidirectional attention inside each image (Gemma3Processor's
    # mm_token_type_ids); without them transformers silently lets image tokens attend causally.
    attention_inputs = ("token_type_ids",)
    final_softcap = False  # Gemma3ForConditionalGeneration.forward never applies final_logit_softcapping
    collator_class = Gemma3Collator
    serving_engines = {
        "vllm": EngineSupport(
            serves=True, lora=True, chat=True,
            source="vLLM docs/models/supported_models.md (commit 0046f770): Gemma3ForConditionalGeneration, "
            "LoRA yes; tower LoRA unsupported: vllm#32758",
            note="LoRA on the language model only: an adapter on the vision tower must be merged first (vllm#32758)",
        ),
        "sglang": EngineSupport(
            serves=True, chat=True,
            source="SGLang docs/supported_models/text_generation/multimodal_language_models.md (commit "
            "01fd8153): Gemma 3 (Multimodal)",
            note="SGLang's LoRA docs name no vision-language model: serve the merged export",
        ),
        "tgi": EngineSupport(
            serves=True, chat=True,
            source="TGI docs, supported_models: Gemma3; TGI is in maintenance mode",
        ),
    }  # fmt: skip
    image_settings = ("pan_and_scan", "max_crops", "min_crop_size")

    def user_turn(self, image_text: str, prompt: str) -> str:
        # The template trims text items ({{ item['text'] | trim }}).
        return f"<bos><start_of_turn>user\n{image_text}{prompt.strip()}<end_of_turn>\n<start_of_turn>model\n"

    def assistant_turn(self, target: str) -> tuple[str, str]:
        return target.strip(), "\n"

    def end_of_turn_id(self, processor) -> int:
        return processor.tokenizer.convert_tokens_to_ids("<end_of_turn>")

    def image_text(self, processor, sample: Sample | None) -> tuple[str, int]:
        """``<start_of_image>``, ``image_seq_length`` soft tokens, ``<end_of_image>``; with pan and scan
        as many more as the image's crops (the most: ``pan_and_scan_max_num_crops``)."""
        images = processor.image_processor
        if sample is None:
            crops = images.pan_and_scan_max_num_crops if images.do_pan_and_scan else 0
        else:
            width, height = sample.image_size or image_size(sample.image, sample.source)
            crops = pan_and_scan_crops(images, width, height)
        return image_sequence(processor, crops), 1 + crops

    def reference_image_kwargs(self, processor) -> dict:
        """``Gemma3Processor`` turns pan and scan off in its call defaults: users pass it per call."""
        images = processor.image_processor
        if not images.do_pan_and_scan:
            return {}
        return {
            "do_pan_and_scan": True,
            "pan_and_scan_max_num_crops": images.pan_and_scan_max_num_crops,
            "pan_and_scan_min_crop_size": images.pan_and_scan_min_crop_size,
            "pan_and_scan_min_ratio_to_activate": images.pan_and_scan_min_ratio_to_activate,
        }

    def check_image_settings(self, image, feature_cache: bool = False) -> None:
        super().check_image_settings(image, feature_cache)
        if image.pan_and_scan and feature_cache:
            raise ValueError(
                "model.image.pan_and_scan: the number of crops varies per image, so data.feature_cache "
                "cannot store their features; remove data.feature_cache or pan_and_scan"
            )

    def configure_processor(self, processor, image):
        """``model.image.pan_and_scan`` (with ``max_crops`` / ``min_crop_size``) on the image processor;
        unset values keep the processor's, else transformers' defaults (4 crops, 256 px, ratio 1.2)."""
        images = processor.image_processor
        if image.pan_and_scan is not None:
            images.do_pan_and_scan = image.pan_and_scan
        if images.do_pan_and_scan:
            images.pan_and_scan_max_num_crops = image.max_crops or images.pan_and_scan_max_num_crops or 4
            images.pan_and_scan_min_crop_size = (
                image.min_crop_size or images.pan_and_scan_min_crop_size or 256
            )
            images.pan_and_scan_min_ratio_to_activate = images.pan_and_scan_min_ratio_to_activate or 1.2
        return processor
