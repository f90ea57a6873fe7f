"""Checkpoints with the exact shape of published SmolVLM2 models and random weights, built offline.

    python -m pg_tune.models.chat.smolvlm_shapes smolvlm2-256m /tmp/smolvlm2-256m
    python -m pg_tune.models.chat.smolvlm_shapes --list

Like the PaliGemma shapes (``pg_tune.models.paligemma.shapes``): the folder is in the hub's layout
(bf16 safetensors, ``config.json``, ``generation_config.json``, processor and tokenizer files),
loads with ``SmolVLMForConditionalGeneration.from_pretrained`` / ``SmolVLMProcessor.from_pretrained``
alone, and is written shard by shard (``pg_tune.models.shapes``). For measuring memory and speed at
real size (``benchmarks/real_shapes.py``, ``pg-tune plan``), never for quality.

The config is ``HuggingFaceTB/SmolVLM2-256M-Video-Instruct``'s ``config.json``: SmolLM2-135M as the
text model (Llama: 30 layers of width 576, 9 query and 3 key/value heads of 64, MLP 1536, RoPE
theta 100,000, vocabulary 49,280, untied head), a SigLIP-B/16 encoder at 512 px (12 layers of width
768, MLP 3072) and the connector's pixel shuffle by 4 (64 tokens a tile). The processor is its
``preprocessor_config.json`` / ``processor_config.json``: longest edge 2048, tiles of 512, image
splitting on, 64 image tokens a tile: 5 to 17 tiles (320 to 1,088 image tokens) a picture. The
tokenizer is the tiny one (``smolvlm_tiny.build_tokenizer``: the real control and image ids).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMProcessor

from pg_tune.models.chat import smolvlm_tiny
from pg_tune.models.shapes import write_random_checkpoint

_SMOLLM2_135M = {
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "hidden_act": "silu",
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "initializer_range": 0.041666666666666664,
    "tie_word_embeddings": False,
}
_SIGLIP_B16_512 = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "patch_size": 16,
    "image_size": 512,
}


@dataclass(frozen=True)
class Shape:
    """A published SmolVLM2 checkpoint's architecture and image settings."""

    hub_id: str
    text: dict[str, Any]
    vision: dict[str, Any]
    scale_factor: int
    longest_edge: int

    @property
    def tokens_per_tile(self) -> int:
        return (self.vision["image_size"] // self.vision["patch_size"] // self.scale_factor) ** 2


SHAPES: dict[str, Shape] = {
    "smolvlm2-256m": Shape(
        "HuggingFaceTB/SmolVLM2-256M-Video-Instruct", _SMOLLM2_135M, _SIGLIP_B16_512, 4, 2048
    ),
}


def shape_of_hub_id(hub_id: str) -> str | None:
    """The ``SHAPES`` name mirroring a published checkpoint."""
    return next((name for name, shape in SHAPES.items() if shape.hub_id.lower() == hub_id.lower()), None)


def _shape(name: str) -> Shape:
    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; choose one of {', '.join(SHAPES)}")
    return SHAPES[name]


def shape_config(name: str) -> SmolVLMConfig:
    """The published config of ``name``."""
    shape = _shape(name)
    text = {
        **shape.text,
        "vocab_size": smolvlm_tiny.VOCAB_SIZE,
        "pad_token_id": smolvlm_tiny.PAD_ID,
        "bos_token_id": smolvlm_tiny.BOS_ID,
        "eos_token_id": smolvlm_tiny.END_OF_UTTERANCE_ID,
    }
    config = SmolVLMConfig(
        text_config=text,
        vision_config=dict(shape.vision),
        image_token_id=smolvlm_tiny.IMAGE_ID,
        scale_factor=shape.scale_factor,
        tie_word_embeddings=False,
        pad_token_id=smolvlm_tiny.PAD_ID,
    )
    config.dtype = torch.bfloat16
    return config


def build_processor(name: str) -> SmolVLMProcessor:
    """The published image settings around the tiny tokenizer."""
    shape = _shape(name)
    preset = smolvlm_tiny.TinySmolVLMPreset(
        tile_size=shape.vision["image_size"],
        patch_size=shape.vision["patch_size"],
        scale_factor=shape.scale_factor,
        longest_edge=shape.longest_edge,
    )
    return smolvlm_tiny.build_processor(preset)


def write_shape(name: str, out_dir: str | Path, max_shard_size: str = "2GB", seed: int = 0) -> dict[str, Any]:
    """Write the named published shape with random bf16 weights."""
    generation = GenerationConfig(
        bos_token_id=smolvlm_tiny.BOS_ID,
        eos_token_id=smolvlm_tiny.END_OF_UTTERANCE_ID,
        pad_token_id=smolvlm_tiny.PAD_ID,
    )
    return write_random_checkpoint(
        SmolVLMForConditionalGeneration,
        shape_config(name),
        build_processor(name),
        out_dir,
        generation,
        max_shard_size,
        seed,
    )


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
            print(f"{name:<16} {shape.hub_id} ({shape.tokens_per_tile} image tokens a tile)")
        return
    if not args.out_dir:
        parser.error("OUT_DIR is required")
    started = time.time()
    index = write_shape(args.name, args.out_dir, args.max_shard_size, args.seed)
    print(f"{args.out_dir}: {index['metadata']['total_size'] / 1e9:.2f} GB, {time.time() - started:.0f} s")


if __name__ == "__main__":
    _main()
