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

Box tasks are text (``pg_tune.models.chat``); there are no location or mask tokens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from transformers import Gemma3ForConditionalGeneration, Gemma3Processor
from transformers.modeling_outputs import BaseModelOutputWithPooling

from pg_tune.data.sample import Sample
from pg_tune.models import gemma3_tiny
from pg_tune.models.chat import ChatCollator, ChatFamily
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
    fixed_reserved = frozenset(
        {"<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>"}
        | {"<image_soft_token>"}
    )
    lm_layers = r"model\.language_model\.layers\.\d+"
    vision_layers = r"model\.vision_tower\.(vision_model\.)?encoder\.layers\.\d+"
    projector_linears = None  # a bare projection matrix (mm_input_projection_weight), no nn.Linear
    collator_class = Gemma3Collator

    def user_turn(self, image_text: str, prompt: str) -> str:
        # The template trims text items ({{ item['text'] | trim }}).
        return f"<bos><start_of_turn>user\n{image_text}{prompt.strip()}<end_of_turn>\n<start_of_turn>model\n"

    def assistant_turn(self, target: str) -> tuple[str, str]:
        return target.strip(), "\n"

    def end_of_turn_id(self, processor) -> int:
        return processor.tokenizer.convert_tokens_to_ids("<end_of_turn>")

    def image_features(self, core: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """SigLIP + pooling + projection ``[batch, 256, text_hidden]``; no autograd when frozen."""
        with torch.no_grad() if self._vision_frozen(core) else contextlib.nullcontext():
            return core.model.get_image_features(batch["pixel_values"].to(core.dtype)).pooler_output

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

    def generation_inputs(
        self, batch: Mapping[str, torch.Tensor], dtype: torch.dtype
    ) -> dict[str, torch.Tensor]:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids", "pixel_values")}
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        return inputs
