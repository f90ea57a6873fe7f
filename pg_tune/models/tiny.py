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

import argparse
import itertools
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import AddedToken
from transformers import (
    GemmaTokenizer,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
    SiglipImageProcessorPil,
)

from pg_tune.models.layout import (
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

# Words the demo, the tests and the task prompts use, so they tokenize to one piece each.
_WORDS = """
a an the of on in at to and or with is are was it this that there what which where how many
caption cap describe en fr de es answer detect segment ocr question yes no
red green blue yellow purple orange black white gray grey brown pink
circle square triangle star shape shapes small large big left right top bottom middle center
cat cats dog dogs person people car cars bus tree trees house man woman child bird horse table
chair cup plate bottle sitting standing near next front behind picture image photo
one two three four five six seven eight nine ten
""".split()

_CHARS = [chr(c) for c in range(33, 127)]


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
    "tiny-paligemma": TinyPreset(text_model_type="gemma", initializer_range=0.3),
    "tiny-paligemma2": TinyPreset(text_model_type="gemma2", initializer_range=0.3),
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


def _bpe_split(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """How BPE with these merge ranks splits ``word`` (lowest rank merges first)."""
    parts = list(word)
    while len(parts) > 1:
        candidates = [
            (ranks.get((a, b), len(ranks) + 1), i) for i, (a, b) in enumerate(itertools.pairwise(parts))
        ]
        rank, i = min(candidates)
        if rank > len(ranks):
            break
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


def build_tokenizer() -> GemmaTokenizer:
    """A small Gemma tokenizer whose special and location/segmentation ids match PaliGemma's."""
    vocab: dict[str, int] = {"<pad>": PAD_ID, "<eos>": EOS_ID, "<bos>": BOS_ID, "<unk>": 3, "<mask>": 4}
    for i in range(5, NEWLINE_ID):
        vocab[f"<unused{i - 5}>"] = i
    vocab["\n"] = NEWLINE_ID
    next_id = NEWLINE_ID + 1
    pieces: list[str] = [f"<0x{b:02X}>" for b in range(256)] + ["▁"] + _CHARS
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in _WORDS:
        for form in (word, "▁" + word):
            # Each new merge ranks last, so it never changes how an earlier word splits: every
            # listed word ends as one piece.
            parts = _bpe_split(form, ranks)
            while len(parts) > 1:
                pair = (parts[0], parts[1])
                ranks[pair] = len(merges)
                merges.append(pair)
                pieces.append(pair[0] + pair[1])
                parts = [pair[0] + pair[1]] + parts[2:]
    for piece in pieces:
        if piece not in vocab:
            vocab[piece] = next_id
            next_id += 1
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


def init_random(model_class: type, config, seed: int):
    """A randomly initialised ``model_class(config)`` (fp32, CPU, eval mode), the same for a given seed.

    Built on the meta device, then given real (untouched) storage and initialised once: a tied LM
    head shares the large embedding table, and building eagerly would fill both tables first (about
    +260 MB of peak memory at bench-mini size) before tying them. Every family's tiny presets use it.
    """
    with torch.device("meta"):
        model = model_class(config)
    model.to_empty(device="cpu")
    model.tie_weights()  # a no-op for configs with tie_word_embeddings=False
    torch.manual_seed(seed)
    model.initialize_weights()
    model.eval()
    return model


def write_checkpoint(model, processor, out_dir: str | Path) -> Path:
    """Save a model and its processor into ``out_dir`` in the hub's layout."""
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def preset_main(doc: str | None, presets, default: str, save) -> None:
    """The ``python -m pg_tune.models.<family>_tiny OUT_DIR [--preset P] [--seed N]`` command."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--preset", default=default, choices=sorted(presets))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(save(args.preset, args.out_dir, seed=args.seed))


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


def _main() -> None:
    preset_main(__doc__, PRESETS, "tiny-paligemma2", save_checkpoint)


if __name__ == "__main__":
    _main()
