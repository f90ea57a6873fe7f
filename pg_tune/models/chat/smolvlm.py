"""SmolVLM2 (``SmolVLMForConditionalGeneration``, ``SmolVLMProcessor``): 256M, 500M and 2.2B.

The sequence, as SmolVLM2's chat template and processor render one user turn and the answer::

    <|im_start|>User:
    <fake_token_around_image><row_1_col_1><image> x T ... <fake_token_around_image><row_r_col_c><image> x T\\n
    \\n<fake_token_around_image><global-img><image> x T<fake_token_around_image>   (the image, expanded)
    {prompt}<end_of_utterance>\\nAssistant:
     {target}<end_of_utterance>\\n                                                 (training only)

- The image processor resizes the image to its longest edge (``size``), cuts it into ``rows x
  cols`` tiles of the encoder's size plus one global view of the whole image; each tile is ``T``
  image tokens after the connector's pixel shuffle (SmolVLM2-256M/500M: 512 px tiles, T = 64;
  2.2B: 384 px, T = 81). So the number of image tokens depends on each image's aspect ratio and
  ``pixel_values`` is ``[batch, max_tiles, 3, tile, tile]`` with all-zero padding tiles, which the
  model drops; ``pixel_attention_mask`` marks the real pixels of each tile.
- Attention is causal everywhere (no token types); labels cover `` {target}`` and its
  ``<end_of_utterance>``; the template's newline after it, the prompt and the pads are -100.
- The head is a separate ``lm_head`` (untied in SmolVLMConfig's default), no soft-cap.

Box tasks are text (``pg_tune.models.chat.base``); there are no location or mask tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from transformers import SmolVLMForConditionalGeneration, SmolVLMImageProcessorPil, SmolVLMProcessor
from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string
from transformers.utils import is_torchvision_available

from pg_tune.config.recipe import ModelConfig
from pg_tune.data.images import image_size
from pg_tune.data.sample import Sample
from pg_tune.models.chat import smolvlm_tiny
from pg_tune.models.chat.base import ChatCollator, ChatFamily
from pg_tune.models.family import EngineSupport, ImageBudget, ModulePaths


class SmolVLMCollator(ChatCollator):
    """SmolVLM2 batches: tiles + global view per image, ``pixel_attention_mask``."""

    def _images(self, samples: Sequence[Sample]) -> tuple[dict[str, torch.Tensor], list[str]]:
        processed = self.processor.image_processor(
            images=[[image] for image in self._load_images(samples)],
            return_tensors="pt",
            return_row_col_info=True,
        )
        processor = self.processor
        texts = [
            get_image_prompt_string(
                rows[0],
                cols[0],
                processor.image_seq_len,
                fake_token_around_image=processor.fake_image_token,
                image_token=processor.image_token,
                global_image_token=processor.global_image_token,
            )
            for rows, cols in zip(processed["rows"], processed["cols"], strict=True)
        ]
        # The processor's mask is int64, one value per pixel of every tile (17 tiles at 512 px: 36 MB a
        # row, copied again inside get_image_features); the model only tests it for non-zero (and
        # builds a bool one itself when none is given), so it travels as bool: 1/8 of that.
        pixels = {
            "pixel_values": processed["pixel_values"],
            "pixel_attention_mask": processed["pixel_attention_mask"].bool(),
        }
        return pixels, texts


class SmolVLMFamily(ChatFamily):
    """SmolVLM / SmolVLM2 (``model_type`` ``smolvlm``)."""

    name = "smolvlm"
    model_types = ("smolvlm",)
    tiny_module = smolvlm_tiny
    tiny_presets = tuple(smolvlm_tiny.PRESETS)
    modules = ModulePaths(
        language_model="model.text_model",
        vision="model.vision_model",
        projector="model.connector",
        head="lm_head",
    )
    model_class = SmolVLMForConditionalGeneration
    processor_class = SmolVLMProcessor
    hub_tags = ("smolvlm",)
    name_hints = ("smolvlm",)
    refused_hints = {
        "smolvlm-": "SmolVLM (v1) is an Idefics3 model (model_type idefics3), which pg_tune has no family "
        "for; the smolvlm family fine-tunes SmolVLM2: HuggingFaceTB/SmolVLM2-256M-Video-Instruct, "
        "-500M-Video-Instruct or -2.2B-Instruct"
    }
    fixed_reserved = frozenset(
        {
            "<|im_start|>",
            "<|im_end|>",
            "<end_of_utterance>",
            "<fake_token_around_image>",
            "<image>",
            "<global-img>",
        }
    )
    lm_layers = r"model\.text_model\.layers\.\d+"
    vision_layers = r"model\.vision_model\.encoder\.layers\.\d+"
    projector_linears = r"model\.connector\.modality_projection\.proj"
    image_inputs = ("pixel_values", "pixel_attention_mask")  # tiles, and the real pixels of each
    cacheable_image_features = False  # tiles: the number of features varies per image
    final_softcap = False  # SmolVLMForConditionalGeneration applies no final_logit_softcapping
    collator_class = SmolVLMCollator
    serving_engines = {
        "vllm": EngineSupport(
            serves=True, lora=True, chat=True,
            source="vLLM docs/models/supported_models.md (commit 0046f770): SmolVLMForConditionalGeneration "
            "(SmolVLM2), LoRA yes, no pipeline parallelism",
        ),
        "sglang": EngineSupport(
            serves=False,
            source="SGLang docs/supported_models/text_generation/multimodal_language_models.md (commit "
            "01fd8153): SmolVLM is not listed",
        ),
        "tgi": EngineSupport(
            serves=False,
            source="TGI docs, supported_models: Idefics 3 is listed, SmolVLM2 (SmolVLMForConditionalGeneration) is not",
        ),
    }  # fmt: skip

    def published_config(self, name_or_path: str):
        """SmolVLM2-256M's published config (``smolvlm_shapes.py``), by hub id."""
        from pg_tune.models.chat.smolvlm_shapes import shape_config, shape_of_hub_id

        shape = shape_of_hub_id(name_or_path)
        return shape_config(shape) if shape is not None else None

    def published_processor(self, name_or_path: str) -> SmolVLMProcessor | None:
        """SmolVLM2-256M's published image settings (longest edge 2048, 512 px tiles), tiny tokenizer."""
        from pg_tune.models.chat.smolvlm_shapes import build_processor, shape_of_hub_id

        shape = shape_of_hub_id(name_or_path)
        return build_processor(shape) if shape is not None else None

    image_settings = ("longest_edge", "splitting")

    def configure_processor(self, processor: SmolVLMProcessor, image) -> SmolVLMProcessor:
        """``model.image.longest_edge`` resizes before tiling; ``splitting: false`` keeps the global view only."""
        if image.longest_edge is not None:
            processor.image_processor.size = {"longest_edge": image.longest_edge}
        if image.splitting is not None:
            processor.image_processor.do_image_splitting = image.splitting
        return processor

    def _processor(self, model: ModelConfig) -> SmolVLMProcessor:
        """The processor; without torchvision its video part is a stand-in (pg_tune passes no videos)."""
        if self.is_tiny(model.name_or_path) or is_torchvision_available():
            return super()._processor(model)
        from transformers import AutoTokenizer

        kwargs = {"revision": model.revision, "trust_remote_code": model.trust_remote_code}
        processor_dict, _ = SmolVLMProcessor.get_processor_dict(model.name_or_path, **kwargs)
        image_processor = SmolVLMImageProcessorPil.from_pretrained(model.name_or_path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(model.name_or_path, **kwargs)
        args = [image_processor, tokenizer, smolvlm_tiny.video_processor_stand_in()]
        processor_dict = {
            k: v for k, v in processor_dict.items() if k not in SmolVLMProcessor.get_attributes()
        }
        return SmolVLMProcessor.from_args_and_dict(args, processor_dict)

    def user_turn(self, image_text: str, prompt: str) -> str:
        # The template writes "User:" when the first content item is the image, then the items.
        return f"<|im_start|>User:{image_text}{prompt}<end_of_utterance>\nAssistant:"

    def assistant_turn(self, target: str) -> tuple[str, str]:
        return " " + target, "\n"

    def end_of_turn_id(self, processor) -> int:
        return processor.tokenizer.convert_tokens_to_ids(processor.end_of_utterance_token)

    def image_text(self, processor, sample: Sample | None) -> tuple[str, int]:
        """Tiles and global view as the image processor cuts an image of this size
        (``get_number_of_image_patches``, the same arithmetic as its resize and split); the largest
        is a square at the processor's longest edge."""
        images = processor.image_processor
        if sample is None:
            height = width = int(images.size["longest_edge"])
        else:
            width, height = sample.image_size or image_size(sample.image, sample.source)
        tiles, rows, cols = images.get_number_of_image_patches(height, width)
        text = get_image_prompt_string(
            rows,
            cols,
            processor.image_seq_len,
            fake_token_around_image=processor.fake_image_token,
            image_token=processor.image_token,
            global_image_token=processor.global_image_token,
        )
        return text, max(tiles, 1)

    def image_input_bytes(self, side: int, budget: ImageBudget) -> int:
        """The pixels, and ``pixel_attention_mask``: one bool per pixel of every tile (the collator's)."""
        return super().image_input_bytes(side, budget) + budget.encoder_passes * side**2

    def image_features(self, core: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Connector output of every real tile, concatenated: ``[image tokens in the batch, hidden]``."""
        if "pixel_attention_mask" not in batch:
            raise ValueError(
                "SmolVLM2's image features need the collator's pixel_attention_mask, and their length varies "
                "per image (tiles), so data.feature_cache cannot store them: remove data.feature_cache"
            )
        pixels, mask = batch["pixel_values"], batch["pixel_attention_mask"]
        if not self.vision_frozen(core):
            return torch.cat(core.model.get_image_features(pixels.to(core.dtype), mask).pooler_output)
        # Frozen: the real tiles in batch order (get_image_features' own rule: padding tiles are all
        # zero), a few at a time (``ModelFamily.encoder_chunk``), one "image" of them per call.
        tiles, tile_masks = pixels.flatten(0, 1), mask.flatten(0, 1)
        real = tiles.flatten(1).ne(0).any(1).nonzero().squeeze(1)
        step = self.encoder_chunk(core.config.vision_config)
        parts = real.split(step) if len(real) else [torch.arange(len(tiles))]  # no real tile: as one call
        chunks = []
        with torch.no_grad():
            for part in parts:
                chunk = tiles[part].unsqueeze(0).to(core.dtype), tile_masks[part].unsqueeze(0)
                # pooler_output: one [tiles x tokens, hidden] tensor per row, here the one "image"
                chunks += core.model.get_image_features(*chunk).pooler_output
        return torch.cat(chunks)
