"""Tiny PaliGemma models and a small tokenizer with the real special-token layout, built offline.

Nothing here downloads anything: the tests, the embedded demo and the benchmark build their
models from these configs in-process. The tokenizer is a real ``GemmaTokenizer`` (BPE with byte
fallback, spaces as "▁") whose ids match PaliGemma's where it matters:

====================  =================
token                 id
====================  =================
``<pad>``             0
``<eos>``             1
``<bos>``             2
``<unk>``             3
``"\\n"``             108
``<loc0000>``         256000 .. 257023
``<seg000>``          257024 .. 257151
``<image>``           257152
====================  =================

Its ordinary vocabulary is small (bytes, characters and a few hundred whole words); the ids between
it and 256000 are unused fillers, so embedding tables have the real 257,216 rows.

Run ``python -m pg_tune.models.tiny OUT_DIR [--preset tiny-paligemma2]`` to write a checkpoint in
the Hugging Face hub's layout (config, safetensors, processor files).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken
from transformers import (
    GemmaTokenizer,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
    SiglipImageProcessorPil,
)

from pg_tune.models.paligemma.layout import (
    BOS_ID,
    EOS_ID,
    IMAGE_TOKEN,
    IMAGE_TOKEN_ID,
    LOC_TOKENS,
    NEWLINE_ID,
    PAD_ID,
    SEG_TOKENS,
    TEXT_VOCAB_SIZE,
)
from pg_tune.models.tiny import CHARS, WORDS, add_pieces, init_random, word_merges, write_checkpoint


@dataclass(frozen=True)
class TinyPreset:
    """Widths of a tiny PaliGemma; ``text_model_type`` picks Gemma (PaliGemma 1) or Gemma 2."""

    text_model_type: str = "gemma"
    image_size: int = 112
    patch_size: int = 14
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 2
    vision_mlp: int = 128
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 2
    text_kv_heads: int = 1
    text_head_dim: int = 32
    text_mlp: int = 128
    initializer_range: float = 0.02


PRESETS: dict[str, TinyPreset] = {
    # A wider initialisation than real checkpoints (0.02): with a random, tied 257,216-row
    # embedding table at 0.02 the logits stay near zero and LoRA has nothing to sharpen; at 0.3 the
    # demo learns its task in about a minute (README, "The demo").
    # PaliGemma 2 first: a family's first preset is the one the family contract trains.
    "tiny-paligemma2": TinyPreset(text_model_type="gemma2", initializer_range=0.3),
    "tiny-paligemma": TinyPreset(text_model_type="gemma", initializer_range=0.3),
    # The benchmark shape named in the performance issue: real vocabulary, 224 px, small widths.
    "bench-mini": TinyPreset(
        text_model_type="gemma",
        image_size=224,
        patch_size=14,
        vision_hidden=128,
        vision_layers=4,
        vision_heads=4,
        vision_mlp=512,
        text_hidden=256,
        text_layers=4,
        text_heads=4,
        text_kv_heads=1,
        text_head_dim=64,
        text_mlp=1024,
    ),
    # PaliGemma 2 3B @224 with random weights, for GPU benchmarks (about 3B parameters).
    "paligemma2-3b-224-shape": TinyPreset(
        text_model_type="gemma2",
        image_size=224,
        patch_size=14,
        vision_hidden=1152,
        vision_layers=27,
        vision_heads=16,
        vision_mlp=4304,
        text_hidden=2304,
        text_layers=26,
        text_heads=8,
        text_kv_heads=4,
        text_head_dim=256,
        text_mlp=9216,
    ),
}


def build_tokenizer() -> GemmaTokenizer:
    """A small Gemma tokenizer whose special and location/segmentation ids match PaliGemma's."""
    vocab: dict[str, int] = {"<pad>": PAD_ID, "<eos>": EOS_ID, "<bos>": BOS_ID, "<unk>": 3, "<mask>": 4}
    for i in range(5, NEWLINE_ID):
        vocab[f"<unused{i - 5}>"] = i
    vocab["\n"] = NEWLINE_ID
    merges, words = word_merges(f for word in WORDS for f in (word, "▁" + word))
    pieces = [f"<0x{b:02X}>" for b in range(256)] + ["▁"] + CHARS + words
    next_id = add_pieces(vocab, pieces, NEWLINE_ID + 1)
    while next_id < TEXT_VOCAB_SIZE:
        vocab[f"<unused_filler{next_id}>"] = next_id
        next_id += 1
    for token in LOC_TOKENS + SEG_TOKENS:
        vocab[token] = next_id
        next_id += 1
    tokenizer = GemmaTokenizer(vocab=vocab, merges=merges)
    # Registered as added tokens so that each is always ONE token, never split into characters.
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in LOC_TOKENS + SEG_TOKENS])
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [AddedToken(IMAGE_TOKEN, normalized=False, special=True)]}
    )
    assert tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) == IMAGE_TOKEN_ID
    tokenizer.add_bos_token = False
    tokenizer.add_eos_token = False
    return tokenizer


def build_processor(preset: TinyPreset) -> PaliGemmaProcessor:
    """PaliGemma's processor around the tiny tokenizer and a SigLIP image processor."""
    image_processor = SiglipImageProcessorPil(
        size={"height": preset.image_size, "width": preset.image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        resample=3,  # bicubic, as PaliGemma's checkpoints ship
    )
    image_processor.image_seq_length = (preset.image_size // preset.patch_size) ** 2
    return PaliGemmaProcessor(image_processor=image_processor, tokenizer=build_tokenizer())


def build_config(preset: TinyPreset) -> PaliGemmaConfig:
    text_config = {
        "model_type": preset.text_model_type,
        "hidden_size": preset.text_hidden,
        "num_hidden_layers": preset.text_layers,
        "num_attention_heads": preset.text_heads,
        "num_key_value_heads": preset.text_kv_heads,
        "head_dim": preset.text_head_dim,
        "intermediate_size": preset.text_mlp,
        "vocab_size": TEXT_VOCAB_SIZE + 1024 + 128 + 64,  # 257216, as PaliGemma ships
        "max_position_embeddings": 8192,
        "pad_token_id": PAD_ID,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "initializer_range": preset.initializer_range,
    }
    if preset.text_model_type == "gemma2":
        # big_vision transfers PaliGemma 2 with the final logit soft-cap off ("better for transfer").
        text_config.update(final_logit_softcapping=None, attn_logit_softcapping=50.0, sliding_window=4096)
    vision_config = {
        "model_type": "siglip_vision_model",
        "hidden_size": preset.vision_hidden,
        "num_hidden_layers": preset.vision_layers,
        "num_attention_heads": preset.vision_heads,
        "intermediate_size": preset.vision_mlp,
        "patch_size": preset.patch_size,
        "image_size": preset.image_size,
        "vision_use_head": False,
        "initializer_range": preset.initializer_range,
    }
    return PaliGemmaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=IMAGE_TOKEN_ID,
        projection_dim=preset.text_hidden,
        hidden_size=preset.text_hidden,
        vocab_size=text_config["vocab_size"],
    )


def build_base(preset_name: str, seed: int = 0) -> PaliGemmaForConditionalGeneration:
    """A randomly initialised PaliGemma of the named preset (fp32, CPU), the same for a given seed."""
    if preset_name not in PRESETS:
        raise ValueError(f"unknown tiny preset {preset_name!r}; choose one of {sorted(PRESETS)}")
    return init_random(PaliGemmaForConditionalGeneration, build_config(PRESETS[preset_name]), seed)


def build_model(
    preset_name: str, seed: int = 0
) -> tuple[PaliGemmaForConditionalGeneration, PaliGemmaProcessor]:
    """``build_base`` and the preset's processor."""
    model = build_base(preset_name, seed)
    return model, build_processor(PRESETS[preset_name])


def save_checkpoint(preset_name: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny checkpoint in the hub's layout, loadable with ``from_pretrained`` alone."""
    return write_checkpoint(*build_model(preset_name, seed=seed), out_dir)
