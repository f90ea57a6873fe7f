"""Real-shape checkpoints: the published configs, and a shard-by-shard writer (checked on a tiny config)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import PaliGemmaForConditionalGeneration, PaliGemmaProcessor

from pg_tune.models.paligemma.layout import IMAGE_TOKEN_ID
from pg_tune.models.paligemma.shapes import SHAPES, VOCAB_ROWS, shape_config, write_checkpoint


def _parameters(config) -> int:
    with torch.device("meta"):
        model = PaliGemmaForConditionalGeneration(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("name", "published"),
    # keras-hub's PaliGemma presets list 2,923,335,408 (224) and 2,924,220,144 (448) parameters for
    # PaliGemma 1 3B, counted on the 257,152-row table before transformers' padding to 257,216.
    [("paligemma-3b-224", 2_923_335_408)],
)
def test_paligemma1_parameter_count_matches_the_published_one(name, published):
    config = shape_config(name)
    padding_rows = VOCAB_ROWS - 257_152
    assert _parameters(config) - padding_rows * config.text_config.hidden_size == published


def test_paligemma2_3b_config_is_the_conversion_scripts():
    config = shape_config("paligemma2-3b-448")
    t, v = config.text_config, config.vision_config
    assert (t.model_type, t.hidden_size, t.num_hidden_layers, t.intermediate_size) == (
        "gemma2",
        2304,
        26,
        9216,
    )
    assert (t.num_attention_heads, t.num_key_value_heads, t.head_dim, t.query_pre_attn_scalar) == (
        8,
        4,
        256,
        256,
    )
    assert (t.attn_logit_softcapping, t.final_logit_softcapping, t.sliding_window) == (50.0, 30.0, 4096)
    assert (v.hidden_size, v.num_hidden_layers, v.intermediate_size, v.image_size) == (1152, 27, 4304, 448)
    assert config.image_token_index == IMAGE_TOKEN_ID and t.vocab_size == VOCAB_ROWS
    assert SHAPES["paligemma2-3b-448"].image_tokens == 1024
    # ~3.03 B parameters: Gemma 2 2B + SigLIP So400m + the projector.
    assert 3.0e9 < _parameters(config) < 3.1e9


def test_writer_shards_and_loads_with_transformers_alone(tmp_path):
    small = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        intermediate_size=128,
    )
    out = tmp_path / "ckpt"
    index = write_checkpoint(shape_config("paligemma2-3b-224", small), out, 224, max_shard_size="10MB")
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and all((out / s).is_file() for s in shards)
    assert json.loads((out / "model.safetensors.index.json").read_text())["weight_map"] == index["weight_map"]
    model, info = PaliGemmaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.dtype == torch.bfloat16
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    # transformers' own initialisation: Gemma RMSNorm scales (1 + w) at zero, SigLIP LayerNorm at one.
    assert torch.all(model.model.language_model.norm.weight == 0)
    assert torch.all(model.model.vision_tower.post_layernorm.weight == 1)
    assert 0.015 < float(model.model.language_model.layers[0].mlp.up_proj.weight.float().std()) < 0.025
    processor = PaliGemmaProcessor.from_pretrained(out)
    assert processor.image_seq_length == 256 and processor.image_processor.size["height"] == 224
    # Every id the tokenizer can produce has an embedding row; <image> is where PaliGemma has it.
    assert len(processor.tokenizer) <= VOCAB_ROWS
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == IMAGE_TOKEN_ID
    with pytest.raises(FileExistsError):
        write_checkpoint(shape_config("paligemma2-3b-224", small), out, 224)
