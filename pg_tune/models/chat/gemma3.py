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
  average-pooled 4 x 4 to 256 soft tokens; no pan-and-scan crops (one image = 256 tokens).
- No final logit soft-cap; the LM head is tied to the 262,208-row embedding table.

Box tasks are text (``pg_tune.models.chat.base``); there are no location or mask tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import Gemma3ForConditionalGeneration, Gemma3Processor

from pg_tune.data.sample import Sample
from pg_tune.models.chat import gemma3_tiny
from pg_tune.models.chat.base import ChatCollator, ChatFamily
from pg_tune.models.family import ModulePaths


class Gemma3Collator(ChatCollator):
    """Gemma 3 batches: one image per row, 256 soft tokens, ``token_type_ids`` on them."""

    def _images(self, samples: Sequence[Sample]) -> tuple[dict[str, torch.Tensor], list[str]]:
        images = self._load_images(samples)
        pixels = self.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixels}, [self.processor.full_image_sequence] * len(samples)

    def text_batch(self, batch):
        """Everything but ``pixel_values``: the image text is the same for every row."""
        return self._text_batch(batch, [self.processor.full_image_sequence] * len(batch))

    def _extra(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"token_type_ids": (input_ids == self.processor.tokenizer.image_token_id).long()}


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

    def user_turn(self, image_text: str, prompt: str) -> str:
        # The template trims text items ({{ item['text'] | trim }}).
        return f"<bos><start_of_turn>user\n{image_text}{prompt.strip()}<end_of_turn>\n<start_of_turn>model\n"

    def assistant_turn(self, target: str) -> tuple[str, str]:
        return target.strip(), "\n"

    def end_of_turn_id(self, processor) -> int:
        return processor.tokenizer.convert_tokens_to_ids("<end_of_turn>")

    def image_text(self, processor, sample: Sample | None) -> tuple[str, int]:
        """Every image is ``<start_of_image>``, ``image_seq_length`` soft tokens, ``<end_of_image>``."""
        return processor.full_image_sequence, 1
