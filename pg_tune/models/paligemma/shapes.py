"""Checkpoints with the exact shape of published PaliGemma models and random weights, built offline.

    python -m pg_tune.models.paligemma.shapes paligemma2-3b-224 /tmp/pg2-3b-224
    python -m pg_tune.models.paligemma.shapes --list      # PaliGemma 2 3B/10B/28B and PaliGemma 1 3B, 224/448/896 px

The folder is in the hub's layout (bf16 safetensors shards + ``model.safetensors.index.json``,
``config.json``, ``generation_config.json``, processor and tokenizer files) and loads with
``PaliGemmaForConditionalGeneration.from_pretrained`` / ``PaliGemmaProcessor.from_pretrained`` alone.
It is for measuring memory and speed at real size (``benchmarks/real_shapes.py``), never for
quality: the weights are random.

The whole model never sits in memory (``pg_tune.models.shapes.write_random_checkpoint``: built on the
meta device, each shard materialised, initialised by transformers' own ``_init_weights`` — RMSNorm
scales at zero, LayerNorm at one, linears and embeddings normal(0, 0.02) — written and freed before
the next). Peak memory is about one shard (``--max-shard-size``, 2 GB as the transformers conversion
scripts save them) plus the largest single module.

The configs are those of the published checkpoints, from transformers' conversion scripts
(``src/transformers/models/paligemma/convert_paligemma_weights_to_hf.py`` for PaliGemma 1 3B,
``convert_paligemma2_weights_to_hf.py`` for PaliGemma 2, whose text config starts from
``google/gemma-2-2b-it``'s: soft-caps 50 (attention) and 30 (final logits), sliding window 4096,
``query_pre_attn_scalar`` 256). Both scripts add ``<image>`` to the 257,152-token vocabulary and
pad the embedding table to a multiple of 64: 257,216 rows. The tokenizer is
``pg_tune.models.paligemma.tiny.build_tokenizer`` (the real special-token and ``<loc>``/``<seg>`` ids, a small
ordinary vocabulary): 257,153 tokens, so every id it produces has a row.
"""

from __future__ import annotations

import argparse
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration

from pg_tune.models.paligemma.layout import BOS_ID, EOS_ID, IMAGE_TOKEN_ID, PAD_ID
from pg_tune.models.paligemma.tiny import TinyPreset, build_processor
from pg_tune.models.shapes import write_random_checkpoint

VOCAB_ROWS = 257216
"""257,152 text + loc + seg tokens, ``<image>``, then padding to a multiple of 64 (conversion scripts)."""

_SIGLIP_SO400M = {
    "model_type": "siglip_vision_model",
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "patch_size": 14,
    "hidden_act": "gelu_pytorch_tanh",
    "vision_use_head": False,
}

# Gemma 2B (PaliGemma 1) as convert_paligemma_weights_to_hf.py sets it.
_GEMMA_2B = {
    "model_type": "gemma",
    "hidden_size": 2048,
    "num_hidden_layers": 18,
    "num_attention_heads": 8,
    "num_key_value_heads": 1,
    "head_dim": 256,
    "intermediate_size": 16384,
    "hidden_activation": "gelu_pytorch_tanh",
}

# Gemma 2 2B (PaliGemma 2 "3B"): VARIANT_CONFIGS["2b"] of convert_paligemma2_weights_to_hf.py on top
# of google/gemma-2-2b-it's config.json.
_GEMMA2_2B = {
    "model_type": "gemma2",
    "hidden_size": 2304,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "intermediate_size": 9216,
    "hidden_activation": "gelu_pytorch_tanh",
    "query_pre_attn_scalar": 256,
    "attn_logit_softcapping": 50.0,
    "final_logit_softcapping": 30.0,
    "sliding_window": 4096,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-6,
}


# Gemma 2 9B and 27B (PaliGemma 2 "10B" / "28B"), same sources; 27B scales queries by 4608 / 32.
_GEMMA2_9B = {
    **_GEMMA2_2B,
    "hidden_size": 3584,
    "num_hidden_layers": 42,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "intermediate_size": 14336,
}
_GEMMA2_27B = {
    **_GEMMA2_2B,
    "hidden_size": 4608,
    "num_hidden_layers": 46,
    "num_attention_heads": 32,
    "num_key_value_heads": 16,
    "head_dim": 128,
    "intermediate_size": 36864,
    "query_pre_attn_scalar": 4608 // 32,
}


@dataclass(frozen=True)
class Shape:
    """A published checkpoint's architecture: text model, image resolution, hub id it mirrors."""

    hub_id: str
    text: dict[str, Any]
    image_size: int

    @property
    def image_tokens(self) -> int:
        return (self.image_size // _SIGLIP_SO400M["patch_size"]) ** 2


SHAPES: dict[str, Shape] = {
    **{
        f"paligemma2-{size}-{px}": Shape(f"google/paligemma2-{size}-pt-{px}", text, px)
        for size, text in (("3b", _GEMMA2_2B), ("10b", _GEMMA2_9B), ("28b", _GEMMA2_27B))
        for px in (224, 448, 896)
    },
    **{f"paligemma-3b-{px}": Shape(f"google/paligemma-3b-pt-{px}", _GEMMA_2B, px) for px in (224, 448, 896)},
}


def shape_of_hub_id(hub_id: str) -> str | None:
    """The ``SHAPES`` name mirroring a published checkpoint (``pt``, ``mix`` and ``ft`` share a shape)."""
    base = re.sub(r"-(mix|ft-docci)-", "-pt-", hub_id.removeprefix("google/"))
    return next((name for name, shape in SHAPES.items() if shape.hub_id == "google/" + base), None)


def shape_config(name: str, text_overrides: dict[str, Any] | None = None) -> PaliGemmaConfig:
    """The published config of ``name`` (``text_overrides`` shrinks it for tests)."""
    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; choose one of {', '.join(SHAPES)}")
    shape = SHAPES[name]
    text = {
        **shape.text,
        "vocab_size": VOCAB_ROWS,
        "pad_token_id": PAD_ID,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        **(text_overrides or {}),
    }
    vision = {**_SIGLIP_SO400M, "image_size": shape.image_size, "projection_dim": text["hidden_size"]}
    if text_overrides:
        # Tests: a narrow vision tower too, so the writer is exercised in seconds.
        vision.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
    config = PaliGemmaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_TOKEN_ID,
        projection_dim=text["hidden_size"],
        hidden_size=text["hidden_size"],
        vocab_size=VOCAB_ROWS,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )
    config.dtype = torch.bfloat16
    return config


def write_checkpoint(
    config: PaliGemmaConfig,
    out_dir: str | Path,
    image_size: int,
    max_shard_size: str = "2GB",
    seed: int = 0,
) -> dict[str, Any]:
    """Write a random-weight checkpoint of ``config`` shard by shard; return the index written."""
    processor = build_processor(TinyPreset(image_size=image_size, patch_size=config.vision_config.patch_size))
    generation = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    return write_random_checkpoint(
        PaliGemmaForConditionalGeneration, config, processor, out_dir, generation, max_shard_size, seed
    )


def write_shape(name: str, out_dir: str | Path, max_shard_size: str = "2GB", seed: int = 0) -> dict[str, Any]:
    """Write the named published shape (``SHAPES``) with random bf16 weights."""
    return write_checkpoint(shape_config(name), out_dir, SHAPES[name].image_size, max_shard_size, seed)


def _main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("name", nargs="?", choices=sorted(SHAPES))
    parser.add_argument("out_dir", nargs="?")
    parser.add_argument("--max-shard-size", default="2GB")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--list", action="store_true", help="list the shapes and the hub ids they mirror")
    args = parser.parse_args()
    if args.list or not args.name:
        for name, shape in SHAPES.items():
            print(f"{name:<20} {shape.hub_id} ({shape.image_tokens} image tokens)")
        return
    if not args.out_dir:
        parser.error("OUT_DIR is required")
    started = time.time()
    index = write_shape(args.name, args.out_dir, args.max_shard_size, args.seed)
    print(
        f"{args.out_dir}: {index['metadata']['total_size'] / 1e9:.2f} GB in "
        f"{len(set(index['weight_map'].values()))} shards, {time.time() - started:.0f} s"
    )


if __name__ == "__main__":
    _main()
