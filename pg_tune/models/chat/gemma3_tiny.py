"""A tiny Gemma 3 with the real special-token layout, real tokenizer and processor, built offline.

The ids match ``google/gemma-3-4b-pt`` / ``-it`` where they matter (transformers' ``Gemma3Config``
defaults, ``models/gemma3/configuration_gemma3.py``; the turn ids from the checkpoints'
``tokenizer.json``):

======================  ===========
token                   id
======================  ===========
``<pad>``               0
``<eos>``               1
``<bos>``               2
``<unk>``               3
``<start_of_turn>``     105
``<end_of_turn>``       106
``"\\n"``               107
``"\\n\\n"``            108
``<start_of_image>``    255999  (``boi_token_index``)
``<end_of_image>``      256000  (``eoi_token_index``)
``<image_soft_token>``  262144  (``image_token_index``)
======================  ===========

The embedding table has the real 262,208 rows; the ordinary vocabulary is small (bytes,
characters, a few hundred whole words) and the ids in between are unused fillers.

The chat template is the one Gemma 3's instruction-tuned checkpoints ship (``chat_template`` of
``google/gemma-3-4b-it``, also used verbatim by transformers'
``tests/models/gemma3/test_processing_gemma3.py``); ``tests/models/test_gemma3.py`` pins its
rendered string.

Run ``python -m pg_tune.models.tiny OUT_DIR --preset tiny-gemma3`` to write the checkpoint in the hub's layout.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import AddedToken
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessorPil,
    Gemma3Processor,
    GemmaTokenizer,
)

from pg_tune.models.chat.base import INSTRUCTION_WORDS
from pg_tune.models.tiny import CHARS, WORDS, add_pieces, init_random, word_merges, write_checkpoint

PAD_ID, EOS_ID, BOS_ID = 0, 1, 2
START_OF_TURN_ID, END_OF_TURN_ID = 105, 106
NEWLINE_ID, DOUBLE_NEWLINE_ID = 107, 108
BOI_ID, EOI_ID, IMAGE_SOFT_TOKEN_ID = 255_999, 256_000, 262_144
VOCAB_SIZE = 262_208

BOI_TOKEN, EOI_TOKEN, IMAGE_SOFT_TOKEN = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"

# Gemma 3's chat template (google/gemma-3-4b-it), whitespace as published.
CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    '    {%- set first_user_prefix = "" -%}\n'
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    '        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}\n'
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    '        {%- set role = "model" -%}\n'
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    '        {{ raise_exception("Invalid content type") }}\n'
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\\n'}}\n"
    "{%- endif -%}\n"
)


@dataclass(frozen=True)
class TinyGemma3Preset:
    """Widths of a tiny Gemma 3: SigLIP -> average pool -> RMSNorm + projection -> Gemma 3 text."""

    image_size: int = 64
    patch_size: int = 8
    mm_tokens_per_image: int = 16  # a square; (image_size / patch_size)^2 patches are pooled to it
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
    sliding_window: int = 512
    initializer_range: float = 0.3  # wide, as the tiny PaliGemma presets: see models/tiny.py


PRESETS: dict[str, TinyGemma3Preset] = {
    "tiny-gemma3": TinyGemma3Preset(),
    # Gemma 3 4B's image path (896 px, 14 px patches, 4096 patches pooled to 256 soft tokens) with
    # small widths, for benchmarks at the real sequence length.
    "gemma3-bench-mini": TinyGemma3Preset(
        image_size=896,
        patch_size=14,
        mm_tokens_per_image=256,
        vision_hidden=128,
        vision_layers=2,
        vision_heads=4,
        vision_mlp=512,
        text_hidden=256,
        text_layers=4,
        text_heads=4,
        text_kv_heads=1,
        text_head_dim=64,
        text_mlp=1024,
        initializer_range=0.02,
    ),
}


@functools.lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, str], ...]]:
    vocab: dict[str, int] = {"<pad>": PAD_ID, "<eos>": EOS_ID, "<bos>": BOS_ID, "<unk>": 3, "<mask>": 4}
    vocab["[@BOS@]"] = 5
    for i in range(6, START_OF_TURN_ID):
        vocab[f"<unused{i - 6}>"] = i
    vocab[START_OF_TURN] = START_OF_TURN_ID
    vocab[END_OF_TURN] = END_OF_TURN_ID
    vocab["\n"] = NEWLINE_ID
    vocab["\n\n"] = DOUBLE_NEWLINE_ID
    forms = [f for word in [*WORDS, *INSTRUCTION_WORDS, "user", "model"] for f in (word, "▁" + word)]
    merges, words = word_merges(forms, first=[("\n", "\n")])
    pieces = [f"<0x{b:02X}>" for b in range(256)] + ["▁"] + CHARS + words
    next_id = add_pieces(vocab, pieces, DOUBLE_NEWLINE_ID + 1)
    image_ids = {BOI_ID: BOI_TOKEN, EOI_ID: EOI_TOKEN, IMAGE_SOFT_TOKEN_ID: IMAGE_SOFT_TOKEN}
    for token_id in range(next_id, IMAGE_SOFT_TOKEN_ID + 1):
        vocab[image_ids.get(token_id, f"<unused_filler{token_id}>")] = token_id
    return tuple(vocab.items()), tuple(merges)


def build_tokenizer() -> GemmaTokenizer:
    """A small Gemma tokenizer whose control and image ids match Gemma 3's."""
    vocab, merges = _vocab_and_merges()
    tokenizer = GemmaTokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        # As the released Gemma 3 tokenizer: text tokenized on its own starts with <bos>, so a string the
        # chat template already began with <bos> needs add_special_tokens=False (pg_tune's collator,
        # the reference batch and the model card's snippet all pass it).
        add_bos_token=True,
        # The names Gemma3Processor reads (tokenizer.boi_token, .eoi_token, .image_token and ids).
        extra_special_tokens={
            "image_token": IMAGE_SOFT_TOKEN,
            "boi_token": BOI_TOKEN,
            "eoi_token": EOI_TOKEN,
        },
    )
    tokenizer.add_special_tokens(
        {
            "extra_special_tokens": [
                AddedToken(t, normalized=False, special=True)
                for t in (START_OF_TURN, END_OF_TURN, BOI_TOKEN, EOI_TOKEN, IMAGE_SOFT_TOKEN)
            ]
        },
        replace_extra_special_tokens=False,
    )
    for token, token_id in (
        (START_OF_TURN, START_OF_TURN_ID),
        (END_OF_TURN, END_OF_TURN_ID),
        (BOI_TOKEN, BOI_ID),
    ):
        assert tokenizer.convert_tokens_to_ids(token) == token_id, token
    return tokenizer


def build_processor(preset: TinyGemma3Preset) -> Gemma3Processor:
    """``Gemma3Processor`` around the tiny tokenizer, Gemma 3's image processor and chat template."""
    image_processor = Gemma3ImageProcessorPil(
        size={"height": preset.image_size, "width": preset.image_size},
        image_mean=[0.5, 0.5, 0.5],  # Gemma 3's preprocessor_config: [-1, 1] like SigLIP
        image_std=[0.5, 0.5, 0.5],
        resample=2,  # bilinear, as Gemma 3's checkpoints ship
        do_pan_and_scan=False,
    )
    return Gemma3Processor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        chat_template=CHAT_TEMPLATE,
        image_seq_length=preset.mm_tokens_per_image,
    )


def build_config(preset: TinyGemma3Preset) -> Gemma3Config:
    text_config = {
        "model_type": "gemma3_text",
        "hidden_size": preset.text_hidden,
        "num_hidden_layers": preset.text_layers,
        "num_attention_heads": preset.text_heads,
        "num_key_value_heads": preset.text_kv_heads,
        "head_dim": preset.text_head_dim,
        "query_pre_attn_scalar": preset.text_head_dim,
        "intermediate_size": preset.text_mlp,
        "vocab_size": VOCAB_SIZE,
        "max_position_embeddings": 8192,
        "sliding_window": preset.sliding_window,
        # Gemma 3 interleaves 5 sliding-window layers with 1 global layer; keep both kinds.
        "layer_types": [
            "full_attention" if (i + 1) % 2 == 0 else "sliding_attention" for i in range(preset.text_layers)
        ],
        "pad_token_id": PAD_ID,
        "bos_token_id": BOS_ID,
        "eos_token_id": [EOS_ID, END_OF_TURN_ID],
        "initializer_range": preset.initializer_range,
        "final_logit_softcapping": None,
    }
    vision_config = {
        "model_type": "siglip_vision_model",
        "hidden_size": preset.vision_hidden,
        "num_hidden_layers": preset.vision_layers,
        "num_attention_heads": preset.vision_heads,
        "intermediate_size": preset.vision_mlp,
        "patch_size": preset.patch_size,
        "image_size": preset.image_size,
        "vision_use_head": False,
    }
    return Gemma3Config(
        text_config=text_config,
        vision_config=vision_config,
        mm_tokens_per_image=preset.mm_tokens_per_image,
        boi_token_index=BOI_ID,
        eoi_token_index=EOI_ID,
        image_token_index=IMAGE_SOFT_TOKEN_ID,
        initializer_range=preset.initializer_range,
    )


def build_base(preset_name: str, seed: int = 0) -> Gemma3ForConditionalGeneration:
    """A randomly initialised tiny Gemma 3 (fp32, CPU), the same for a given seed.

    transformers' ``_init_weights`` zero-initialises the projector's ``mm_input_projection_weight``
    (a trained checkpoint overwrites it), so a random model would see no image at all: every image
    feature exactly 0. It is drawn here like the other weights, normal(0, initializer_range /
    sqrt(vision width)), so projected features have about the scale of the text embeddings' rows and
    two images give two different outputs.
    """
    if preset_name not in PRESETS:
        raise ValueError(f"unknown Gemma 3 tiny preset {preset_name!r}; choose one of {sorted(PRESETS)}")
    preset = PRESETS[preset_name]
    model = init_random(Gemma3ForConditionalGeneration, build_config(preset), seed)
    weight = model.model.multi_modal_projector.mm_input_projection_weight
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        weight.normal_(
            0.0,
            preset.initializer_range * preset.text_hidden**0.5 / preset.vision_hidden**0.5,
            generator=generator,
        )
    return model


def save_checkpoint(preset_name: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny checkpoint in the hub's layout, loadable with ``from_pretrained`` alone."""
    return write_checkpoint(build_base(preset_name, seed), build_processor(PRESETS[preset_name]), out_dir)
