"""A tiny SmolVLM2 with the real special-token layout, real tokenizer and processor, built offline.

The ids match ``HuggingFaceTB/SmolVLM2-256M-Video-Instruct`` / ``-500M-`` (SmolLM2's 49,152-token
byte-level BPE vocabulary, then SmolVLM's added tokens; 49,280 embedding rows):

==============================  ================
token                           id
==============================  ================
``<|endoftext|>``               0  (unk)
``<|im_start|>``                1  (bos)
``<|im_end|>``                  2  (pad)
``<global-img>``                49152
``<row_1_col_1>`` ..            49153 .. 49188  (6 x 6 tile positions, row-major)
``<fake_token_around_image>``   49189
``<image>``                     49190
``<end_of_utterance>``          49279  (eos; ends every turn)
==============================  ================

The ordinary vocabulary is small (the 256 byte symbols, a few hundred whole words); the ids up to
49152 are unused fillers. The chat template is transformers' ``DEFAULT_CHAT_TEMPLATE`` of
``models/smolvlm/processing_smolvlm.py`` (the one SmolVLM2's checkpoints ship, with the video fix);
``tests/models/test_smolvlm.py`` pins its rendered string.

Images go through SmolVLM's own image processor: resized so the longest edge is ``size`` (a
multiple of the tile size), cut into ``rows x cols`` tiles of ``tile_size`` pixels plus one global
view resized to a single tile; each tile is ``tokens_per_tile`` image tokens after the vision
encoder and the connector's pixel shuffle. So the number of image tokens depends on the image's
aspect ratio.

SmolVLM's processor also holds a video processor, which needs torchvision; pg_tune trains on
images only, so when torchvision is missing the processor is built around the base
``BaseVideoProcessor`` (never called on images).

Run ``python -m pg_tune.models.tiny OUT_DIR --preset tiny-smolvlm2`` to write the checkpoint in the hub's layout.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, pre_tokenizers
from transformers import (
    GPT2Tokenizer,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMImageProcessorPil,
    SmolVLMProcessor,
    processing_utils,
)
from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE
from transformers.utils import is_torchvision_available
from transformers.video_processing_utils import BaseVideoProcessor, VideoProcessorMixin

from pg_tune.models.chat.base import INSTRUCTION_WORDS
from pg_tune.models.tiny import WORDS, add_pieces, init_random, word_merges, write_checkpoint

UNK_ID, BOS_ID, PAD_ID = 0, 1, 2
BASE_VOCAB = 49_152
GLOBAL_IMAGE_ID = 49_152
FAKE_TOKEN_AROUND_IMAGE_ID = 49_189
IMAGE_ID = 49_190
END_OF_UTTERANCE_ID = 49_279
VOCAB_SIZE = 49_280

GLOBAL_IMAGE_TOKEN = "<global-img>"
FAKE_TOKEN_AROUND_IMAGE = "<fake_token_around_image>"
IMAGE_TOKEN = "<image>"
END_OF_UTTERANCE = "<end_of_utterance>"
ROW_COL_TOKENS = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]

# SmolVLM's tokens after SmolLM2's vocabulary, in id order (49152 .. 49279).
_ADDED_TOKENS = (
    GLOBAL_IMAGE_TOKEN,
    *ROW_COL_TOKENS,
    FAKE_TOKEN_AROUND_IMAGE,
    IMAGE_TOKEN,
    *[f"<|reserved_special_token_{i}|>" for i in range(END_OF_UTTERANCE_ID - IMAGE_ID - 1)],
    END_OF_UTTERANCE,
)

CHAT_TEMPLATE = DEFAULT_CHAT_TEMPLATE


@dataclass(frozen=True)
class TinySmolVLMPreset:
    """Widths of a tiny SmolVLM2: SigLIP tiles -> pixel shuffle -> linear -> SmolLM2 (Llama)."""

    tile_size: int = 32  # the vision encoder's image_size (SmolVLM2-256M: 512)
    patch_size: int = 8  # (SmolVLM2-256M: 16)
    scale_factor: int = 2  # pixel shuffle (SmolVLM2-256M: 4): tokens per tile = (tile/patch/scale)^2
    longest_edge: int = 96  # images are resized to this longest edge, then tiled (SmolVLM2: 2048)
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 2
    vision_mlp: int = 128
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 2
    text_kv_heads: int = 1
    text_mlp: int = 128
    initializer_range: float = 0.3  # wide, as the tiny PaliGemma presets: see models/tiny.py

    @property
    def tokens_per_tile(self) -> int:
        return (self.tile_size // self.patch_size // self.scale_factor) ** 2


PRESETS: dict[str, TinySmolVLMPreset] = {
    "tiny-smolvlm2": TinySmolVLMPreset(),
    # SmolVLM2-256M's image path (512 px tiles, 16 px patches, pixel shuffle 4 -> 64 tokens a tile,
    # longest edge 2048 -> up to 4 x 4 tiles + 1 global) with small widths, for benchmarks.
    "smolvlm2-bench-mini": TinySmolVLMPreset(
        tile_size=512,
        patch_size=16,
        scale_factor=4,
        longest_edge=1024,
        vision_hidden=128,
        vision_layers=2,
        vision_heads=4,
        vision_mlp=512,
        text_hidden=256,
        text_layers=4,
        text_heads=4,
        text_kv_heads=1,
        text_mlp=1024,
        initializer_range=0.02,
    ),
}


@functools.lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, str], ...]]:
    """SmolLM2-style byte-level BPE: the 256 byte symbols, then merges making each word one piece."""
    vocab: dict[str, int] = {"<|endoftext|>": UNK_ID, "<|im_start|>": BOS_ID, "<|im_end|>": PAD_ID}
    for i in range(3, 17):
        vocab[f"<|reserved_special_{i}|>"] = i  # SmolLM2's other code/repo control tokens
    space, newline = "Ġ", "Ċ"  # byte-level spellings of " " and "\n"
    words = [*WORDS, *INSTRUCTION_WORDS, "User", "Assistant"]
    merges, pieces = word_merges([f for word in words for f in (word, space + word)] + [newline + newline])
    next_id = add_pieces(vocab, sorted(pre_tokenizers.ByteLevel.alphabet()) + pieces, 17)
    for token_id in range(next_id, BASE_VOCAB):
        vocab[f"<|filler_{token_id}|>"] = token_id
    for token_id, token in enumerate(_ADDED_TOKENS, start=BASE_VOCAB):
        vocab[token] = token_id
    return tuple(vocab.items()), tuple(merges)


def build_tokenizer() -> GPT2Tokenizer:
    """A small SmolLM2-style tokenizer whose control and image ids match SmolVLM2's."""
    vocab, merges = _vocab_and_merges()
    tokenizer = GPT2Tokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        unk_token="<|endoftext|>",
        bos_token="<|im_start|>",
        eos_token=END_OF_UTTERANCE,
        pad_token="<|im_end|>",
    )
    tokenizer.add_special_tokens(
        {"extra_special_tokens": [AddedToken(t, normalized=False, special=True) for t in _ADDED_TOKENS]},
        replace_extra_special_tokens=False,
    )
    for token, token_id in (
        (GLOBAL_IMAGE_TOKEN, GLOBAL_IMAGE_ID),
        (FAKE_TOKEN_AROUND_IMAGE, FAKE_TOKEN_AROUND_IMAGE_ID),
        (IMAGE_TOKEN, IMAGE_ID),
        (END_OF_UTTERANCE, END_OF_UTTERANCE_ID),
        ("<row_6_col_6>", 49_188),
    ):
        assert tokenizer.convert_tokens_to_ids(token) == token_id, token
    return tokenizer


def video_processor_stand_in() -> VideoProcessorMixin:
    """SmolVLM's own video processor, or a base one when torchvision is missing (no videos here).

    transformers 5.24 exports ``VideoProcessorMixin`` at its top level only when torchvision is
    installed, and ``ProcessorMixin`` looks the class up there by name (``processing_utils``) to type-check the
    ``video_processor`` argument; without torchvision that lookup fails before any video is seen.
    Registering the (always importable) class under its own name lets the processor be built.
    """
    if is_torchvision_available():
        from transformers import SmolVLMVideoProcessor

        return SmolVLMVideoProcessor()
    lookup = processing_utils.transformers_module
    if not hasattr(lookup, "VideoProcessorMixin"):
        lookup.VideoProcessorMixin = VideoProcessorMixin
    return BaseVideoProcessor(num_frames=64, fps=1)


def build_processor(preset: TinySmolVLMPreset) -> SmolVLMProcessor:
    """``SmolVLMProcessor`` around the tiny tokenizer and SmolVLM's image processor (tiling on)."""
    image_processor = SmolVLMImageProcessorPil(
        size={"longest_edge": preset.longest_edge},
        max_image_size={"longest_edge": preset.tile_size},
        image_mean=[0.5, 0.5, 0.5],  # SmolVLM2's preprocessor_config: [-1, 1]
        image_std=[0.5, 0.5, 0.5],
        do_image_splitting=True,
    )
    return SmolVLMProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        video_processor=video_processor_stand_in(),
        image_seq_len=preset.tokens_per_tile,
        chat_template=CHAT_TEMPLATE,
    )


def build_config(preset: TinySmolVLMPreset) -> SmolVLMConfig:
    text_config = {
        "model_type": "llama",
        "hidden_size": preset.text_hidden,
        "num_hidden_layers": preset.text_layers,
        "num_attention_heads": preset.text_heads,
        "num_key_value_heads": preset.text_kv_heads,
        "intermediate_size": preset.text_mlp,
        "vocab_size": VOCAB_SIZE,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "pad_token_id": PAD_ID,
        "bos_token_id": BOS_ID,
        "eos_token_id": END_OF_UTTERANCE_ID,
        "initializer_range": preset.initializer_range,
    }
    vision_config = {
        "hidden_size": preset.vision_hidden,
        "num_hidden_layers": preset.vision_layers,
        "num_attention_heads": preset.vision_heads,
        "intermediate_size": preset.vision_mlp,
        "patch_size": preset.patch_size,
        "image_size": preset.tile_size,
        "initializer_range": preset.initializer_range,
    }
    return SmolVLMConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=IMAGE_ID,
        scale_factor=preset.scale_factor,
        tie_word_embeddings=False,  # SmolVLMConfig's default: a separate lm_head
        pad_token_id=PAD_ID,
    )


def build_base(preset_name: str, seed: int = 0) -> SmolVLMForConditionalGeneration:
    """A randomly initialised tiny SmolVLM2 (fp32, CPU), the same for a given seed."""
    if preset_name not in PRESETS:
        raise ValueError(f"unknown SmolVLM2 tiny preset {preset_name!r}; choose one of {sorted(PRESETS)}")
    return init_random(SmolVLMForConditionalGeneration, build_config(PRESETS[preset_name]), seed)


def save_checkpoint(preset_name: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny checkpoint in the hub's layout, loadable with ``from_pretrained`` alone."""
    return write_checkpoint(build_base(preset_name, seed), build_processor(PRESETS[preset_name]), out_dir)
